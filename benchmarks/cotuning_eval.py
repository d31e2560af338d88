"""Scoring for the quality benchmark: per-item Rouge-L / exact match of each device's SLM and of the
LLM on the validation or test split, broken down by domain, by the test items' knowledge tags, and
by each device's home domain vs the others; the LLM's loss on general held-out text.

The test split is read only through `final()`, once per reported run (ARCHITECTURE.md, "Quality
benchmark"); the evaluator counts the reads so the runner can prove it.
"""

from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from benchmarks.worlds.base import World

Model = tuple[Any, Any]  # (model, tokenizer)


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else float("nan")


def home_domains(world: World) -> list[str]:
    """Each device's home: the domain it holds most records of."""
    return [max(sorted(counts), key=lambda d: counts[d]) for counts in world.device_domains]


class Evaluator:
    def __init__(self, world: World) -> None:
        from common.records import read_jsonl

        self.splits = {"validation": read_jsonl(world.validation), "test": read_jsonl(world.test)}
        self.general = read_jsonl(world.general)
        self.tags = world.test_tags
        self.homes = home_domains(world)
        self.max_new_tokens = world.max_new_tokens
        self.seconds = 0.0  # time spent evaluating, kept out of the methods' wall time
        self.test_reads = 0

    def _items(self, model: Model, split: str) -> dict[str, list[float]]:
        from common.metrics import exact_match, rouge_l
        from common.ml.evaluate import generate_greedy

        records = self.splits[split]
        started = time.perf_counter()
        try:
            preds = generate_greedy(model[0], model[1], [r.prompt for r in records], self.max_new_tokens)
        finally:
            self.seconds += time.perf_counter() - started
        return {"rougeL": [round(rouge_l(p, r.response), 5) for p, r in zip(preds, records, strict=True)],
                "em": [exact_match(p, r.response) for p, r in zip(preds, records, strict=True)]}

    def _summary(self, items: list[dict[str, list[float]]], split: str, per_device_home: bool) -> dict[str, Any]:
        """Means over items (and devices); by domain, by tag value, and home vs foreign."""
        records = self.splits[split]
        out: dict[str, Any] = {m: _mean([_mean(d[m]) for d in items]) for m in ("rougeL", "em")}
        groups: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(records):
            groups[f"domain:{r.domain}"].append(i)
            for key, value in self.tags.get(r.prompt, {}).items():
                groups[f"{key}:{value}"].append(i)
        out["by"] = {g: {m: _mean([_mean([d[m][i] for i in idx]) for d in items]) for m in ("rougeL", "em")}
                     for g, idx in sorted(groups.items())}
        if per_device_home:
            for where in ("home", "foreign"):
                out[where] = {m: _mean([_mean([d[m][i] for i, r in enumerate(records)
                                               if (r.domain == self.homes[k]) == (where == "home")])
                                        for k, d in enumerate(items)]) for m in ("rougeL", "em")}
        return out

    def slms(self, models: Sequence[Model], split: str = "validation") -> dict[str, Any]:
        """`models`: one per device, or a single one all devices share."""
        if split == "test":
            self.test_reads += 1
        shared = self._items(models[0], split) if len(models) == 1 else None
        items = [shared] * len(self.homes) if shared else [self._items(m, split) for m in models]
        out = self._summary(items, split, per_device_home=True)
        if split == "test":
            out["items"] = items[:1] if shared else items
        return out

    def llm(self, model: Model, split: str = "validation") -> dict[str, Any]:
        if split == "test":
            self.test_reads += 1
        items = self._items(model, split)
        out = self._summary([items], split, per_device_home=False)
        if split == "test":
            out["items"] = [items]
            out["general_nll"] = self.general_nll(model)
        return out

    def general_nll(self, model: Model) -> list[list[float]]:
        """Per general held-out record: [summed loss, tokens]."""
        from common.ml.evaluate import response_nll

        started = time.perf_counter()
        try:
            return [[round(n, 5), c] for n, c in response_nll(model[0], model[1], self.general)]
        finally:
            self.seconds += time.perf_counter() - started


def item_scores(result: dict[str, Any], homes: Sequence[str] | None = None,
                       records: Sequence[Any] | None = None, metric: str = "rougeL") -> list[float]:
    """Per test item, the score averaged over devices; with `homes` and `records`, only the devices
    whose home is the item's domain count, and items no device calls home are NaN."""
    items = result["items"]
    n = len(items[0][metric])
    if homes is None:
        return [_mean([d[metric][i] for d in items]) for i in range(n)]
    if len(items) == 1:
        items = items * len(homes)
    return [_mean([d[metric][i] for k, d in enumerate(items) if homes[k] == records[i].domain]) for i in range(n)]
