"""Typed device metrics: the reports a device handler attaches to its update.

Known keys are typed, so a malformed figure (an epsilon that is not a number) fails
validation; unknown keys are kept, so a newer device can report more than this coordinator
knows. Reports from the training code (common.ml) are loose dicts; these models name the
figures the coordinator reads.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class _Report(BaseModel):
    model_config = ConfigDict(extra="allow")


class TrainReport(_Report):
    """common.ml.train.train_lora's report."""

    steps: int = Field(ge=0)
    num_samples: int = Field(ge=0)
    seconds: float = Field(ge=0)
    loss_first: float | None = None
    loss_last: float | None = None
    loss_mean: float | None = None


class Scores(_Report):
    """Mean Rouge-L and exact match over `n` examples (common.metrics.score)."""

    rougeL: float = Field(ge=0, le=1)  # noqa: N815 - the key the scorer writes
    em: float = Field(ge=0, le=1)
    n: int = Field(ge=0)


class EvalReport(Scores):
    """common.ml.evaluate.evaluate's scores on the device's held-out data."""

    per_domain: dict[str, Scores] | None = None


class PrivacyReport(_Report):
    """Local DP spent so far by this device in the run (edge_sdk.privacy)."""

    epsilon: float | None = Field(None, ge=0, description="None: no finite guarantee (no noise)")
    delta: float = Field(gt=0, lt=1)
    releases: int = Field(ge=0)
    clip_norm: float = Field(gt=0)
    noise_multiplier: float = Field(ge=0)
    update_norm: float | None = Field(None, ge=0)
    clipped: bool | None = None


class DeviceMetrics(_Report):
    """What every handler may report; a method's model adds its own keys."""

    local_eval_before: EvalReport | None = None
    local_eval_after: EvalReport | None = None
    privacy: PrivacyReport | None = None


class LoraSftMetrics(DeviceMetrics):
    """The `lora_sft` handler: local SFT of the shared SLM's adapter."""

    train: TrainReport | None = None


class OwnSlmMetrics(DeviceMetrics):
    """Handlers that train the device's own SLM, whatever its architecture."""

    slm_arch: str | None = Field(None, max_length=64)
