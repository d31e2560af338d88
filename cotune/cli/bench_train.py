"""`cotune bench train`: on-device LoRA training throughput and memory, cotune's trainer against
transformers' Trainer + peft (benchmarks/training.py), and with `--memory-search` the largest
LoRA rank and sequence length within a memory budget.

A typer command function; cotune/cli/main.py registers it under `bench`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def _csv(text: str, hint: str, cast: type = str) -> list:
    try:
        values = [cast(x.strip()) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected a comma-separated list, got {text!r}", param_hint=hint) from None
    if not values:
        raise typer.BadParameter("give at least one value", param_hint=hint)
    return values


def bench_train(
    models: Annotated[str, typer.Option(help="comma-separated: tiny (the demo's device SLM), gemma (Gemma 3 "
                                             "270M, converted once and cached)")] = "tiny,gemma",
    engines: Annotated[str, typer.Option(help="comma-separated: cotune, cotune-fast, hf-trainer, hf-trainer-grouped")
                       ] = "cotune,cotune-fast,hf-trainer,hf-trainer-grouped",
    steps: Annotated[int | None, typer.Option(help="training steps per run (default: tiny 50, gemma 20)", min=2)
                     ] = None,
    repeats: Annotated[int, typer.Option(help="processes per engine (medians; 5 or more for a result)", min=1)] = 5,
    threads: Annotated[int | None, typer.Option(help="torch threads for every engine (default: usable cores)")
                       ] = None,
    out: Annotated[Path, typer.Option(help="results folder: training.json, .md, .png")] = Path("results/train"),
    memory_search: Annotated[bool, typer.Option(
        "--memory-search", help="also find the largest LoRA rank and sequence length within --budget-mib")] = False,
    search_model: Annotated[str, typer.Option(help="the model the memory search trains")] = "gemma",
    search_ranks: Annotated[str, typer.Option(help="comma-separated LoRA ranks to try")] = "8,16,32,64",
    search_lens: Annotated[str, typer.Option(help="comma-separated sequence lengths to try")] = "128,256,512,1024",
    search_modes: Annotated[str | None, typer.Option(
        help="comma-separated: default, checkpointing, chunked-loss, chunked-loss+checkpointing, "
             "chunked-loss+checkpointing+mmap (default: all)")] = None,
    budget_mib: Annotated[float, typer.Option(help="peak RSS budget of the memory search, MiB")] = 2048.0,
) -> None:
    """Tokens/s, step time, peak RSS and loss of on-device LoRA training, against transformers' Trainer."""
    from cotune.cli.benchmarks_path import use_checkout_benchmarks

    use_checkout_benchmarks()
    from benchmarks.training import TrainBenchConfig, run_training_benchmark
    from benchmarks.training_engines import MEMORY_MODES

    cfg = TrainBenchConfig(
        models=_csv(models, "--models"), engines=_csv(engines, "--engines"), steps=steps, repeats=repeats,
        threads=threads, out_dir=out, memory_search=memory_search, search_model=search_model,
        search_ranks=_csv(search_ranks, "--search-ranks", int), search_lens=_csv(search_lens, "--search-lens", int),
        search_modes=_csv(search_modes, "--search-modes") if search_modes else tuple(MEMORY_MODES),
        budget_mib=budget_mib)
    try:
        cfg.check()
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    run_training_benchmark(cfg, log=typer.echo)
