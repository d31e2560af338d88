"""Co-PLMs' contract (Liu et al., arXiv 2511.11678), reconstructed from its abstract: devices
co-tune their own SLM (any architecture) with a shared distilled proxy model (the DPM) and
upload only the proxy's adapter; the server distils between the LLM and the averaged proxy
(ARCHITECTURE.md, "Methods"). A device's SLM never leaves it, so devices make the edge builds.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from common.methods.contract import LLM_PREFIX, MethodContract, adapter_artifact
from common.methods.registry import register_method
from common.methods.reports import OwnSlmMetrics, TrainReport

PROXY_PREFIX = "dpm"
DPM_ADAPTER = adapter_artifact(PROXY_PREFIX)
LLM_ADAPTER = adapter_artifact(LLM_PREFIX)
# Server-only: the report of the proxy's initial distillation, kept for round 0's metrics.
INIT_REPORT = "coplms/init_distill.json"


class CoPlmsDeviceParams(BaseModel):
    """What a device needs to know of a Co-PLMs run, beyond the LoRA and training settings."""

    model_config = ConfigDict(extra="forbid")

    dst_epochs: float | None = Field(
        None, ge=0, description="DST: epochs of plain SFT of the SLM and the proxy; None = the run's train.epochs")
    saml_epochs: float = Field(1.0, ge=0, description="SAML: epochs of mutual learning between SLM and proxy")
    alpha: float = Field(0.5, ge=0, description="weight of the KL term in mutual learning")
    temperature: float = Field(1.0, gt=0)
    top_k: int | None = Field(None, ge=1, description="keep the teacher's top-k probabilities (None: all)")
    token_map: Literal["first_token", "min_edit"] = Field(
        "first_token", description="how ids map when the SLM's tokenizer differs from the proxy's")


class SamlReport(BaseModel):
    """Mutual learning between the device's SLM and the proxy (common.ml.mutual, renamed sides)."""

    model_config = ConfigDict(extra="allow")

    steps: int = Field(ge=0)
    num_samples: int = Field(ge=0)
    seconds: float = Field(ge=0)
    aligned_vocab: list[bool] = Field(default_factory=list, description="per direction: ids mapped across vocabularies")


class CoPlmsMetrics(OwnSlmMetrics):
    dst_slm: TrainReport | None = None
    dst_proxy: TrainReport | None = None
    saml: SamlReport | None = None


CONTRACT = MethodContract(
    name="co-plms",
    task_kind="coplms",
    update_artifact=DPM_ADAPTER,
    published_prefixes=(PROXY_PREFIX, LLM_PREFIX, "coplms"),
    client_prefixes=(PROXY_PREFIX,),
    params=CoPlmsDeviceParams,
    device_metrics=CoPlmsMetrics,
    builds_on="device",
    llm_adapter=LLM_ADAPTER,
)

register_method(CONTRACT, strategy="cloud.strategies.coplms:CoPlms", handler="edge_sdk.handlers.coplms:CoPlmsHandler")
