"""`cotune bench quality`: the co-tuning quality benchmark (benchmarks/cotuning.py).

A typer command function; cotune/cli.py registers it under `bench`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

_METHODS = "zero-shot,standalone,standalone-het,fedavg,fedcollm,co-plms,crosslm,centralized"


def bench_quality(
    out: Annotated[Path, typer.Option(help="results folder: cotuning.json, .md, .png")] = Path("results/quality"),
    seeds: Annotated[int, typer.Option(help="number of seeds (0 .. n-1)", min=1)] = 3,
    rounds: Annotated[int, typer.Option(help="co-tuning rounds per run", min=1)] = 3,
    scale: Annotated[float, typer.Option(
        help="multiply records per device, test size, CrossLM prompts and rounds (1 fits 2 CPU cores in "
             "about 30 min; 2-3 for a bigger server)", min=0.1)] = 1.0,
    methods: Annotated[str, typer.Option(help=f"comma-separated subset of {_METHODS}")] = _METHODS,
    world_seed: Annotated[int, typer.Option(help="seed of the data and the pretrained tiny models")] = 0,
    crosslm_threshold: Annotated[float, typer.Option(
        help="CrossLM selection threshold on the devices' mean score (0..1)", min=0.0, max=1.0)] = 0.2,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads (default 1: a shared box stalls "
                                                     "with more)")] = 1,
) -> None:
    """Quality of every co-tuning method on the same data, models and budget, over seeds."""
    from benchmarks.cotuning import QualityConfig, check_methods, run_quality_benchmark

    chosen = tuple(m.strip() for m in methods.split(",") if m.strip())
    try:
        check_methods(chosen)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--methods") from None
    run_quality_benchmark(QualityConfig(out_dir=out, seeds=tuple(range(seeds)), rounds=rounds, scale=scale,
                                        methods=chosen, world_seed=world_seed, threads=threads,
                                        crosslm_threshold=crosslm_threshold))
