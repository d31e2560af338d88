"""Aggregation rules: how a round's updates become one, so that a minority of hostile devices
cannot steer the result (ARCHITECTURE.md, "Round state machine").

- Weights: an update weighs its declared sample count, clipped to the run's
  `max_samples_per_update`; with `aggregation.max_weight_share`, the largest weights are then
  lowered together (water-filling) until none carries more than that share of the round's total.
- Norm bounding (`aggregation.norm_bound`): an update's change from the round's starting
  adapter is scaled down to that L2 norm, over all its tensors together, before any rule sees it.
- Rules: `mean` is weighted and streamed (one float64 accumulator per tensor, one update mapped
  at a time). `median` and `trimmed_mean` are coordinate-wise and give every update one vote;
  they need all updates at once, so the updates are written into one memory-mapped float32
  stack on disk (updates x coordinates) and reduced one block of coordinates at a time.
- LoRA (`LoraSpec.aggregation`, cloud/strategies/lora_products.py): `factors` aggregates A and B
  like any tensor; `ffa` takes every lora_A from the round's starting adapter, bit for bit, and
  refuses an update whose A changed; `svd` (rule `mean` only) replaces each module's factors by
  the rank-r SVD factorisation of the weighted mean of the products B·A. Every mode reports the
  factor-averaging gap `lora_factor_gap` (a second streamed pass over the updates).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cloud.strategies.lora_products import check_frozen_factors, lora_modules, product_pass
from common.ml.lora import frozen_factor
from common.protocol import AggregationRule, AggregationSpec
from common.tensorfile import Schema, check_schema, load_arrays, read_header

# float64 working memory for one block of coordinates in the robust rules: the block and the
# sorted copy the reduction makes. Bounded whatever the model size and the number of updates.
BLOCK_BYTES = 32 * 2**20

Arrays = Mapping[str, np.ndarray]
Reducer = Callable[[np.ndarray], np.ndarray]
Check = Callable[[Arrays], None]
# Reads one update as float32 tensors of the schema (an encoded upload decoded: common/encoding.py).
Reader = Callable[[Path], Arrays]


@dataclass(frozen=True)
class UpdateFile:
    path: Path
    num_samples: int


@dataclass(frozen=True)
class Aggregate:
    """A round's aggregate and what the round reports about how it was made."""

    arrays: dict[str, np.ndarray]
    figures: dict[str, Any] = field(default_factory=dict)


def capped_weights(samples: Sequence[int], max_samples: int, max_share: float | None = None) -> list[float]:
    """Each update's weight: its sample count clipped to `max_samples`, then, with `max_share`,
    the largest weights lowered to one common level c chosen so that c is `max_share` of the
    new total (water-filling); smaller weights keep their value.

    When `max_share` x updates <= 1 only equal weights meet it (or none can): every update then
    weighs the same, the smallest weight.
    """
    weights = [float(min(n, max_samples)) for n in samples]
    if max_share is None or max_share >= 1 or not weights:
        return weights
    n = len(weights)
    if n * max_share <= 1:
        return [min(weights)] * n
    ordered = sorted(weights, reverse=True)
    rest = math.fsum(ordered)
    for k in range(n):  # k = how many of the largest weights are lowered to c
        if k * max_share >= 1:  # k weights at share s would leave nothing for the rest
            break
        if k:
            rest -= ordered[k - 1]
        # c = share * (k * c + rest)  =>  c = share * rest / (1 - k * share)
        level = max_share * rest / (1 - k * max_share)
        if ordered[k] <= level:  # the largest weight left alone already fits: c is found
            return [min(w, level) for w in weights]
    return [min(weights)] * n  # reached only by rounding: equal weights always meet the cap


def aggregate(updates: Iterable[UpdateFile], schema: Schema, spec: AggregationSpec, max_samples: int, *,
              reference: Path | None = None, scratch: Path | None = None, lora: str = "factors",
              factor_gap: bool = True, read: Reader | None = None) -> Aggregate:
    """Aggregate `updates` (each checked against `schema`) under `spec`.

    `reference` is the round's starting adapter, needed for norm bounding and for `lora == "ffa"`;
    `scratch` is where the robust rules keep their memory-mapped stack (a directory on the data
    disk). `lora` is the run's `LoraSpec.aggregation`. `factor_gap` adds the figure
    `lora_factor_gap`, which needs every update on its own (not only their sum); `svd` reports it
    whatever `factor_gap` says, since it reads every update anyway. `read` turns an update file
    into its tensors (default: the file's own tensors, checked against `schema`).
    """
    read = read if read is not None else (lambda path: _read(path, schema))
    files = list(updates)
    if not files:
        raise ValueError("no updates to aggregate")
    if lora == "svd" and spec.rule is not AggregationRule.mean:
        raise ValueError(f"LoRA aggregation 'svd' re-factorises a weighted mean; rule {spec.rule.value!r} has none")
    bound = spec.norm_bound
    start: Arrays | None = None
    if bound is not None or lora == "ffa":
        if reference is None:
            raise ValueError("norm bounding and LoRA aggregation 'ffa' need the round's starting adapter")
        start = _read(reference, schema)
    check: Check | None = None
    if lora == "ffa":
        first: Arrays = start if start is not None else {}

        def check(arrays: Arrays) -> None:
            check_frozen_factors(arrays, first, lora)

    figures: dict[str, Any] = {"rule": spec.rule.value, "updates": len(files)}
    if spec.rule is AggregationRule.mean:
        weights = capped_weights([f.num_samples for f in files], max_samples, spec.max_weight_share)
        arrays, scales = _weighted_mean(files, weights, read, start if bound is not None else None, bound, check)
        total = math.fsum(weights)
        figures["weights_capped"] = sum(w < f.num_samples for w, f in zip(weights, files, strict=True))
        figures["weight_share_max"] = round(max(weights) / total, 6)
    else:
        weights = [1.0] * len(files)  # one vote per update, as the rule gives
        reducer = _median if spec.rule is AggregationRule.median else _trimmed_mean(spec.trim)
        arrays, scales = _coordinatewise(files, schema, read, reducer, start if bound is not None else None, bound,
                                         scratch, check)
    if bound is not None:
        figures["norm_clipped"] = sum(scale < 1.0 for scale in scales)
    modules = lora_modules(schema)
    if lora == "svd" and not modules:
        raise ValueError("LoRA aggregation 'svd' needs lora_A / lora_B pairs; these updates have none")
    if modules and (factor_gap or lora == "svd"):
        bounded_start = start if bound is not None else None

        def source() -> Iterator[tuple[float, Callable[[str], np.ndarray]]]:
            for update, weight, scale in zip(files, weights, scales, strict=True):
                tensors = read(update.path)
                yield weight, lambda name, t=tensors, k=scale: _bounded(name, t[name], bounded_start, k)
                del tensors

        result = product_pass(modules, source, svd=lora == "svd")
        arrays.update(result.factors)
        figures.update(result.figures)
    if modules:
        figures["lora_aggregation"] = lora
    if lora == "ffa" and start is not None:
        for name in arrays:
            if frozen_factor(name, lora):
                arrays[name] = np.array(start[name], dtype=np.float32, copy=True)  # bit for bit the start
    return Aggregate(arrays, figures)


def weighted_mean(updates: Iterable[UpdateFile], schema: Schema) -> dict[str, np.ndarray]:
    """Sample-weighted mean of updates, weights as declared, streamed: one update mapped at a time."""
    files = list(updates)
    weights = [float(f.num_samples) for f in files]
    return _weighted_mean(files, weights, lambda path: _read(path, schema), None, None, None)[0]


def _read(path: Path, schema: Schema) -> Arrays:
    header = read_header(path)
    check_schema(header, schema)
    return load_arrays(path, header)


def _scale(arrays: Arrays, start: Arrays | None, bound: float | None) -> float:
    """The factor that brings the update's change from `start` within `bound` (1.0 when it is)."""
    if start is None or bound is None:
        return 1.0
    # One tensor's difference at a time: memory stays one tensor, not one update.
    squares = math.fsum(float(np.square(arr.astype(np.float64) - start[name]).sum()) for name, arr in arrays.items())
    norm = math.sqrt(squares)
    return bound / norm if norm > bound else 1.0


def _bounded(name: str, arr: np.ndarray, start: Arrays | None, scale: float) -> np.ndarray:
    """One tensor of the update in float64, its change from `start` scaled by `scale`."""
    value = arr.astype(np.float64)
    if start is None or scale >= 1.0:
        return value
    base = start[name].astype(np.float64)
    return base + (value - base) * scale


def _weighted_mean(files: Sequence[UpdateFile], weights: Sequence[float], read: Reader, start: Arrays | None,
                   bound: float | None, check: Check | None) -> tuple[dict[str, np.ndarray], list[float]]:
    """Streamed: memory is one float64 accumulator per tensor, whatever the number of updates.
    Returns the mean and each update's norm-bounding scale (1.0: not clipped)."""
    sums: dict[str, np.ndarray] | None = None
    scales: list[float] = []
    for update, weight in zip(files, weights, strict=True):
        arrays = read(update.path)
        if check is not None:
            check(arrays)
        scale = _scale(arrays, start, bound)
        scales.append(scale)
        if sums is None:
            sums = {name: np.zeros(arr.shape, dtype=np.float64) for name, arr in arrays.items()}
        for name, arr in arrays.items():
            sums[name] += _bounded(name, arr, start, scale) * weight
        del arrays
    total = math.fsum(weights)
    if sums is None or total <= 0:
        raise ValueError("no updates with samples to aggregate")
    return {name: (acc / total).astype(np.float32) for name, acc in sums.items()}, scales


def _median(block: np.ndarray) -> np.ndarray:
    return np.median(block, axis=0)


def _trimmed_mean(fraction: float) -> Reducer:
    # Written with numpy rather than scipy.stats.trim_mean (the same rule: floor(fraction * n)
    # dropped at each end) so that the coordinator does not depend on scipy for one sort.
    def reduce(block: np.ndarray) -> np.ndarray:
        n = block.shape[0]
        cut = int(fraction * n)
        return np.sort(block, axis=0)[cut:n - cut].mean(axis=0)

    return reduce


def _coordinatewise(files: Sequence[UpdateFile], schema: Schema, read: Reader, reducer: Reducer, start: Arrays | None,
                    bound: float | None, scratch: Path | None,
                    check: Check | None) -> tuple[dict[str, np.ndarray], list[float]]:
    """Stack every update (float32, on disk, memory-mapped), then reduce blocks of coordinates.

    Memory: the float32 result (4 bytes per parameter) plus one block of at most BLOCK_BYTES;
    disk: 4 bytes per parameter per update, removed when done.
    """
    spans: dict[str, tuple[int, int]] = {}
    size = 0
    for name, (shape, _dtype) in schema.items():
        spans[name] = (size, size + math.prod(shape))
        size += math.prod(shape)
    n = len(files)
    flat = np.empty(size, dtype=np.float32)
    scales: list[float] = []
    if size:
        with tempfile.TemporaryDirectory(dir=scratch, prefix="aggregate-") as tmp:
            stack = np.memmap(Path(tmp) / "stack.f32", dtype=np.float32, mode="w+", shape=(n, size))
            for row, update in enumerate(files):
                arrays = read(update.path)
                if check is not None:
                    check(arrays)
                scale = _scale(arrays, start, bound)
                scales.append(scale)
                for name, arr in arrays.items():
                    lo, hi = spans[name]
                    stack[row, lo:hi] = _bounded(name, arr, start, scale).ravel()
                del arrays
            # Two float64 copies of a block (it and its sorted copy) fit in BLOCK_BYTES.
            width = max(1, BLOCK_BYTES // (16 * n))
            for lo in range(0, size, width):
                flat[lo:lo + width] = reducer(np.asarray(stack[:, lo:lo + width], dtype=np.float64))
            del stack  # unmapped before its directory goes
    return {name: flat[lo:hi].reshape(schema[name][0]) for name, (lo, hi) in spans.items()}, scales
