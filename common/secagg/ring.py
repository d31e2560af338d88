"""Fixed-point quantisation of an update to the ring Z_2^64, where masks cancel exactly.

A device clips every value to [-clip, clip], scales it by 2^f, rounds to an integer and
multiplies by its aggregation weight (its sample count, capped as the run caps it). The sum of
such integers over every device of a run fits a signed 63-bit integer by construction (f is
chosen from the run's largest possible total weight), so summing in Z_2^64 and reading the sum
back as int64 gives the exact integer sum. The coordinator divides by 2^f and the total weight:
each coordinate of the weighted mean is then within 2^-(f+1) of the mean of the clipped values.

Vectors are flat, in the order of `layout`: the tensor names sorted, each tensor row-major.
Masked uploads travel as int64 tensors of the adapter's names and shapes (the same 64 bits).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

RING_BITS = 64
# Headroom below 2^63: the sum's magnitude stays under 2^62, so no rounding of the bound can wrap.
_SUM_BITS = 62
# Beyond this, float64 (53-bit mantissa) products would stop being exact integers.
MAX_FRACTION_BITS = 40
MIN_FRACTION_BITS = 8

Layout = Sequence[tuple[str, tuple[int, ...]]]


def fraction_bits(max_total_weight: float, clip: float) -> int:
    """The fractional bits f such that `max_total_weight` x `clip` x 2^f < 2^62; ValueError when
    fewer than 8 would remain (the run's weights are too large to aggregate precisely)."""
    if max_total_weight < 1 or clip <= 0:
        raise ValueError("the total weight must be at least 1 and the clip range positive")
    bits = min(MAX_FRACTION_BITS, _SUM_BITS - math.ceil(math.log2(max_total_weight * clip)))
    if bits < MIN_FRACTION_BITS:
        raise ValueError(f"a total weight of {max_total_weight:g} with values up to {clip:g} leaves {bits} "
                         f"fractional bits in a {RING_BITS}-bit ring; at least {MIN_FRACTION_BITS} are needed")
    return bits


def error_bound(frac_bits: int) -> float:
    """The largest difference, per coordinate, between the unmasked weighted mean and the
    weighted mean of the clipped values: half a quantisation step."""
    return 2.0 ** -(frac_bits + 1)


def layout_of(schema: Mapping[str, tuple[Sequence[int], str]]) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(schema[name][0])) for name in sorted(schema)]


def size_of(layout: Layout) -> int:
    return sum(math.prod(shape) for _, shape in layout)


def quantize(arrays: Mapping[str, np.ndarray], layout: Layout, weight: int, clip: float,
             frac_bits: int) -> tuple[np.ndarray, int]:
    """The weighted update as a flat vector of Z_2^64 (uint64), and how many values were clipped."""
    if weight < 1:
        raise ValueError(f"an aggregation weight is a positive integer, got {weight}")
    flat = np.concatenate([np.asarray(arrays[name], dtype=np.float64).reshape(-1) for name, _ in layout])
    clipped = int(np.count_nonzero(np.abs(flat) > clip))
    scaled = np.rint(np.clip(flat, -clip, clip) * 2.0 ** frac_bits).astype(np.int64)
    return (scaled * np.int64(weight)).view(np.uint64), clipped


def dequantize(total: np.ndarray, total_weight: float, frac_bits: int) -> np.ndarray:
    """The weighted mean (float64) from the unmasked sum of the weighted, quantised updates."""
    return total.view(np.int64).astype(np.float64) / (2.0 ** frac_bits * total_weight)


def unflatten(flat: np.ndarray, layout: Layout, dtype: np.dtype | str = np.float32) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    offset = 0
    for name, shape in layout:
        n = math.prod(shape)
        out[name] = flat[offset:offset + n].reshape(shape).astype(dtype)
        offset += n
    if offset != flat.size:
        raise ValueError(f"a vector of {flat.size} values does not fill a layout of {offset}")
    return out
