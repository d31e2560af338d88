"""How plausible a model finds each (prompt, response) pair: the log-likelihood of the
response tokens (and <eos>) given the prompt, in the SFT format of `batching`.

CrossLM's devices score the LLM's synthetic samples this way and upload only the scores.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from common.ml.batching import IGNORE_INDEX, _special_ids, collate, encode_record
from common.ml.device import model_device, to_device

if TYPE_CHECKING:
    from common.records import TaskRecord


def _encode(tokenizer: Any, record: TaskRecord, max_len: int) -> dict[str, list[int]] | None:
    # encode_sft's layout (the model's chat template), one record at a time, so that a dropped
    # record keeps its place in the output instead of shifting every later score.
    return encode_record(tokenizer, record, max_len)[0]


def response_logprobs(
    model: Any, tokenizer: Any, records: Sequence[TaskRecord], max_len: int = 64, batch_size: int = 32
) -> list[tuple[float, int]]:
    """(sum of log p(response token), number of response tokens) per record, in order.

    A record whose prompt fills `max_len` gets (0.0, 0): it has no response tokens to score.
    """
    import torch
    import torch.nn.functional as F

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _, _eos, pad = _special_ids(tokenizer)
    encoded = [_encode(tokenizer, r, max_len) for r in records]
    kept = [i for i, e in enumerate(encoded) if e is not None]
    out: list[tuple[float, int]] = [(0.0, 0)] * len(records)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(kept), batch_size):
            idx = kept[start : start + batch_size]
            batch = to_device(collate([encoded[i] for i in idx], pad), model_device(model))
            with torch.inference_mode():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
            labels = batch["labels"][:, 1:]
            mask = labels != IGNORE_INDEX
            picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) * mask
            for row, i in enumerate(idx):
                out[i] = (float(picked[row].sum()), int(mask[row].sum()))
    finally:
        model.train(was_training)
    return out


def plausibility(
    model: Any, tokenizer: Any, records: Sequence[TaskRecord], max_len: int = 64, batch_size: int = 32
) -> list[float]:
    """Per record, the geometric mean probability of its response tokens, in [0, 1].

    exp(mean log p) rather than the raw mean log-likelihood: a bounded score averages
    sensibly over devices and takes a threshold that does not depend on response length.
    Records with nothing to score get 0.
    """
    return [
        math.exp(total / count) if count else 0.0
        for total, count in response_logprobs(model, tokenizer, records, max_len, batch_size)
    ]
