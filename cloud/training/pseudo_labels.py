"""Auxiliary data without answers (the `prompts` auxiliary mode, ARCHITECTURE.md, "Quality
benchmark"): distillation then runs along the aggregated SLM's own greedy answers, so whatever
the LLM learns there comes from the devices' SLM alone."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from common.records import TaskRecord


def unlabelled(records: Sequence[TaskRecord]) -> list[int]:
    """Indices of the records that carry no answer."""
    return [i for i, r in enumerate(records) if not r.response.strip()]


def label_with(model: Any, tokenizer: Any, records: Sequence[TaskRecord], max_new_tokens: int) -> list[TaskRecord]:
    """`records` with every missing answer replaced by `model`'s greedy answer; records whose
    answer comes back empty are left out (nothing to distil along)."""
    from common.ml.evaluate import generate_greedy

    todo = unlabelled(records)
    if not todo:
        return list(records)
    answers = dict(zip(todo, generate_greedy(model, tokenizer, [records[i].prompt for i in todo], max_new_tokens),
                       strict=True))
    out = []
    for i, record in enumerate(records):
        if i in answers:
            if not answers[i]:
                continue
            record = replace(record, response=answers[i])
        out.append(record)
    return out
