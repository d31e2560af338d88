"""Typed device metrics: the reports a device handler attaches to its update.

Known keys are typed, so a malformed figure (an epsilon that is not a number, a count below 0)
fails validation; numbers must be numbers (strict: "1.5" is not an epsilon). Unknown keys are
kept, so a newer device can report more than this coordinator knows. Reports from the training
code (common.ml) are loose dicts; these models name the figures the coordinator reads.

A device writes these, so they are bounded before anything else looks at them (ARCHITECTURE.md,
"Privacy"): `bounded_json` walks the whole report first, unknown keys included, and refuses one
that nests deeper than MAX_DEPTH, holds more than MAX_ITEMS entries in one object or list or
MAX_NODES values in all, keys longer than MAX_KEY or strings longer than MAX_STRING characters,
more than MAX_TEXT characters in all, or integers beyond +-2**53. A number that is not finite
(NaN, +-inf: what the training code writes for a figure it could not measure) becomes null, so
no NaN or inf reaches the stored metrics or a round's figures. `checked_metrics` is what the
coordinator stores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_DEPTH = 8
MAX_ITEMS = 256
MAX_NODES = 4096
MAX_KEY = 128
MAX_STRING = 1024
MAX_TEXT = 32 * 1024
# The largest integer every JSON reader keeps exactly.
MAX_INT = 2**53

# A count a device reports (steps, samples, releases): whole, >= 0, exact in JSON.
_COUNT = {"ge": 0, "le": MAX_INT}


@dataclass
class _Budget:
    nodes: int = 0
    text: int = 0

    def take_text(self, value: str, limit: int = MAX_STRING, what: str = "a string") -> None:
        if len(value) > limit:
            raise ValueError(f"{what} longer than {limit} characters")
        self.text += len(value)
        if self.text > MAX_TEXT:
            raise ValueError(f"more than {MAX_TEXT} characters of text in all")


def bounded_json(value: Any) -> Any:
    """A copy of `value` (a JSON value as json.loads gives it) within the bounds above, with
    non-finite numbers as None; ValueError naming the bound it breaks (never the input)."""
    return _walk(value, 0, _Budget())


def _walk(value: Any, depth: int, budget: _Budget) -> Any:
    # Recursion is safe here: it stops at MAX_DEPTH, long before Python's limit.
    budget.nodes += 1
    if budget.nodes > MAX_NODES:
        raise ValueError(f"more than {MAX_NODES} values in all")
    if value is None or isinstance(value, bool):
        return value
    if isinstance(value, int):
        if abs(value) > MAX_INT:
            raise ValueError("an integer beyond +-2**53")
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, str):
        budget.take_text(value)
        return value
    if not isinstance(value, (dict, list, tuple)):
        raise ValueError(f"a value of type {type(value).__name__}, which JSON does not have")
    if depth >= MAX_DEPTH:
        raise ValueError(f"objects or lists nested more than {MAX_DEPTH} deep")
    if len(value) > MAX_ITEMS:
        raise ValueError(f"an object or list of more than {MAX_ITEMS} entries")
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError("an object key that is not a string")
            budget.take_text(key, MAX_KEY, "an object key")
            out[key] = _walk(item, depth + 1, budget)
        return out
    return [_walk(item, depth + 1, budget) for item in value]


def checked_metrics(schema: type[BaseModel], value: Any) -> dict[str, Any]:
    """Bound and validate a device's metrics against its method's schema; what to store.

    Raises pydantic's ValidationError (or ValueError for a bound) saying what is wrong. The
    result is the validated report as JSON values, only the keys the device sent (unknown ones
    kept), with every figure of its declared type and no NaN or inf.
    """
    report = schema.model_validate(bounded_json(value))
    return report.model_dump(mode="json", exclude_unset=True)


class _Report(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True, allow_inf_nan=False)


class TrainReport(_Report):
    """common.ml.train.train_lora's report."""

    steps: int = Field(**_COUNT)
    num_samples: int = Field(**_COUNT)
    seconds: float = Field(ge=0)
    loss_first: float | None = None
    loss_last: float | None = None
    loss_mean: float | None = None


class Scores(_Report):
    """Mean Rouge-L and exact match over `n` examples (common.metrics.score)."""

    rougeL: float = Field(ge=0, le=1)  # noqa: N815 - the key the scorer writes
    em: float = Field(ge=0, le=1)
    n: int = Field(**_COUNT)


class EvalReport(Scores):
    """common.ml.evaluate.evaluate's scores on the device's held-out data."""

    per_domain: dict[str, Scores] | None = Field(None, max_length=MAX_ITEMS)


class PrivacyReport(_Report):
    """Local DP spent so far by this device in the run (edge_sdk.privacy)."""

    epsilon: float | None = Field(None, ge=0, description="None: no finite guarantee (no noise)")
    delta: float = Field(gt=0, lt=1)
    releases: int = Field(**_COUNT)
    clip_norm: float = Field(gt=0)
    noise_multiplier: float = Field(ge=0)
    update_norm: float | None = Field(None, ge=0)
    clipped: bool | None = None


class DeviceMetrics(_Report):
    """What every handler may report; a method's model adds its own keys. The whole report is
    bounded (bounded_json) before its fields are validated."""

    local_eval_before: EvalReport | None = None
    local_eval_after: EvalReport | None = None
    privacy: PrivacyReport | None = None

    @model_validator(mode="before")
    @classmethod
    def _bounded(cls, data: Any) -> Any:
        return bounded_json(data) if isinstance(data, dict) else data


class LoraSftMetrics(DeviceMetrics):
    """The `lora_sft` handler: local SFT of the shared SLM's adapter."""

    train: TrainReport | None = None


class OwnSlmMetrics(DeviceMetrics):
    """Handlers that train the device's own SLM, whatever its architecture."""

    slm_arch: str | None = Field(None, max_length=64)
