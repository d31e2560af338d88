"""Scoring: exact match and Rouge-L (rouge-score) on normalized text, overall and per domain."""

from __future__ import annotations

import functools
import unicodedata
from collections.abc import Sequence
from typing import Any


def normalize(text: str) -> str:
    """Lowercase, drop punctuation (any Unicode punctuation), collapse whitespace."""
    text = text.lower()
    text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
    return " ".join(text.split())


def exact_match(pred: str, ref: str) -> float:
    """1.0 when the normalized texts are equal, else 0.0."""
    return 1.0 if normalize(pred) == normalize(ref) else 0.0


class _NormalizingTokenizer:
    # rouge-score's default tokenizer drops every non-[a-z0-9] character, which erases
    # non-ASCII words entirely; tokenize the same way exact match normalizes instead.
    def tokenize(self, text: str) -> list[str]:
        return normalize(text).split()


@functools.lru_cache(maxsize=1)
def _scorer() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_NormalizingTokenizer())


def rouge_l(pred: str, ref: str) -> float:
    """Rouge-L F-measure in [0, 1] (longest common subsequence of normalized words)."""
    return float(_scorer().score(ref, pred)["rougeL"].fmeasure)


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values)) if values else 0.0


def score(
    preds: Sequence[str], refs: Sequence[str], domains: Sequence[str | None] | None = None
) -> dict[str, Any]:
    """Mean Rouge-L and exact match (fractions in [0, 1]) and the count.

    With `domains` (one per example), also `per_domain`: {domain: {"rougeL", "em", "n"}};
    examples without a domain are grouped under "unknown".
    """
    if len(preds) != len(refs):
        raise ValueError(f"got {len(preds)} predictions for {len(refs)} references")
    if domains is not None and len(domains) != len(refs):
        raise ValueError(f"got {len(domains)} domains for {len(refs)} references")
    rl = [rouge_l(p, r) for p, r in zip(preds, refs, strict=True)]
    em = [exact_match(p, r) for p, r in zip(preds, refs, strict=True)]
    out: dict[str, Any] = {"rougeL": _mean(rl), "em": _mean(em), "n": len(refs)}
    if domains is not None:
        groups: dict[str, list[int]] = {}
        for i, domain in enumerate(domains):
            groups.setdefault(domain if domain is not None else "unknown", []).append(i)
        out["per_domain"] = {
            domain: {
                "rougeL": _mean([rl[i] for i in idx]),
                "em": _mean([em[i] for i in idx]),
                "n": len(idx),
            }
            for domain, idx in sorted(groups.items())
        }
    return out
