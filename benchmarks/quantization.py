"""ONNX weight quantization, one variant at a time (`cotune bench quant`).

For each model, the fp32 ONNX build export/ makes (cached with the latency benchmark's builds) is
quantized each way in VARIANTS, then:
- measured against the model's own torch reference on the exporter's parity text
  (export.parity: top-1 agreement on the prompts, perplexity change on held-out text), and checked
  against the exporter's default parity bounds and the stricter targets below;
- timed by the edge runtime (EdgeModel, the path devices run) in a subprocess of its own:
  time to first token and decode tokens/s, medians of `runs`.
llama.cpp's q8_0 and q4_k_m builds of the same checkpoint are measured the same way beside them.
For Gemma 3 270M the reference checkpoint is itself dequantized from the packaged q4_k_m GGUF,
so that GGUF is the reference's own weights (parity near exact by construction).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.report import Column, Panel, write_report

Log = Callable[[str], None]

# The issue's bar for a quantized ONNX build of Gemma 3 270M, stricter than the exporter's bounds.
TARGETS = {8: {"min_top1": 0.95, "max_ppl_change": 0.02}, 4: {"min_top1": 0.85, "max_ppl_change": 0.10}}


def variants() -> dict[str, Any]:
    """name -> WeightQuant, or None for dynamic int8 (onnx:int8 before the weight-only builds)."""
    from export.quantize import WeightQuant

    return {
        "dynamic-int8": None,
        "w8-b32": WeightQuant(bits=8, block_size=32),
        "w8-b128": WeightQuant(bits=8, block_size=128),
        "w8-b32-acc4": WeightQuant(bits=8, block_size=32, accuracy_level=4),
        "w4-b32-acc4": WeightQuant(bits=4, block_size=32, accuracy_level=4),
        "w4-b32": WeightQuant(bits=4, block_size=32),
        "w4-b64": WeightQuant(bits=4, block_size=64),
        "w4-b32-sym": WeightQuant(bits=4, block_size=32, symmetric=True),
        "w4-b32-head4": WeightQuant(bits=4, block_size=32, head_bits=4),
        "w4-hqq-b32": WeightQuant(bits=4, block_size=32, algorithm="hqq"),
    }


@dataclass
class QuantConfig:
    models: Sequence[str] = ("tiny", "gemma")
    variants: Sequence[str] | None = None  # default: all
    threads: int | None = None
    runs: int = 5
    prompt_tokens: int = 128
    decode_tokens: int = 64
    out_dir: Path = Path("results/quantization")
    gguf_quants: Sequence[str] = field(default_factory=lambda: ("q8_0", "q4_k_m"))


def _reference(hf_dir: Path) -> tuple[Any, Any]:
    """(Reference, ParityBounds) as the exporter makes them: the torch model on its prompts and text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from export.parity import (
        DEFAULT_EVAL_TEXTS,
        DEFAULT_PROMPTS,
        ParityBounds,
        TorchRunner,
        encode_texts,
        reference_from,
    )

    bounds = ParityBounds()
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    context = min(int(getattr(model.config, "max_position_embeddings", 2048) or 2048), 4096)
    prompt_ids, eval_ids = encode_texts(tokenizer, DEFAULT_PROMPTS, DEFAULT_EVAL_TEXTS, context=context,
                                        greedy_tokens=bounds.greedy_tokens, eval_max_tokens=bounds.eval_max_tokens)
    return reference_from(TorchRunner(model), prompt_ids, eval_ids, bounds.greedy_tokens), bounds


def _quantized_build(fp32: Any, name: str, quant: Any, root: Path, log: Log) -> Path:
    """fp32's build dir with model.onnx quantized `quant`'s way (cached by name and settings)."""
    from common.manifest import BuildManifest, build_files
    from export.quantize import onnx_files, quantize_onnx_dynamic_int8, quantize_onnx_weights

    settings = asdict(quant) if quant is not None else {"dynamic": True}
    out = root / name
    stamp = out / "variant.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == settings:
        return out
    log(f"  quantizing {name}")
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    source = fp32.path / fp32.manifest.model_file
    if quant is None:
        quantize_onnx_dynamic_int8(source, staging / "model.onnx")
    else:
        quantize_onnx_weights(source, staging / "model.onnx", quant)
    skip = {f.name for f in onnx_files(source)} | {"manifest.json"}
    for f in fp32.path.iterdir():
        if f.is_file() and f.name not in skip:
            shutil.copy2(f, staging / f.name)
    BuildManifest.model_validate({**fp32.manifest.model_dump(), "quantization": name, "parity": {},
                                  "files": build_files(staging)}).write(staging)
    (staging / "variant.json").write_text(json.dumps(settings))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return out


def _parity(build_dir: Path, fmt: str, ref: Any, threads: int) -> dict[str, Any]:
    from common.manifest import BuildManifest
    from export.parity import LlamaCppRunner, OnnxRunner, measure

    manifest = BuildManifest.read(build_dir)
    path = build_dir / manifest.model_file
    if fmt == "onnx":
        runner: Any = OnnxRunner(path, threads=threads)
    else:
        longest = max([len(p) + ref.greedy_tokens + 1 for p in ref.prompt_ids] + [len(e) for e in ref.eval_ids])
        runner = LlamaCppRunner(path, n_ctx=64 * (longest // 64 + 1), threads=threads)
    try:
        return measure(runner, ref)
    finally:
        close = getattr(runner, "close", None)
        if close is not None:
            close()


def _speed(build_dir: Path, fmt: str, ids: list[int], cfg: QuantConfig, threads: int) -> dict[str, Any]:
    """The edge runtime on this build, in its own process (benchmarks.latency's worker)."""
    from benchmarks.latency import run_worker
    from common.manifest import BuildManifest

    manifest = BuildManifest.read(build_dir)
    spec = {"engine": "cotune", "format": fmt, "build_dir": str(build_dir), "model_file": manifest.model_file,
            "model_path": str(build_dir / manifest.model_file), "threads": threads, "ids": ids,
            "decode": cfg.decode_tokens, "warmup": 1, "runs": cfg.runs, "flash_attn": None}
    return run_worker(spec, threads, timeout_s=1800)


def _row(model: str, label: str, fmt: str, bits: int, settings: Any, build_dir: Path, figures: dict[str, Any],
         speed: dict[str, Any]) -> dict[str, Any]:
    from common.manifest import BuildManifest
    from export.parity import ParityBounds, check_bounds
    from export.targets import Target

    target = TARGETS[8 if bits >= 8 else 4]
    quant = "int8" if bits >= 8 else "int4"
    gate = check_bounds(Target("onnx", quant), figures, ParityBounds())
    return {
        "model": model, "variant": label, "format": fmt, "bits": bits, "settings": settings,
        "size_bytes": BuildManifest.read(build_dir).size_bytes,
        "top1": figures["top1_agreement"], "ppl_change": figures["ppl_change"],
        "greedy_identical": figures.get("greedy_identical"),
        "default_gate": not gate, "gate_problems": gate,
        "meets_target": figures["top1_agreement"] >= target["min_top1"]
        and figures["ppl_change"] <= target["max_ppl_change"],
        "ttft_ms": speed["ttft_s"] * 1000, "decode_tok_s": speed["decode_tok_s"],
        "prefill_tok_s": speed["prefill_tok_s"], "peak_rss_bytes": speed.get("peak_rss_bytes"),
    }


def run_quantization(cfg: QuantConfig, log: Log = print) -> dict[str, Path]:
    from benchmarks.latency import prompt_ids_for
    from benchmarks.latency_assets import prepare_model
    from edge_sdk.runtime.base import default_threads

    threads = cfg.threads or default_threads()
    table = variants()
    chosen = list(cfg.variants or table)
    unknown = sorted(set(chosen) - set(table))
    if unknown:
        raise ValueError(f"unknown variants {unknown}; choose from {', '.join(table)}")
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    for key in cfg.models:
        log(f"{key}: builds (made once by export/, cached)")
        assets = prepare_model(key, list(cfg.gguf_quants), ["fp32"], threads, log)
        notes += assets.notes
        fp32 = next(b for b in assets.builds if b.manifest.format == "onnx")
        assert assets.hf_dir is not None
        ref, _ = _reference(assets.hf_dir)
        ids = prompt_ids_for(assets, cfg.prompt_tokens)
        root = fp32.path.parent / "quant"
        root.mkdir(exist_ok=True)
        for name in chosen:
            build_dir = _quantized_build(fp32, name, table[name], root, log)
            log(f"  measuring {key} onnx {name}")
            quant = table[name]
            bits = 8 if quant is None else quant.bits
            rows.append(_row(key, name, "onnx", bits, asdict(quant) if quant else {"dynamic": True}, build_dir,
                             _parity(build_dir, "onnx", ref, threads), _speed(build_dir, "onnx", ids, cfg, threads)))
        for build in assets.builds:
            if build.manifest.format != "gguf":
                continue
            log(f"  measuring {key} {build.label}")
            bits = 8 if build.manifest.quantization in ("q8_0", "f16", "f32") else 4
            rows.append(_row(key, build.label, "gguf", bits, {"note": build.note}, build.path,
                             _parity(build.path, "gguf", ref, threads), _speed(build.path, "gguf", ids, cfg, threads)))
    columns = [
        Column("model", "model"), Column("variant", "variant"), Column("bits", "bits"),
        Column("size_bytes", "size MiB", lambda v: f"{v / 2**20:.1f}"),
        Column("top1", "top-1", "{:.3f}"), Column("ppl_change", "ppl change", lambda v: f"{100 * v:+.2f}%"),
        Column("default_gate", "default gate", lambda v: "pass" if v else "fail"),
        Column("meets_target", "target", lambda v: "yes" if v else "no"),
        Column("ttft_ms", "TTFT ms", "{:.0f}"), Column("decode_tok_s", "decode tok/s", "{:.1f}"),
    ]
    panels = [Panel("top1", "top-1 agreement"), Panel("ppl_change", "perplexity change"),
              Panel("decode_tok_s", "decode tok/s"), Panel("size_bytes", "size MiB", scale=2**20)]
    bars = "; ".join(f"{bits}-bit top-1 >= {t['min_top1']} and perplexity <= +{100 * t['max_ppl_change']:.0f}%"
                     for bits, t in TARGETS.items())
    notes += [
        f"Targets: {bars}. The default gate is the exporter's ParityBounds() for int8/int4.",
        "Variants: w<bits>-b<block> weight-only MatMulNBits/GatherBlockQuantized with float activations; -acc4: "
        "int8 activations in MatMulNBits (accuracy_level 4); -sym: symmetric blocks; -head4: the output head at "
        "4 bits too (otherwise 8); hqq: half-quadratic fitted blocks; dynamic-int8: onnxruntime's quantize_dynamic.",
        "For Gemma 3 270M the torch reference is dequantized from the packaged q4_k_m GGUF, so gguf-q4_k_m is the "
        "reference's own weights.",
    ]
    meta = {"config": {"models": list(cfg.models), "variants": chosen, "threads": threads, "runs": cfg.runs,
                       "prompt_tokens": cfg.prompt_tokens, "decode_tokens": cfg.decode_tokens}}
    return write_report(cfg.out_dir, "quantization", "ONNX weight quantization: parity, size and speed", rows,
                        columns, panels, label_key="variant", color_key="format", meta=meta, notes=notes,
                        row_key="model")
