"""CrossLM's contract (Deng et al., arXiv 2312.05842), reconstructed from its abstract: the
server's LLM writes synthetic samples, devices score them with their own SLMs and upload only
the scores, the LLM learns from the best-scored (ARCHITECTURE.md, "Methods"). A device's SLM
never leaves it, so devices make the edge builds.

The samples' wire format lives here too: JSONL, one task record (`prompt`, `response`,
optional `domain`) per line with optional `group` (the prompt it answers) and `score` (the
devices' aggregated score). Line order is the sample index the score tensors follow. Unlike
task data, a set may be empty (an LLM can fail to answer anything). Whether the LLM answered
pool prompts or wrote whole samples from instructions (`params.synthesis`), a sample is a
task record, and a device scores it the same way.

Upload: two float32 tensors of one value per synthetic sample, `weighted_score` (w * s) and
`weight` (w), where s is the device's score and w its weight for the sample's domain; the
coordinator's sample-weighted mean of both gives each sample's score.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field

from common.methods.contract import LLM_PREFIX, SLM_PREFIX, MethodContract, adapter_artifact
from common.methods.registry import register_method
from common.methods.reports import OwnSlmMetrics, TrainReport
from common.records import TaskRecord, record_from_json

SYNTHETIC = "crosslm/synthetic.jsonl"
SELECTED = "crosslm/selected.jsonl"
# Server-only, with params.synthesis = "samples": the counts of the synthetic set's making
# (instructions, generated, well_formed, unique), kept for the metrics of the round scoring it.
SYNTHESIS_REPORT = "crosslm/synthesis.json"
LLM_ADAPTER = adapter_artifact(LLM_PREFIX)
SCORE_TENSOR = "weighted_score"
WEIGHT_TENSOR = "weight"


class CrossLmDeviceParams(BaseModel):
    """What a device needs to know of a CrossLM run, beyond the LoRA and training settings."""

    model_config = ConfigDict(extra="forbid")

    domain_weighting: bool = Field(True, description="weight each score by the device's share of that domain")
    train_on_selected: bool = Field(True, description="add last round's selected samples to local training")


class CrossLmMetrics(OwnSlmMetrics):
    train: TrainReport | None = None
    selected_used: int | None = Field(None, ge=0)
    synthetic: int | None = Field(None, ge=0)
    score_mean: float | None = None


CONTRACT = MethodContract(
    name="crosslm",
    task_kind="crosslm",
    update_artifact=SYNTHETIC,  # what the uploads answer: one score per sample of this set
    published_prefixes=(SLM_PREFIX, LLM_PREFIX, "crosslm"),
    client_prefixes=(SLM_PREFIX,),
    client_artifacts=(SYNTHETIC, SELECTED),
    update_tensors=(SCORE_TENSOR, WEIGHT_TENSOR),
    params=CrossLmDeviceParams,
    device_metrics=CrossLmMetrics,
    builds_on="device",
    llm_adapter=LLM_ADAPTER,
)


@dataclass(frozen=True)
class Sample:
    record: TaskRecord
    group: int = 0
    score: float | None = None


def samples_to_bytes(samples: Sequence[Sample]) -> bytes:
    lines = []
    for s in samples:
        obj: dict[str, object] = {**s.record.to_dict(), "group": s.group}
        if s.score is not None:
            obj["score"] = round(float(s.score), 6)
        lines.append(json.dumps(obj, ensure_ascii=False, sort_keys=True))
    return ("\n".join(lines) + "\n").encode("utf-8") if lines else b""


def samples_from_bytes(data: bytes) -> list[Sample]:
    """Parse a set; ValueError naming the line when one is malformed."""
    out: list[Sample] = []
    for line_no, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
            record = record_from_json({k: v for k, v in obj.items() if k not in ("group", "score")})
            score = obj.get("score")
            out.append(Sample(record, int(obj.get("group", 0)), None if score is None else float(score)))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"synthetic set line {line_no}: {exc}") from None
    return out


register_method(CONTRACT, strategy="cloud.strategies.crosslm:CrossLm",
                handler="edge_sdk.handlers.crosslm:CrossLmHandler")
