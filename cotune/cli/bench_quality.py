"""`cotune bench quality`: the co-tuning quality benchmark (benchmarks/cotuning.py), and with
`--tune` the search of its settings on the validation split (benchmarks/cotuning_tune.py).

A typer command function; cotune/cli/main.py registers it under `bench`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

_TRACKS = ("synthetic", "real")
_AUX = ("paper", "prompts", "public-only")


def _methods_help() -> str:
    from benchmarks.cotuning_methods import METHODS  # after use_checkout_benchmarks()

    return ",".join(METHODS)


def bench_quality(
    out: Annotated[Path, typer.Option(help="results folder: cotuning.json, .md, .png")] = Path("results/quality"),
    track: Annotated[str, typer.Option(help="synthetic (tiny models, invented languages) or real "
                                            "(Gemma 3 270M, SmolLM2, pycountry names)")] = "synthetic",
    aux: Annotated[str, typer.Option(help="the server's auxiliary data: paper (a labelled fifth of the task), "
                                          "prompts (in-domain prompts, no answers), public-only (stress test)")
                   ] = "paper",
    world_seed: Annotated[list[int] | None, typer.Option(
        help="world seeds (data and pretrained models); repeat for several; default 0 1 2 (synthetic), 0 (real)")
                                   ] = None,
    seeds: Annotated[int | None, typer.Option(help="training seeds per world (0 .. n-1); default 3 (synthetic), "
                                                   "1 (real)", min=1)] = None,
    methods: Annotated[str | None, typer.Option(help="comma-separated subset of the methods (default: all on the "
                                                     "synthetic track; those its claims need on the real one)")
                       ] = None,
    scale: Annotated[float, typer.Option(help="multiply data sizes (1 fits 2 CPU cores; more for bigger machines)",
                                         min=0.1)] = 1.0,
    settings: Annotated[Path | None, typer.Option(
        help="frozen settings file (default benchmarks/settings/<track>.json)")] = None,
    tune: Annotated[bool, typer.Option(help="search the settings on the validation split and freeze them "
                                            "(never reads the test split)")] = False,
    threads: Annotated[int | None, typer.Option(help="torch CPU threads")] = None,
    workers: Annotated[int, typer.Option(help="parallel processes (one core each): worlds are built, then "
                                              "each method x world x training seed runs, in parallel", min=1)] = 1,
    runs_dir: Annotated[Path | None, typer.Option(
        help="keep finished runs here (default OUT/runs); give the auxiliary modes one folder and the methods "
             "that do not read the aux data run once for all of them")] = None,
    curves: Annotated[bool, typer.Option(help="score validation after every round (per-round curves), not "
                                              "only after the last")] = False,
) -> None:
    """Quality of every co-tuning method and the papers' claims, with paired bootstrap intervals."""
    from cotune.cli.benchmarks_path import use_checkout_benchmarks

    use_checkout_benchmarks()
    from benchmarks.cotuning import QualityConfig, load_settings, run_quality_benchmark
    from benchmarks.cotuning_methods import DEFAULT_SEEDS, REAL_TRACK_METHODS, check_methods

    if track not in _TRACKS:
        raise typer.BadParameter(f"choose one of {', '.join(_TRACKS)}", param_hint="--track")
    if aux not in _AUX:
        raise typer.BadParameter(f"choose one of {', '.join(_AUX)}", param_hint="--aux")
    if threads:
        import torch

        torch.set_num_threads(threads)
    if tune:
        from benchmarks.cotuning_tune import tune as run_tune

        run_tune(track, out / "tune", scale=scale, write_to=settings)
        return
    default_methods = ",".join(REAL_TRACK_METHODS) if track == "real" else _methods_help()
    chosen = tuple(m.strip() for m in (methods or default_methods).split(",") if m.strip())
    try:
        check_methods(chosen)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--methods") from None
    try:
        frozen = load_settings(track, settings)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--settings") from None
    run_quality_benchmark(QualityConfig(out_dir=out, track=track, aux=aux,
                                        world_seeds=tuple(world_seed or DEFAULT_SEEDS[track][0]),
                                        seeds=tuple(range(seeds or DEFAULT_SEEDS[track][1])),
                                        methods=chosen, scale=scale, settings=frozen, threads=threads,
                                        curves=curves, workers=workers, runs_dir=runs_dir))
