"""The largest LoRA rank and sequence length that train within a memory budget (peak RSS of the
whole training process: Python, torch, the model, the adapter, activations, optimizer state).

cotune's trainer runs, batch 1, on sequences that fill the length exactly (long records cut to
it), for each memory mode (benchmarks/training_engines.MEMORY_MODES: the default trainer, with
gradient checkpointing, with the loss's head run in recomputed chunks, both, and both with glibc
told to return large freed blocks to the system). A rank's
lengths are tried from short to long and stop at the first one past the budget, and a rank
whose shortest length is past it ends the mode's search: memory only grows with either.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from benchmarks.training_assets import checkpoint
from benchmarks.training_engines import MEMORY_MODES

if TYPE_CHECKING:
    from benchmarks.training import TrainBenchConfig

Log = Callable[[str], None]


def _cell(mode: str, r: int, seq: int, figures: dict[str, Any] | None, budget: float, status: str
          ) -> dict[str, Any]:
    cell: dict[str, Any] = {"mode": mode, "options": "", "r": r, "seq": seq, "status": status}
    if figures is not None:
        cell.update({k: figures.get(k) for k in ("peak_rss_mib", "train_peak_rss_mib", "ready_rss_mib", "step_s",
                                                "tokens_per_s", "options")})
        cell["fits"] = figures["peak_rss_mib"] <= budget
    return cell


def largest(cells: list[dict[str, Any]], mode: str) -> dict[str, Any]:
    """Of a mode's cells within the budget: the longest sequence at each rank, the largest rank
    that fits at any length (with its longest length), and the longest length (with its largest rank)."""
    fitting = [c for c in cells if c["mode"] == mode and c.get("fits")]
    per_rank: dict[int, int] = {}
    for c in fitting:
        per_rank[c["r"]] = max(per_rank.get(c["r"], 0), c["seq"])
    top_rank = max(fitting, key=lambda c: (c["r"], c["seq"]), default=None)
    top_seq = max(fitting, key=lambda c: (c["seq"], c["r"]), default=None)

    def brief(c: dict[str, Any] | None) -> dict[str, Any] | None:
        return None if c is None else {"r": c["r"], "seq": c["seq"], "peak_rss_mib": c["peak_rss_mib"]}

    return {"longest_seq_by_rank": {str(r): s for r, s in sorted(per_rank.items())},
            "largest_rank": brief(top_rank), "longest_seq": brief(top_seq)}


def run_memory_search(cfg: TrainBenchConfig, threads: int, log: Log = print) -> dict[str, Any]:
    """Measure the grid (with the early stops above); the cells, the largest fits and summary lines."""
    from benchmarks.training import job_spec, preset, run_worker

    key = cfg.search_model
    base = preset(cfg, key)
    model_dir = checkpoint(key, log)
    budget = cfg.budget_mib
    cells: list[dict[str, Any]] = []
    for mode in cfg.search_modes:
        for r in sorted(cfg.search_ranks):
            rank_fits = False
            over = False
            for seq in sorted(cfg.search_lens):
                if over:
                    cells.append(_cell(mode, r, seq, None, budget, "skipped: a shorter sequence is past the budget"))
                    continue
                p = base.__class__(**{**base.__dict__, "r": r, "alpha": 2.0 * r, "batch_size": 1, "max_len": seq,
                                      "steps": cfg.search_steps})
                spec = {**job_spec(p, model_dir, "cotune", cfg.seed, threads), "long": True,
                        "options": MEMORY_MODES[mode]["options"], "env": MEMORY_MODES[mode]["env"]}
                log(f"memory {key} {mode}: r={r} seq={seq}")
                try:
                    figures = run_worker(spec, cfg.out_dir, cfg.timeout_s)
                except Exception as exc:  # noqa: BLE001 - an out-of-memory kill is an answer too
                    cells.append({**_cell(mode, r, seq, None, budget, f"failed: {str(exc)[:200]}"), "fits": False})
                    log(f"  failed: {str(exc)[:200]}")
                    over = True
                    continue
                cell = _cell(mode, r, seq, figures, budget, "measured")
                cells.append(cell)
                log(f"  peak {cell['peak_rss_mib']:.0f} MiB -> {'fits' if cell['fits'] else 'over budget'}")
                rank_fits = rank_fits or cell["fits"]
                over = not cell["fits"]
            if not rank_fits:
                for bigger in (x for x in sorted(cfg.search_ranks) if x > r):
                    cells.extend(_cell(mode, bigger, seq, None, budget, "skipped: a smaller rank is past the budget")
                                 for seq in sorted(cfg.search_lens))
                break
    results = {mode: largest(cells, mode) for mode in cfg.search_modes}
    summary = []
    for mode, found in results.items():
        rank, seq = found["largest_rank"], found["longest_seq"]
        if rank is None or seq is None:
            summary.append(f"memory {key} {mode}: nothing in the grid trains within {budget:.0f} MiB")
            continue
        summary.append(f"memory {key} {mode}, batch 1, within {budget:.0f} MiB: largest rank r={rank['r']} "
                       f"(up to seq {rank['seq']}, {rank['peak_rss_mib']:.0f} MiB); longest sequence {seq['seq']} "
                       f"(up to r={seq['r']}, {seq['peak_rss_mib']:.0f} MiB); by rank: "
                       + ", ".join(f"r={r}: {s}" for r, s in found["longest_seq_by_rank"].items()))
    return {"model": key, "budget_mib": budget, "batch_size": 1, "steps": cfg.search_steps,
            "modes": {m: MEMORY_MODES[m] for m in cfg.search_modes}, "cells": cells, "largest": results,
            "summary": summary}
