"""Co-PLMs' contract (Liu et al., arXiv 2511.11678), reconstructed from its abstract: devices
co-tune their own SLM (any architecture) with a shared distilled proxy model (the DPM) and
upload only the proxy's adapter; the server distils between the LLM and the averaged proxy
(ARCHITECTURE.md, "Methods"). A device's SLM never leaves it, so devices make the edge builds.

With `params.saml_data = "private+prompts"` the server also publishes an unlabelled in-domain
prompt set (`coplms/saml_prompts.jsonl`: JSONL, one `{"prompt"}` with optional `domain` per
line, no responses) and devices add it to their mutual-learning data.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
# With params.saml_data = "private+prompts": the unlabelled prompts devices add to SAML.
SAML_PROMPTS = "coplms/saml_prompts.jsonl"
# New tokens of the SLM's greedy answer to an unlabelled prompt: the positions its KL covers.
SAML_ANSWER_TOKENS = 16


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
    prompts: int | None = Field(None, ge=0, description="unlabelled prompts learned from (KL only), when published")


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
    client_artifacts=(SAML_PROMPTS,),
    params=CoPlmsDeviceParams,
    device_metrics=CoPlmsMetrics,
    builds_on="device",
    llm_adapter=LLM_ADAPTER,
)

def prompts_to_bytes(prompts: Sequence[tuple[str, str | None]]) -> bytes:
    """The SAML prompt set's wire format from (prompt, domain) pairs."""
    lines = [json.dumps({"prompt": p} if d is None else {"prompt": p, "domain": d}, ensure_ascii=False,
                        sort_keys=True) for p, d in prompts]
    return "".join(line + "\n" for line in lines).encode("utf-8")


def prompts_from_bytes(data: bytes) -> list[str]:
    """The prompts of a SAML prompt set; ValueError naming the line when one is malformed."""
    out: list[str] = []
    for line_no, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompt = json.loads(line)["prompt"]
            if not isinstance(prompt, str):
                raise TypeError("prompt must be a string")
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"SAML prompt set line {line_no}: {exc}") from None
        out.append(prompt)
    return out


register_method(CONTRACT, strategy="cloud.strategies.coplms:CoPlms", handler="edge_sdk.handlers.coplms:CoPlmsHandler")
