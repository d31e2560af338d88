"""The LoRA side of aggregation: each adapted module's product B·A (ARCHITECTURE.md, "LoRA
aggregation").

FedAvg of the factors gives mean(B)·mean(A), which is not mean(B·A). This module measures that
gap, re-factorises the exact mean of the products for `LoraSpec.aggregation == "svd"`, and
checks that FFA-LoRA updates (`"ffa"`) left their frozen A factors alone.

The products are streamed like the weighted mean: one update's tensors at a time, into one
float64 accumulator per module (out x in). Modules are taken in groups whose accumulators fit in
PRODUCT_BLOCK_BYTES, one pass over the (memory-mapped) updates per group, so memory stays bounded
whatever the model size (a single module larger than the block is a group of its own).
The scaling alpha/r is the same for every update and every module, so it is left out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from common.ml.lora import frozen_factor
from common.tensorfile import Schema, TensorFileError

PRODUCT_BLOCK_BYTES = 256 * 2**20

# One update as the product pass reads it: its weight and a getter of its (bounded, float64)
# tensors by name. A source yields the round's updates, one at a time, each time it is called.
Tensor = Callable[[str], np.ndarray]
UpdateSource = Callable[[], Iterator[tuple[float, Tensor]]]


@dataclass(frozen=True)
class Module:
    a: str  # lora_A: (r, in)
    b: str  # lora_B: (out, r)
    rows: int  # out
    cols: int  # in
    rank: int  # r


def lora_modules(schema: Schema) -> dict[str, Module]:
    """The adapted modules of an update schema: each lora_A tensor with its lora_B partner, when
    their shapes make a product (B (out, r) @ A (r, in)). Tensors that pair with nothing (another
    method's values, say) have no module and are aggregated as they are."""
    modules: dict[str, Module] = {}
    for name, (shape_a, _dtype) in schema.items():
        head, sep, tail = name.rpartition("lora_A")
        if not sep or (head and not head.endswith(".")) or (tail and not tail.startswith(".")):
            continue
        partner = f"{head}lora_B{tail}"
        if partner not in schema:
            continue
        shape_b = schema[partner][0]
        if len(shape_a) != 2 or len(shape_b) != 2 or shape_a[0] != shape_b[1]:
            continue
        modules[head.rstrip(".") or name] = Module(name, partner, shape_b[0], shape_a[1], shape_a[0])
    return modules


def check_frozen_factors(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                         aggregation: str) -> None:
    """Under 'ffa', raise TensorFileError (code `frozen_factor_changed`) unless every frozen
    tensor (lora_A) of `arrays` is bit for bit the round's starting one in `reference`."""
    for name, arr in arrays.items():
        if not frozen_factor(name, aggregation):
            continue
        ref = reference[name]
        if arr.shape != ref.shape or arr.dtype != ref.dtype or arr.tobytes() != ref.tobytes():
            diff = float(np.max(np.abs(np.asarray(arr, np.float64) - np.asarray(ref, np.float64)), initial=0.0))
            raise TensorFileError(
                "frozen_factor_changed",
                f"this run's LoRA aggregation is 'ffa': every lora_A stays at the round's adapter, but {name} "
                f"differs from it (largest change {diff:.3g})",
                "train only the lora_B factors: attach LoRA with the run's lora spec (its `aggregation` freezes "
                "lora_A), and leave A out of any clipping or noise")


@dataclass
class ProductResult:
    """What the product pass found: the SVD factors (svd only) and the round's figures."""

    factors: dict[str, np.ndarray]
    figures: dict[str, float | None]


def product_pass(modules: Mapping[str, Module], source: UpdateSource, *, svd: bool,
                 block_bytes: int = PRODUCT_BLOCK_BYTES) -> ProductResult:
    """Stream the updates into each module's weighted mean of B·A (float64) and report:

    - `lora_factor_gap`: ||mean(B·A) - mean(B)·mean(A)|| / ||mean(B·A)||, Frobenius over all
      modules together: how far averaging the factors is from averaging the products.
    - with `svd`, `lora_svd_residual`: ||mean(B·A) - B'·A'|| / ||mean(B·A)||, where B' = U_r·sqrt(S_r),
      A' = sqrt(S_r)·V_r^T is the best rank-r approximation of mean(B·A); the factors are returned
      (float32, under the lora_A / lora_B names).

    A ratio is None when mean(B·A) is zero everywhere.
    """
    factors: dict[str, np.ndarray] = {}
    mean_sq = gap_sq = residual_sq = 0.0
    for group in _groups(modules, block_bytes):
        products = {m: np.zeros((modules[m].rows, modules[m].cols)) for m in group}
        sum_a = {m: np.zeros((modules[m].rank, modules[m].cols)) for m in group}
        sum_b = {m: np.zeros((modules[m].rows, modules[m].rank)) for m in group}
        total = 0.0
        for weight, tensor in source():
            total += weight
            for m in group:
                a, b = tensor(modules[m].a), tensor(modules[m].b)
                products[m] += (b * weight) @ a
                sum_a[m] += a * weight
                sum_b[m] += b * weight
        if total <= 0:
            raise ValueError("no updates with weight to aggregate")
        for m in group:
            mean = products.pop(m) / total
            mean_sq += float(np.square(mean).sum())
            gap_sq += float(np.square(mean - (sum_b[m] / total) @ (sum_a[m] / total)).sum())
            if svd:
                new_b, new_a, residual = truncated_factors(mean, modules[m].rank, sum_a[m] / total)
                residual_sq += residual
                factors[modules[m].b], factors[modules[m].a] = new_b.astype(np.float32), new_a.astype(np.float32)
            del mean
    figures: dict[str, float | None] = {"lora_factor_gap": _ratio(gap_sq, mean_sq)}
    if svd:
        figures["lora_svd_residual"] = _ratio(residual_sq, mean_sq)
    return ProductResult(factors, figures)


def truncated_factors(mean: np.ndarray, rank: int, mean_a: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(B', A', squared residual) of the best rank-`rank` approximation of `mean` (Eckart-Young):
    B' = U_r·sqrt(S_r), A' = sqrt(S_r)·V_r^T, float64 (numpy's SVD of the float64 mean).

    Directions past `mean`'s numerical rank carry nothing: their column of B' is zero, so B'·A'
    is unchanged, and their row of A' is a unit singular vector scaled like the averaged A's rows
    (or that row itself when there is no such vector), so that training can still move B there
    (with both factors zero, no gradient would ever reach that direction again).
    """
    u, s, vt = np.linalg.svd(mean, full_matrices=False)
    keep = min(rank, s.size)
    residual = float(np.square(s[keep:]).sum())
    tol = (s[0] if s.size else 0.0) * max(mean.shape) * np.finfo(np.float64).eps
    live = int(np.count_nonzero(s[:keep] > tol))
    root = np.sqrt(s[:live])
    new_b = np.zeros((mean.shape[0], rank))
    new_a = np.array(mean_a, dtype=np.float64, copy=True)
    new_b[:, :live] = u[:, :live] * root
    new_a[:live] = root[:, None] * vt[:live]
    row_norm = math.sqrt(float(np.square(mean_a).sum()) / max(1, rank))
    new_a[live:keep] = vt[live:keep] * row_norm
    return new_b, new_a, residual


def _groups(modules: Mapping[str, Module], block_bytes: int) -> Iterable[list[str]]:
    group: list[str] = []
    used = 0
    for name, m in modules.items():
        size = 8 * (m.rows * m.cols + m.rank * (m.rows + m.cols))
        if group and used + size > block_bytes:
            yield group
            group, used = [], 0
        group.append(name)
        used += size
    if group:
        yield group


def _ratio(num_sq: float, den_sq: float) -> float | None:
    if den_sq <= 0:
        return None
    return float(f"{math.sqrt(num_sq / den_sq):.6g}")


def lora_aggregation_problem(aggregation: str, rule: str, not_adapter: str | None) -> str | None:
    """Why a run cannot use LoRA aggregation `aggregation` with aggregation rule `rule` (None when
    it can). `not_adapter` says what the method's devices upload when that is not an adapter."""
    if aggregation == "factors":
        return None
    if not_adapter is not None:
        return (f"lora.aggregation {aggregation!r} works on the LoRA factors of uploaded adapters; {not_adapter}: "
                "use lora.aggregation 'factors'")
    if aggregation == "svd" and rule != "mean":
        return (f"lora.aggregation 'svd' re-factorises the weighted mean of the devices' products B·A, and "
                f"aggregation.rule {rule!r} takes no such mean: use rule 'mean' (norm_bound and max_weight_share "
                "still bound what one device can do), or lora.aggregation 'factors' or 'ffa'")
    return None
