"""Greedy generation and scoring (Rouge-L / exact match) on task records.

Prompts are rendered with the model's chat template (common.chat) exactly as training renders
them. An answer ends at the first end-of-turn token or the template's stop text (the default
template's answers are one line); answers that reach `max_new_tokens` without ending are counted
(`truncated_answers`) and logged, since scores on cut answers say little.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from common.chat import ChatTemplate, chat_template_for
from common.ml.batching import _special_ids, end_token_ids, prompt_ids
from common.ml.device import model_device, to_device

if TYPE_CHECKING:
    from common.records import ChatMessage, TaskRecord

# Long enough for the answers of real instruction data; generation stops earlier at the end of turn.
EVAL_MAX_NEW_TOKENS = 256
log = logging.getLogger("cotune.eval")


def prompt_batches(tokenizer: Any, prompts: Sequence[str | TaskRecord | Sequence[ChatMessage]], batch_size: int,
                   template: ChatTemplate | None = None) -> Iterator[tuple[list[int], Any, Any]]:
    """(prompt indices, input_ids, attention_mask) per batch, left-padded for generate().

    A prompt is a plain prompt, a TaskRecord (its context and prompt) or a list of messages.
    Prompts are grouped by length to waste less compute on padding; the indices say which
    prompts a batch holds, in row order.
    """
    import torch

    _, _, pad = _special_ids(tokenizer)
    template = template or chat_template_for(tokenizer)
    encoded = [prompt_ids(tokenizer, p, template) for p in prompts]
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


def _answer(tokenizer: Any, new_ids: list[int], ends: Collection[int], stop: Sequence[str]) -> tuple[str, bool]:
    """(the answer, whether it ended): cut at the first end token, then at the earliest stop text."""
    cut = next((i for i, token in enumerate(new_ids) if token in ends), None)
    text = tokenizer.decode(new_ids if cut is None else new_ids[:cut], skip_special_tokens=True)
    found = [text.index(s) for s in stop if s and s in text]
    if found:
        text = text[: min(found)]
    return text.strip(), cut is not None or bool(found)


def decode_answer(tokenizer: Any, new_ids: list[int], eos: int | Collection[int],
                  stop: Sequence[str] = ("\n",)) -> str:
    """An answer from generated ids: up to the end token(s), then up to the first stop text
    (by default the first line), stripped."""
    return _answer(tokenizer, new_ids, {eos} if isinstance(eos, int) else eos, stop)[0]


def generate_greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str | TaskRecord | Sequence[ChatMessage]],
    max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
    batch_size: int = 32,
    stats: dict[str, int] | None = None,
) -> list[str]:
    """Greedy answers to `prompts` (raw prompts, records or message lists: the template is applied here).

    Batched with left padding (`prompt_batches`); each answer is the decoded new tokens up to the
    end of the turn or the template's stop text, stripped. Answers come back in the order of
    `prompts`. Answers cut by `max_new_tokens` are logged and counted into
    `stats["truncated_answers"]` when `stats` is given.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    _, _, pad = _special_ids(tokenizer)
    template = chat_template_for(tokenizer)
    ends = end_token_ids(tokenizer, template)
    # Generation stops at the stop text too (transformers checks it on the decoded tokens).
    stop_kwargs = {"stop_strings": list(template.stop), "tokenizer": tokenizer} if (
        template.stop and hasattr(tokenizer, "convert_ids_to_tokens")) else {}
    answers: list[str] = [""] * len(prompts)
    truncated = 0
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        for idx, input_ids, attention_mask in prompt_batches(tokenizer, prompts, batch_size, template):
            with torch.inference_mode():
                out = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    eos_token_id=ends[0] if len(ends) == 1 else ends,
                    pad_token_id=pad,
                    **stop_kwargs,
                )
            width = input_ids.shape[1]
            for row, i in enumerate(idx):
                answers[i], ended = _answer(tokenizer, out[row, width:].tolist(), ends, template.stop)
                truncated += int(not ended)
    finally:
        model.train(was_training)
    if truncated:
        log.warning("%d of %d answers reached max_new_tokens=%d before ending; they are scored as cut, so raise "
                    "the generation length (eval_max_new_tokens) if answers are meant to be longer",
                    truncated, len(prompts), max_new_tokens)
    if stats is not None:
        stats["truncated_answers"] = stats.get("truncated_answers", 0) + truncated
    return answers


def evaluate(
    model: Any, tokenizer: Any, records: Sequence[TaskRecord], max_new_tokens: int = EVAL_MAX_NEW_TOKENS
) -> dict[str, Any]:
    """Greedy-decode every record's prompt (with its context) and score it against its response.

    Returns common.metrics.score's dict, {"rougeL", "em", "n", "per_domain"}, and
    "truncated_answers": how many answers `max_new_tokens` cut.
    """
    from common.metrics import score

    stats: dict[str, int] = {}
    preds = generate_greedy(model, tokenizer, list(records), max_new_tokens, stats=stats)
    return {**score(preds, [r.response for r in records], [r.domain for r in records]),
            "truncated_answers": stats.get("truncated_answers", 0)}


def response_nll(model: Any, tokenizer: Any, records: Sequence[TaskRecord], max_len: int = 512,
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
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            batch = to_device(collate(examples[start:start + batch_size], pad), device)
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
