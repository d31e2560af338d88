"""The one prompt format and the SFT batching used by pretraining, LoRA training,
distillation and evaluation.

A training sequence is `<bos> prompt "\\n" response <eos>`; the loss is on the response
and <eos> only. Prompts are encoded the same way at generation time (`<bos>` + the
formatted prompt), so what the model sees before its first answer token never differs.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from common.records import TaskRecord

IGNORE_INDEX = -100


def format_prompt(prompt: str) -> str:
    """The text the model sees before its answer: the prompt and a newline."""
    return prompt + "\n"


def _special_id(tokenizer: Any, name: str) -> int | None:
    # Works for transformers tokenizers (`eos_token_id`) and raw `tokenizers.Tokenizer`s.
    value = getattr(tokenizer, f"{name}_token_id", None)
    if value is not None:
        return int(value)
    if hasattr(tokenizer, "token_to_id"):
        found = tokenizer.token_to_id(f"<{name}>")
        return None if found is None else int(found)
    return None


def _special_ids(tokenizer: Any) -> tuple[int | None, int, int]:
    """(bos, eos, pad) ids; pad falls back to eos, as is usual for causal LMs."""
    bos = _special_id(tokenizer, "bos")
    eos = _special_id(tokenizer, "eos")
    if eos is None:
        raise ValueError("the tokenizer has no eos token; responses could never end")
    pad = _special_id(tokenizer, "pad")
    return bos, eos, eos if pad is None else pad


def _encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of `text` without any special tokens, whatever the tokenizer type."""
    encoded = tokenizer.encode(text, add_special_tokens=False)
    ids = encoded.ids if hasattr(encoded, "ids") else encoded
    return [int(i) for i in ids]


def _prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """`<bos>` + the formatted prompt: the exact prefix used in training and generation."""
    bos, _, _ = _special_ids(tokenizer)
    ids = _encode_text(tokenizer, format_prompt(prompt))
    return ids if bos is None else [bos, *ids]


def encode_sft(
    tokenizer: Any, records: Sequence[TaskRecord], max_len: int
) -> list[dict[str, list[int]]]:
    """Encode records as {"input_ids", "labels"}; labels are -100 on <bos> and the prompt.

    Sequences longer than `max_len` are cut at the end (the prompt's start is kept);
    records whose response would be cut entirely are dropped, with a warning that counts
    them.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    _, eos, _ = _special_ids(tokenizer)
    out: list[dict[str, list[int]]] = []
    dropped = 0
    for record in records:
        prompt_ids = _prompt_ids(tokenizer, record.prompt)
        response_ids = [*_encode_text(tokenizer, record.response), eos]
        input_ids = (prompt_ids + response_ids)[:max_len]
        if len(input_ids) <= len(prompt_ids):
            dropped += 1
            continue
        labels = [IGNORE_INDEX] * len(prompt_ids) + input_ids[len(prompt_ids) :]
        out.append({"input_ids": input_ids, "labels": labels})
    if dropped:
        warnings.warn(
            f"encode_sft dropped {dropped} of {len(records)} records whose prompt fills "
            f"max_len={max_len}; raise max_len or shorten those prompts.",
            stacklevel=2,
        )
    return out


def collate(examples: Sequence[dict[str, list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch for training: input_ids, attention_mask, labels (-100 on padding)."""
    import torch

    if not examples:
        raise ValueError("cannot collate an empty batch")
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        input_ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        attention_mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _num_batches(
    num_examples: int, batch_size: int, epochs: float | None, max_steps: int | None
) -> int:
    """How many batches `iterate_batches` yields for these settings."""
    if num_examples == 0:
        return 0
    if epochs is None:
        if max_steps is None:
            raise ValueError("give epochs, max_steps or both")
        return max_steps
    steps = math.ceil(math.ceil(epochs * num_examples) / batch_size)
    return steps if max_steps is None else min(steps, max_steps)


def iterate_batches(
    examples: Sequence[Any],
    batch_size: int,
    seed: int,
    epochs: float | None,
    max_steps: int | None = None,
) -> Iterator[list[Any]]:
    """Yield lists of examples (collate them yourself) in a seeded order.

    Each epoch is a fresh permutation; the stream of examples runs across epoch borders
    and stops after ceil(epochs * len(examples)) examples, so fractional epochs work.
    `max_steps` caps the number of batches; with `epochs=None` it alone sets it.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if epochs is not None and epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {epochs}")
    total = _num_batches(len(examples), batch_size, epochs, max_steps)
    if total == 0:
        return
    budget = math.inf if epochs is None else math.ceil(epochs * len(examples))
    rng = random.Random(seed)
    order: list[int] = []
    taken = 0
    for _ in range(total):
        batch: list[Any] = []
        while len(batch) < batch_size and taken < budget:
            if not order:
                order = list(range(len(examples)))
                rng.shuffle(order)
            batch.append(examples[order.pop()])
            taken += 1
        yield batch
