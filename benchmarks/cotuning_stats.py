"""Paired bootstrap intervals for the quality benchmark's claims.

A difference is measured on the same test items for both methods. One bootstrap replicate
resamples, hierarchically, world seeds, then training seeds within each drawn world, then test
items within each drawn world (the same items for both sides of the pair). numpy's generator is
seeded, so the intervals are reproducible. Written here rather than taken from scipy.stats.bootstrap
because that one resamples a single level of independent observations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

# worlds -> training seeds -> one value per test item (NaN: the item does not count)
Cells = Mapping[str, Mapping[str, Sequence[float]]]
REPLICATES = 2000


@dataclass(frozen=True)
class Interval:
    estimate: float
    lo: float
    hi: float

    def as_list(self) -> list[float]:
        return [self.lo, self.hi]


def _arrays(cells: Cells) -> dict[str, np.ndarray]:
    """world -> array (seeds x items)."""
    out = {}
    for world, by_seed in sorted(cells.items()):
        rows = [np.asarray(by_seed[s], dtype=np.float64) for s in sorted(by_seed)]
        if len({r.shape for r in rows}) != 1:
            raise ValueError(f"world {world}: seeds were scored on different numbers of items")
        out[world] = np.stack(rows)
    return out


def _resample_means(arrays: Sequence[dict[str, np.ndarray]], rng: np.random.Generator) -> list[float]:
    """One replicate: the resampled mean of each statistic, all under the same draw."""
    worlds = sorted(arrays[0])
    drawn = rng.choice(len(worlds), size=len(worlds), replace=True)
    sums = [0.0] * len(arrays)
    counts = [0] * len(arrays)
    for w in drawn:
        name = worlds[w]
        seeds, items = arrays[0][name].shape
        s_idx = rng.choice(seeds, size=seeds, replace=True)
        i_idx = rng.choice(items, size=items, replace=True)
        for k, arr in enumerate(arrays):
            block = arr[name][np.ix_(s_idx, i_idx)]
            ok = ~np.isnan(block)
            sums[k] += float(block[ok].sum())
            counts[k] += int(ok.sum())
    return [s / c if c else math.nan for s, c in zip(sums, counts, strict=True)]


def _point(arrays: dict[str, np.ndarray]) -> float:
    values = np.concatenate([a.ravel() for a in arrays.values()])
    return float(np.nanmean(values))


def bootstrap(stats: Sequence[Cells], combine: Callable[..., float], seed: int = 0,
              replicates: int = REPLICATES) -> Interval:
    """Point estimate and 95% percentile interval of `combine(mean_1, ..., mean_k)`, where mean_j is
    the mean of `stats[j]` over every (world, seed, item) cell, all resampled together."""
    arrays = [_arrays(c) for c in stats]
    if len({tuple((w, a.shape) for w, a in sorted(arr.items())) for arr in arrays}) != 1:
        raise ValueError("paired statistics need the same worlds, seeds and items")
    rng = np.random.default_rng(seed)
    estimate = combine(*[_point(a) for a in arrays])
    values = np.array([combine(*_resample_means(arrays, rng)) for _ in range(replicates)])
    values = values[np.isfinite(values)]
    if values.size == 0:
        return Interval(estimate, math.nan, math.nan)
    lo, hi = np.percentile(values, [2.5, 97.5])
    return Interval(estimate, float(lo), float(hi))


def paired_difference(a: Cells, b: Cells, seed: int = 0) -> Interval:
    """Mean of a - b on paired items, with its interval."""
    diff = {w: {s: [x - y for x, y in zip(a[w][s], b[w][s], strict=True)] for s in a[w]} for w in a}
    return bootstrap([diff], lambda d: d, seed=seed)


def share(gain: Cells, reference: Cells, base: Cells, seed: int = 0) -> Interval:
    """(gain - base) / (reference - base), e.g. the part of Centralized's gain a method reaches."""
    def ratio(g: float, r: float, b: float) -> float:
        return (g - b) / (r - b) if r != b else math.nan
    return bootstrap([gain, reference, base], ratio, seed=seed)


def nll_change(after: Cells, after_tokens: Cells, before: Cells, before_tokens: Cells, seed: int = 0) -> Interval:
    """Relative perplexity change exp(nll_after / tok - nll_before / tok) - 1 over paired texts."""
    def change(na: float, ta: float, nb: float, tb: float) -> float:
        return math.exp(na / ta - nb / tb) - 1.0
    return bootstrap([after, after_tokens, before, before_tokens], change, seed=seed)
