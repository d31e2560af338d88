"""`cotune bench quant`: ONNX weight-quantization variants side by side with llama.cpp's q8_0 and
q4_k_m: parity against the torch model, size and edge-runtime speed (benchmarks/quantization.py).

A typer command function; cotune/cli/main.py registers it under `bench`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cotune.cli.bench_train import _csv


def bench_quant(
    models: Annotated[str, typer.Option(help="comma-separated: tiny, gemma (Gemma 3 270M)")] = "tiny,gemma",
    variants: Annotated[str | None, typer.Option(
        help="comma-separated variants (default: all; see benchmarks/quantization.py)")] = None,
    runs: Annotated[int, typer.Option(help="timed generations per build (medians)", min=1)] = 5,
    threads: Annotated[int | None, typer.Option(help="threads (default: usable cores)")] = None,
    out: Annotated[Path, typer.Option(help="results folder: quantization.json, .md, .png")] = Path(
        "results/quantization"),
) -> None:
    """Parity, size and speed of each ONNX weight-quantization variant, beside llama.cpp's GGUFs."""
    from cotune.cli.benchmarks_path import use_checkout_benchmarks

    use_checkout_benchmarks()
    from benchmarks.quantization import QuantConfig, run_quantization

    cfg = QuantConfig(models=_csv(models, "--models"), variants=_csv(variants, "--variants") if variants else None,
                      runs=runs, threads=threads, out_dir=out)
    try:
        paths = run_quantization(cfg, log=typer.echo)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(paths["md"].read_text())
