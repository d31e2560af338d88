"""`cotune export`: a base checkpoint (+ LoRA adapter) -> edge builds with manifests and parity figures.

Wire it with `app.command("export")(export_command)`; errors are ExportError (one line in `main`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from export.pipeline import BuildResult

TARGETS_HELP = ("comma-separated builds: gguf:f32|f16|q8_0|q4_k_m|q4_k_s|q5_k_m|q6_k, gguf-lora[:BASE_QUANT] "
                "(the adapter alone + its base), onnx:fp32|int8|int4")


def _bounds(items: list[str] | None) -> Any:
    from export.parity import ParityBounds

    values: dict[str, float] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            values[key.strip()] = float(value)
        except ValueError:
            raise typer.BadParameter(f"{item!r}: expected KEY=NUMBER, e.g. min_top1_4bit=0.8",
                                     param_hint="--bound") from None
    try:
        return ParityBounds().with_overrides(**values)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--bound") from None


def _lora_spec(adapter: Path | None, r: int | None, alpha: float | None, targets: str | None) -> Any:
    """LoRA settings for a cotune adapter file that has no adapter_info.json beside it."""
    if adapter is None or adapter.is_dir() or alpha is None:
        return None
    from common.protocol import LoraSpec
    from export.inputs import safetensors_header

    header = safetensors_header(adapter, str(adapter)) if adapter.is_file() else {}
    ranks = {shape[0] for name, (_, shape) in header.items() if ".lora_A." in name}
    leaves = sorted({name.split(".lora_A.")[0].rsplit(".", 1)[-1] for name in header if ".lora_A." in name})
    modules = [t.strip() for t in targets.split(",")] if targets else leaves
    return LoraSpec(r=r or (ranks.pop() if len(ranks) == 1 else 8), alpha=alpha, target_modules=modules)


def _texts(path: Path | None, paragraphs: bool) -> list[str] | None:
    if path is None:
        return None
    text = path.read_text()
    parts = text.split("\n\n") if paragraphs else text.splitlines()
    return [p.strip() for p in parts if p.strip()] or None


def _table(results: list[BuildResult]) -> str:
    rows = [("build", "MB", "rel logit diff", "top-1", "greedy", "ppl change", "seconds", "path")]
    for r in results:
        p = r.manifest.parity
        greedy = f"{sum(p['greedy_match'])}/{p['greedy_tokens'] * len(p['greedy_match'])}"
        rows.append((str(r.target), f"{r.manifest.size_bytes / 1e6:.1f}", f"{p['rel_logit_diff']:.2e}",
                     f"{p['top1_agreement']:.3f}", greedy, f"{p['ppl_change']:+.4f}", f"{r.seconds:.0f}", str(r.path)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def export_command(
    base: Annotated[Path, typer.Option(
        help="HF checkpoint directory (config.json, model.safetensors, tokenizer.json)")],
    to: Annotated[str, typer.Option(help=TARGETS_HELP)],
    out: Annotated[Path, typer.Option(help="output directory; each build goes to OUT/<format>-<quant>/")],
    adapter: Annotated[Path | None, typer.Option(
        help="peft adapter directory, or a cotune adapter .safetensors (LoRA settings from the adapter_info.json "
             "beside it or --lora-*); omit to export BASE as it is")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha of a cotune adapter file")] = None,
    lora_r: Annotated[int | None, typer.Option(help="LoRA rank (default: read from the adapter)")] = None,
    lora_targets: Annotated[str | None, typer.Option(
        help="comma-separated LoRA target modules (default: read from the adapter)")] = None,
    run_id: Annotated[str | None, typer.Option(help="co-tuning run id, recorded in the manifests")] = None,
    round: Annotated[int | None, typer.Option(help="round of the adapter, recorded in the manifests")] = None,  # noqa: A002
    bound: Annotated[list[str] | None, typer.Option(
        help="override a parity bound, KEY=NUMBER (repeatable), e.g. min_top1_4bit=0.8, max_ppl_change_8bit=0.02")
    ] = None,
    prompts: Annotated[Path | None, typer.Option(help="text file of parity prompts, one per line")] = None,
    eval_text: Annotated[Path | None, typer.Option(
        help="held-out text for perplexity, paragraphs separated by blank lines")] = None,
    int4_accuracy_level: Annotated[int, typer.Option(
        help="onnxruntime MatMulNBits accuracy level for onnx:int4 (4 = int8 compute, faster; 0 = fp32)")] = 4,
    int4_head_bits: Annotated[int, typer.Option(help="bits of the output head in onnx:int4 (4 or 8)")] = 8,
    threads: Annotated[int | None, typer.Option(help="CPU threads for llama.cpp, onnxruntime and quantizers")] = None,
    progress: Annotated[bool, typer.Option(help="show a progress bar")] = True,
) -> None:
    """Write edge builds (GGUF, GGUF LoRA, ONNX), each with a manifest.json and parity figures.

    Every build is compared with the torch model; one that crosses a bound fails the export
    and nothing is written.
    """
    from export import export_builds

    bounds = _bounds(bound)
    spec = _lora_spec(adapter, lora_r, lora_alpha, lora_targets)
    if threads:
        import torch

        torch.set_num_threads(threads)
    results = export_builds(
        base, adapter, to, out, run_id=run_id, round=round, bounds=bounds, progress=progress, lora_spec=spec,
        prompts=_texts(prompts, paragraphs=False), eval_texts=_texts(eval_text, paragraphs=True), threads=threads,
        int4_accuracy_level=int4_accuracy_level if int4_accuracy_level > 0 else None, int4_head_bits=int4_head_bits)
    typer.echo(_table(results))
    for r in results:
        for note in r.warnings:
            typer.echo(f"warning: {r.target}: {note}", err=True)
