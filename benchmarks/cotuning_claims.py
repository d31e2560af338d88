"""The papers' claims, tested on the quality benchmark's final test scores with paired bootstrap
intervals (benchmarks.cotuning_stats), and the per-method summary.

A difference claim holds when its 95% interval lies above zero; the share of Centralized's gain
when its interval lies above zero; the LLM's general perplexity claim when the upper end of the
interval of its relative change stays at or below +2%.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Mapping
from typing import Any

from benchmarks.cotuning_eval import home_domains, item_scores
from benchmarks.cotuning_stats import Cells, Interval, nll_change, paired_difference, share
from benchmarks.worlds.base import World

PPL_BUDGET = 0.02
Runs = Mapping[str, Mapping[str, Mapping[str, Any]]]  # method -> world -> seed -> run

CLAIMS: tuple[tuple[str, str], ...] = (
    ("fedcollm_slm_over_fedavg", "FedCoLLM's SLM above FedAvg's on the global test (Rouge-L)"),
    ("fedcollm_slm_over_standalone", "FedCoLLM's SLM above Standalone's on the global test (Rouge-L)"),
    ("fedcollm_llm_over_aux_only", "FedCoLLM's LLM above the LLM tuned on the auxiliary data alone (Rouge-L)"),
    ("fedcollm_llm_share_of_centralized", "FedCoLLM's LLM reaches a share of Centralized's gain over zero-shot"),
    ("coplms_over_standalone_het", "Co-PLMs' device SLMs above Standalone-het on each device's home domain"),
    ("crosslm_llm_over_zero_shot", "CrossLM's LLM above the zero-shot LLM (Rouge-L)"),
    ("crosslm_slm_over_zero_shot", "CrossLM's device SLMs above the zero-shot device SLMs (Rouge-L)"),
    ("crosslm_llm_general_ppl_change", "CrossLM costs the LLM at most +2% perplexity on general text"),
)


def _final(run: Mapping[str, Any]) -> dict[str, Any]:
    return run["rounds"][-1]["test"]


def _cells(runs: Runs, method: str, pick: Callable[[dict[str, Any], str], list[float]],
           seeds_like: str | None = None) -> Cells | None:
    """world -> seed -> per-item values; a method run for one seed only (zero-shot) is repeated for
    the seeds of `seeds_like`, so it pairs with it."""
    if method not in runs:
        return None
    out: dict[str, dict[str, list[float]]] = {}
    for world, by_seed in runs[method].items():
        values = {seed: pick(_final(run), world) for seed, run in by_seed.items()}
        if seeds_like is not None and len(values) == 1 and seeds_like in runs:
            only = next(iter(values.values()))
            values = {seed: only for seed in runs[seeds_like].get(world, {})}
        out[world] = values
    return out


def _entry(claim: str, interval: Interval | None, holds: Callable[[Interval], bool], note: str = "") -> dict[str, Any]:
    text = dict(CLAIMS)[claim]
    if interval is None or math.isnan(interval.estimate):
        return {"claim": claim, "text": text, "difference": None, "ci95": None, "holds": None,
                "note": note or "not run"}
    return {"claim": claim, "text": text, "difference": interval.estimate, "ci95": interval.as_list(),
            "holds": bool(holds(interval)) if not math.isnan(interval.lo) else None, "note": note}


def claims(runs: Runs, worlds: Mapping[str, World], seed: int = 0) -> list[dict[str, Any]]:
    from common.records import read_jsonl

    tests = {w: read_jsonl(world.test) for w, world in worlds.items()}
    homes = {w: home_domains(world) for w, world in worlds.items()}

    def slm(res: dict[str, Any], _w: str) -> list[float]:
        return item_scores(res["slm"])

    def slm_home(res: dict[str, Any], w: str) -> list[float]:
        return item_scores(res["slm"], homes[w], tests[w])

    def llm(res: dict[str, Any], _w: str) -> list[float]:
        return item_scores(res["llm"])

    def nll(index: int) -> Callable[[dict[str, Any], str], list[float]]:
        return lambda res, _w: [float(x[index]) for x in res["llm"]["general_nll"]]

    above = lambda i: i.lo > 0  # noqa: E731 - the rule of every difference claim
    out = []

    def diff(claim: str, a: str, b: str, pick: Callable[[dict[str, Any], str], list[float]], note: str = "") -> None:
        ca, cb = _cells(runs, a, pick), _cells(runs, b, pick, seeds_like=a)
        missing = [m for m, c in ((a, ca), (b, cb)) if c is None]
        interval = paired_difference(ca, cb, seed) if not missing else None
        out.append(_entry(claim, interval, above, f"needs {', '.join(missing)}" if missing else note))

    diff("fedcollm_slm_over_fedavg", "fedcollm", "fedavg", slm)
    diff("fedcollm_slm_over_standalone", "fedcollm", "standalone", slm)
    if "fedavg+aux" in runs:
        diff("fedcollm_llm_over_aux_only", "fedcollm", "fedavg+aux", llm,
             "LLM-aux-only: the LLM of the fedavg+aux ablation (FedCoLLM with lambda_kd = 0)")
    else:
        diff("fedcollm_llm_over_aux_only", "fedcollm", "zero-shot", llm,
             "against the zero-shot LLM: fedavg+aux did not run (without answers in the auxiliary data there "
             "is nothing to tune the LLM on alone, so LLM-aux-only is the zero-shot LLM)")
    parts = [_cells(runs, m, llm, seeds_like="fedcollm") for m in ("fedcollm", "centralized", "zero-shot")]
    if None in parts:
        out.append(_entry("fedcollm_llm_share_of_centralized", None, above, "needs fedcollm, centralized, zero-shot"))
    else:
        aligned = [{w: c[w] for w in parts[0]} for c in parts]
        out.append(_entry("fedcollm_llm_share_of_centralized", share(*aligned, seed=seed), above,
                          "(FedCoLLM - zero-shot) / (Centralized - zero-shot), LLM Rouge-L"))
    diff("coplms_over_standalone_het", "co-plms", "standalone-het", slm_home,
         "per test item, the mean over the devices whose home domain it is")
    diff("crosslm_llm_over_zero_shot", "crosslm", "zero-shot", llm)
    diff("crosslm_slm_over_zero_shot", "crosslm", "zero-shot-het", slm)
    cells = [_cells(runs, m, nll(i), seeds_like="crosslm") for m in ("crosslm", "zero-shot") for i in (0, 1)]
    if None in cells:
        out.append(_entry("crosslm_llm_general_ppl_change", None, above, "needs crosslm, zero-shot"))
    else:
        out.append(_entry("crosslm_llm_general_ppl_change", nll_change(*cells, seed=seed),
                          lambda i: i.hi <= PPL_BUDGET, "relative change of perplexity on general held-out text"))
    return out


def _stat(values: list[float]) -> dict[str, Any]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(runs: Runs, split: str) -> dict[str, Any]:
    """Per method, the final round's scores on `split`: mean and spread over world x training seeds."""
    summary: dict[str, Any] = {}
    for method, by_world in runs.items():
        finals = [run["rounds"][-1][split] for by_seed in by_world.values() for run in by_seed.values()]
        every = [run for by_seed in by_world.values() for run in by_seed.values()]
        row: dict[str, Any] = {}
        for side in ("slm", "llm"):
            if any(f[side] is None for f in finals):
                continue
            for metric in ("rougeL", "em"):
                row[f"{side}_{metric}"] = _stat([f[side][metric] for f in finals])
            row[f"{side}_by"] = {g: _stat([f[side]["by"][g]["rougeL"] for f in finals]) for g in finals[0][side]["by"]}
            if side == "slm":
                for where in ("home", "foreign"):
                    row[f"slm_{where}_rougeL"] = _stat([f["slm"][where]["rougeL"] for f in finals])
            elif "general_nll" in finals[0]["llm"]:
                row["llm_general_ppl"] = _stat([math.exp(sum(n for n, _ in f["llm"]["general_nll"])
                                                         / sum(c for _, c in f["llm"]["general_nll"]))
                                                for f in finals])
        later = [r for run in every for r in run["rounds"]]
        row["bytes_up_per_round"] = _stat([r.get("bytes_up", 0) for r in later])
        row["bytes_down_per_round"] = _stat([r.get("bytes_down", 0) for r in later])
        row["wall_s"] = _stat([run["wall_s"] for run in every])
        gaps = [r["extra"]["aggregation"].get("lora_factor_gap") for r in later
                if isinstance(r.get("extra", {}).get("aggregation"), dict)
                and r["extra"]["aggregation"].get("lora_factor_gap") is not None]
        if gaps:
            row["factor_gap"] = _stat([float(g) for g in gaps])
        summary[method] = row
    return summary
