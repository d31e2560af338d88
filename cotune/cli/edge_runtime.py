"""Command-line entry points for the edge runtime and the latency benchmark.

Plain functions with typer annotations, registered in cotune/cli.py:

    edge_app.command("generate")(edge_generate)
    edge_app.command("bench")(edge_bench)
    bench_app.command("latency")(bench_latency)

Errors propagate as exceptions whose message is one line (what, why, what to do); the
`cotune` entry point prints that line, or the traceback with --debug.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

GPU_LAYERS_HELP = "llama.cpp layers on the GPU: auto (all when this llama.cpp can offload, else 0) | all | N"
PROVIDERS_HELP = ("ONNX Runtime execution providers: auto (CUDA when installed, then CPU) | cpu | cuda | tensorrt "
                  "| comma-separated provider names")


def _stderr(text: str) -> None:
    typer.echo(text, err=True)


def accel_options(gpu_layers: str, providers: str) -> dict[str, Any]:
    """EdgeModel.load's n_gpu_layers and providers from the flags; a bad value names its flag."""
    from edge_sdk.runtime.accel import parse_gpu_layers, parse_providers

    try:
        parse_gpu_layers(gpu_layers)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--gpu-layers") from None
    try:
        parse_providers(providers)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--providers") from None
    return {"n_gpu_layers": gpu_layers, "providers": providers}


def placement(describe: dict[str, Any]) -> str:
    """Where the model runs, in words: llama.cpp's GPU layers or ONNX Runtime's providers."""
    if "providers" in describe:
        return "providers " + ", ".join(describe["providers"])
    if "gpu_layers" in describe:
        return f"{describe['gpu_layers']}/{describe['n_layer']} layers on the GPU"
    return "CPU"


def _summary(result: Any, describe: dict[str, Any]) -> str:
    t = result.timings
    quant = describe.get("quantization") or describe.get("format") or ""
    return (f"[{describe['backend']} {quant}] on {placement(describe)}: {result.prompt_tokens} prompt + "
            f"{result.completion_tokens} generated tokens; ttft {t.ttft_s * 1000:.0f} ms, "
            f"prefill {t.prefill_tok_s:.0f} tok/s, decode {t.decode_tok_s:.1f} tok/s; finish: {result.finish_reason}")


def edge_generate(
    build: Annotated[Path, typer.Argument(help="build directory (with manifest.json), or a .gguf file")],
    prompt: Annotated[str, typer.Argument(help="the prompt; '-' reads it from standard input")],
    max_tokens: Annotated[int, typer.Option(help="most tokens to generate")] = 128,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass (1 = off)")] = 1.0,
    top_k: Annotated[int, typer.Option(help="sample among the k most likely tokens (0 = off)")] = 0,
    seed: Annotated[int | None, typer.Option(help="seed for sampling")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="stop string; repeat for several")] = None,
    adapter: Annotated[Path | None, typer.Option(help="GGUF LoRA build (or .gguf) to apply, llama.cpp only")] = None,
    n_ctx: Annotated[int | None, typer.Option(help="context window in tokens")] = None,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all usable cores)")] = None,
    verify: Annotated[str, typer.Option(help="check build files: size | sha256 | none")] = "size",
    coordinator: Annotated[
        str | None, typer.Option(help="coordinator URL: escalate to its LLM when the device is unsure")
    ] = None,
    token: Annotated[str | None, typer.Option(envvar="COTUNE_CLIENT_TOKEN", help="this device's client token")] = None,
    signal: Annotated[str, typer.Option(help="unsureness signal: mean_entropy | max_entropy | mean_nll")] = (
        "mean_entropy"),
    threshold: Annotated[float, typer.Option(help="escalate when the signal is above this")] = 2.0,
    stream: Annotated[bool, typer.Option(help="print tokens as they come")] = True,
    json_output: Annotated[bool, typer.Option("--json", help="print one JSON object instead of text")] = False,
    gpu_layers: Annotated[str, typer.Option(help=GPU_LAYERS_HELP)] = "auto",
    providers: Annotated[str, typer.Option(help=PROVIDERS_HELP)] = "auto",
) -> None:
    """Generate text on this device with an edge build (llama.cpp or ONNX Runtime)."""
    from edge_sdk.runtime import EdgeModel

    if verify not in ("size", "sha256", "none"):
        raise typer.BadParameter("--verify must be size, sha256 or none")
    accel = accel_options(gpu_layers, providers)
    if prompt == "-":
        prompt = sys.stdin.read()
    with EdgeModel.load(build, n_ctx=n_ctx, threads=threads, verify=verify, adapter=adapter,  # type: ignore[arg-type]
                        **accel) as model:
        describe = model.describe()
        if coordinator is not None:
            from edge_sdk.runtime import CollaborativeRouter

            router = CollaborativeRouter(model, coordinator, token, signal=signal, threshold=threshold)
            answer = router.answer(prompt, max_tokens, temperature, top_p, stop)
            if json_output:
                typer.echo(json.dumps(answer.to_dict()))
            else:
                typer.echo(answer.text)
                _stderr(f"[{answer.path}] {answer.reason}")
                _stderr(_summary(answer.local, describe))
            return
        kwargs = {"top_k": top_k, "seed": seed}
        if stream and not json_output:
            chunks = model.stream(prompt, max_tokens, temperature, top_p, stop, **kwargs)
            for chunk in chunks:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            sys.stdout.write("\n")
            result = chunks.result
        else:
            result = model.generate(prompt, max_tokens, temperature, top_p, stop, **kwargs)
            if not json_output:
                typer.echo(result.text)
        assert result is not None
        if json_output:
            typer.echo(json.dumps({**result.to_dict(), "model": describe}))
        else:
            _stderr(_summary(result, describe))


def edge_bench(
    build: Annotated[Path, typer.Argument(help="build directory (with manifest.json), or a .gguf file")],
    prompt_tokens: Annotated[int, typer.Option(help="prompt length in tokens")] = 512,
    decode_tokens: Annotated[int, typer.Option(help="tokens to generate per run")] = 128,
    runs: Annotated[int, typer.Option(help="timed runs (medians are reported)")] = 5,
    warmup: Annotated[int, typer.Option(help="untimed runs first")] = 1,
    threads: Annotated[int | None, typer.Option(help="CPU threads (default: all usable cores)")] = None,
    json_output: Annotated[bool, typer.Option("--json", help="print one JSON object")] = False,
    gpu_layers: Annotated[str, typer.Option(help=GPU_LAYERS_HELP)] = "auto",
    providers: Annotated[str, typer.Option(help=PROVIDERS_HELP)] = "auto",
) -> None:
    """Time one build on this device: load, time to first token, prefill and decode tokens/s."""
    from edge_sdk.runtime import EdgeModel
    from edge_sdk.runtime.bench import bench_model, peak_rss_bytes

    if runs < 1:
        raise typer.BadParameter("--runs must be >= 1")
    accel = accel_options(gpu_layers, providers)
    with EdgeModel.load(build, n_ctx=prompt_tokens + decode_tokens + 8, threads=threads, **accel) as model:
        figures = bench_model(model, prompt_tokens, decode_tokens, runs, warmup)
        describe = model.describe()
    figures["peak_rss_bytes"] = peak_rss_bytes()
    figures["model"] = describe
    if json_output:
        typer.echo(json.dumps(figures))
        return
    typer.echo(
        f"{describe['backend']} {describe.get('quantization') or ''} ({describe['size_bytes'] / 2**20:.1f} MiB, "
        f"{describe['threads']} threads, {placement(describe)}): load {figures['load_s']:.2f} s, "
        f"ttft {figures['ttft_s'] * 1000:.0f} ms, "
        f"prefill {figures['prefill_tok_s']:.0f} tok/s, decode {figures['decode_tok_s']:.1f} tok/s "
        f"(median of {runs}), peak RSS {figures['peak_rss_bytes'] / 2**20:.0f} MiB"
    )


def bench_latency(
    model: Annotated[
        list[str] | None, typer.Option("--model", help="tiny | gemma (repeatable; default both)")
    ] = None,
    engine: Annotated[
        list[str] | None,
        typer.Option("--engine", help="cotune | llama-cpp-python | optimum | transformers (repeatable; default all)"),
    ] = None,
    runs: Annotated[int, typer.Option(help="timed runs per process (medians over all reported)")] = 3,
    warmup: Annotated[int, typer.Option(help="untimed runs first")] = 1,
    repeats: Annotated[int, typer.Option(help="processes per measurement, run in alternating order")] = 2,
    prompt_tokens: Annotated[int, typer.Option(help="prompt length in tokens")] = 512,
    decode_tokens: Annotated[int, typer.Option(help="tokens generated per run")] = 128,
    threads: Annotated[int | None, typer.Option(help="CPU threads for every engine (default: usable cores)")] = None,
    gguf_quant: Annotated[
        list[str] | None, typer.Option("--gguf-quant", help="GGUF quantizations (default q4_k_m, q8_0, f16)")
    ] = None,
    onnx_quant: Annotated[
        list[str] | None, typer.Option("--onnx-quant", help="ONNX quantizations (default fp32, int8)")
    ] = None,
    build_format: Annotated[
        list[str] | None, typer.Option("--format", help="gguf | onnx (repeatable; default both)")
    ] = None,
    out: Annotated[Path, typer.Option(help="results folder (JSON, markdown table, PNG)")] = Path("results/latency"),
    timeout: Annotated[float, typer.Option(help="seconds allowed per engine measurement")] = 1800.0,
) -> None:
    """Latency of our runtime against llama-cpp-python, optimum ORT and transformers, on the same builds.

    Builds and checkpoints are cached under $COTUNE_CACHE/bench (default ~/.cache/cotune/bench).
    """
    from cotune.cli.benchmarks_path import use_checkout_benchmarks

    use_checkout_benchmarks()
    from benchmarks.latency import LatencyConfig, run_latency

    cfg = LatencyConfig(
        models=model or ["tiny", "gemma"], engines=engine or None, runs=runs, warmup=warmup, repeats=repeats,
        prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, threads=threads,
        gguf_quants=gguf_quant or None, onnx_quants=onnx_quant or None, formats=build_format or ("gguf", "onnx"),
        out_dir=out, timeout_s=timeout,
    )
    paths = run_latency(cfg, log=_stderr)
    _stderr("wrote " + ", ".join(str(p) for p in paths.values()))
