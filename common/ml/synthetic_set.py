"""Sets of synthetic samples as JSONL bytes: what CrossLM's server publishes each round.

Each line is a task record (`prompt`, `response`, optional `domain`) with optional extra
fields (`group`: the prompt it answers, `score`: the devices' aggregated score). Line order
is the sample index, which the devices' score tensors follow. Unlike task data, a set may
be empty (an LLM can fail to answer anything).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from common.records import TaskRecord


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
            record = TaskRecord(obj["prompt"], obj["response"], obj.get("domain"))
            if not isinstance(record.prompt, str) or not isinstance(record.response, str):
                raise TypeError("prompt and response must be strings")
            score = obj.get("score")
            out.append(Sample(record, int(obj.get("group", 0)), None if score is None else float(score)))
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"synthetic set line {line_no}: {exc}") from None
    return out
