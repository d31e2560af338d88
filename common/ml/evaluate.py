"""Greedy generation and scoring (Rouge-L / exact match) on task records."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

from common.ml.batching import _prompt_ids, _special_ids

if TYPE_CHECKING:
    from common.records import TaskRecord


def prompt_batches(tokenizer: Any, prompts: Sequence[str], batch_size: int) -> Iterator[tuple[list[int], Any, Any]]:
    """(prompt indices, input_ids, attention_mask) per batch, left-padded for generate().

    Prompts are grouped by length to waste less compute on padding; the indices say which
    prompts a batch holds, in row order.
    """
    import torch

    _, _, pad = _special_ids(tokenizer)
    encoded = [_prompt_ids(tokenizer, p) for p in prompts]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        width = max(len(encoded[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            ids = encoded[i]
            input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, width - len(ids) :] = 1
        yield idx, input_ids, attention_mask


def decode_answer(tokenizer: Any, new_ids: list[int], eos: int) -> str:
    """An answer from generated ids: up to end-of-sequence, then the first line, stripped."""
    if eos in new_ids:
        new_ids = new_ids[: new_ids.index(eos)]
    return tokenizer.decode(new_ids, skip_special_tokens=True).split("\n", 1)[0].strip()


def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    max_new_tokens: int = 24,
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers to `prompts` (raw prompts: the format is applied here).

    Batched with left padding (`prompt_batches`); each answer is the decoded new tokens up
    to the first newline, stripped. Answers come back in the order of `prompts`.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _, eos, pad = _special_ids(tokenizer)
    answers: list[str] = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for idx, input_ids, attention_mask in prompt_batches(tokenizer, prompts, batch_size):
            with torch.inference_mode():
                out = model.generate(
                    input_ids=input_ids,
                    attention_mask=attention_mask,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    eos_token_id=eos,
                    pad_token_id=pad,
                )
            width = input_ids.shape[1]
            for row, i in enumerate(idx):
                answers[i] = decode_answer(tokenizer, out[row, width:].tolist(), eos)
    finally:
        model.train(was_training)
    return answers


def evaluate(
    model: Any, tokenizer: Any, records: Sequence[TaskRecord], max_new_tokens: int = 24
) -> dict[str, Any]:
    """Greedy-decode every record's prompt and score it against its response.

    Returns common.metrics.score's dict: {"rougeL", "em", "n", "per_domain"}.
    """
    from common.metrics import score

    preds = generate_greedy(model, tokenizer, [r.prompt for r in records], max_new_tokens)
    return score(preds, [r.response for r in records], [r.domain for r in records])



def response_nll(model: Any, tokenizer: Any, records: Sequence[TaskRecord], max_len: int = 64,
                 batch_size: int = 32) -> list[tuple[float, int]]:
    """Per record: the summed next-token loss over its response tokens (EOS included) and their count."""
    import torch
    import torch.nn.functional as F

    from common.ml.batching import IGNORE_INDEX, collate, encode_sft

    examples = encode_sft(tokenizer, records, max_len)
    if len(examples) != len(records):
        raise ValueError(f"{len(records) - len(examples)} records do not fit max_len={max_len}")
    _, _, pad = _special_ids(tokenizer)
    out: list[tuple[float, int]] = []
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start:start + batch_size], pad)
            with torch.inference_mode():
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            labels = batch["labels"][:, 1:]
            loss = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                   reduction="none")
            mask = labels != IGNORE_INDEX
            out += [(float(loss[row][mask[row]].sum()), int(mask[row].sum())) for row in range(labels.size(0))]
    finally:
        model.train(was_training)
    return out
