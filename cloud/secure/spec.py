"""Which runs can aggregate securely, and what the devices are told to do it.

Secure aggregation reveals only the weighted sum of a round's updates, so everything that needs
one update on its own is refused with it: the robust rules (median, trimmed mean), norm bounds
and weight-share caps, exact SVD aggregation of the LoRA products, and the factor-gap figure
(which is then simply not reported). Factor averaging and FFA-LoRA need only the sum.
"""

from __future__ import annotations

from common.protocol import AggregationRule, RunSpec, SecureAggregationTask
from common.secagg.ring import fraction_bits

# With two devices the sum minus one's own update is the other's: nothing is hidden.
MIN_DEVICES = 3


def weight_cap(spec: RunSpec) -> int:
    """The largest weight an update carries: its sample count capped by the run, or 1 under local
    DP (where the sample count is private and every update weighs the same)."""
    return 1 if spec.privacy is not None else spec.max_samples_per_update


def secure_aggregation_problem(spec: RunSpec) -> str | None:
    """Why this run cannot aggregate securely; None when it can (or does not ask to)."""
    secure = spec.secure_aggregation
    if secure is None:
        return None
    agg = spec.aggregation
    needs_each = []
    if agg.rule is not AggregationRule.mean:
        needs_each.append(f"aggregation.rule {agg.rule.value!r} (coordinate-wise over individual updates)")
    if agg.norm_bound is not None:
        needs_each.append("aggregation.norm_bound (measures each update's change)")
    if agg.max_weight_share is not None:
        needs_each.append("aggregation.max_weight_share (lowers weights against the others', which the devices "
                          "must apply before masking)")
    if spec.lora.aggregation == "svd":
        needs_each.append("lora.aggregation 'svd' (the products B·A of each update)")
    if spec.update_encoding != "fp32":
        needs_each.append(f"update_encoding {spec.update_encoding!r} (secure aggregation has its own fixed-point "
                          "encoding, 8 bytes per value)")
    if needs_each:
        return ("secure_aggregation reveals only the sum of a round's updates, and these need each update on its "
                f"own: {'; '.join(needs_each)}. Remove them, or turn secure_aggregation off")
    if spec.min_clients < MIN_DEVICES:
        return (f"secure_aggregation with min_clients = {spec.min_clients}: in a round of two devices each learns "
                f"the other's update from the sum; set min_clients to at least {MIN_DEVICES}")
    try:
        fraction_bits(spec.max_devices * weight_cap(spec), secure.clip)
    except ValueError as exc:
        return f"secure_aggregation: {exc}; lower max_samples_per_update, max_devices or secure_aggregation.clip"
    return None


def device_task(spec: RunSpec) -> SecureAggregationTask | None:
    """What each device is told (ClientTask.secure_aggregation)."""
    secure = spec.secure_aggregation
    if secure is None:
        return None
    cap = weight_cap(spec)
    return SecureAggregationTask(clip=secure.clip, fraction_bits=fraction_bits(spec.max_devices * cap, secure.clip),
                                 weight_cap=cap, threshold_fraction=secure.threshold_fraction)
