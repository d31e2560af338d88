"""SFT batching used by pretraining, LoRA training, distillation and evaluation.

A training sequence is `<bos>` followed by the record's conversation as the model's chat template
renders it (common.chat); the loss is on the final reply and its end-of-turn marker only.
Generation prompts are encoded the same way (`<bos>` + the rendered prompt), so what the model sees
before its first answer token never differs between training, evaluation and serving. With the
default template a prompt/response record is `<bos> prompt "\\n" response <eos>`.

Sequences longer than `max_len` are cut at the end, never silently: `encode_records` counts the
records it cut (`truncated`) and those it had to drop because no reply token was left (`dropped`),
and the callers log both and report them.
"""

from __future__ import annotations

import logging
import math
import random
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common.chat import ChatTemplate, chat_template_for, format_prompt

if TYPE_CHECKING:
    import torch

    from common.records import ChatMessage, TaskRecord

IGNORE_INDEX = -100
log = logging.getLogger("cotune.train")

__all__ = ["IGNORE_INDEX", "TruncationCounts", "bucket_batches", "collate", "encode_record", "encode_records",
           "encode_sft", "end_token_ids", "format_prompt", "iterate_batches", "prompt_ids", "training_batches"]

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
    """Token ids of `text`, adding no special tokens around it; special tokens written in the text
    (a template's EOS and turn markers) become their single ids, whatever the tokenizer type."""
    encoded = tokenizer.encode(text, add_special_tokens=False)
    ids = encoded.ids if hasattr(encoded, "ids") else encoded
    return [int(i) for i in ids]


def _with_bos(tokenizer: Any, ids: list[int]) -> list[int]:
    bos, _, _ = _special_ids(tokenizer)
    return ids if bos is None else [bos, *ids]


def _messages(prompt: str | TaskRecord | Sequence[ChatMessage]) -> list[Any]:
    """The turns before the answer: a plain prompt is one user message."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    if hasattr(prompt, "messages"):  # a TaskRecord
        return prompt.messages(with_response=False)  # type: ignore[union-attr]
    return list(prompt)


def prompt_ids(tokenizer: Any, prompt: str | TaskRecord | Sequence[ChatMessage],
               template: ChatTemplate | None = None) -> list[int]:
    """`<bos>` + the rendered prompt: the exact prefix used in training and generation.

    `prompt` is a plain prompt (one user message), a TaskRecord (its context and prompt) or a list
    of messages; `template` defaults to the tokenizer's (common.chat.chat_template_for).
    """
    template = template or chat_template_for(tokenizer)
    return _with_bos(tokenizer, _encode_text(tokenizer, template.prompt(_messages(prompt))))


_prompt_ids = prompt_ids  # the name other modules have imported


@dataclass
class TruncationCounts:
    """Of `total` records: `truncated` were cut to max_len with part of their reply kept,
    `dropped` were left out because the prompt alone filled max_len."""

    total: int = 0
    truncated: int = 0
    dropped: int = 0

    def report(self) -> dict[str, int]:
        return {"truncated_records": self.truncated, "dropped_records": self.dropped}

    def warn(self, max_len: int, what: str = "training") -> None:
        """One log line (and, for dropped records, a UserWarning) when anything was cut."""
        if self.truncated or self.dropped:
            log.warning("%s: %d of %d records were longer than max_len=%d: %d cut short (the end of their reply "
                        "is not trained), %d dropped (the prompt alone fills max_len); raise max_len or shorten "
                        "those records", what, self.truncated + self.dropped, self.total, max_len, self.truncated,
                        self.dropped)
        if self.dropped:
            warnings.warn(f"encode_sft dropped {self.dropped} of {self.total} records whose prompt fills "
                          f"max_len={max_len}; raise max_len or shorten those prompts.", stacklevel=3)


def encode_record(tokenizer: Any, record: TaskRecord, max_len: int, template: ChatTemplate | None = None,
                  ) -> tuple[dict[str, list[int]] | None, bool]:
    """({"input_ids", "labels"} or None when dropped, whether it was cut to max_len) for one record.

    Labels are -100 on <bos> and the rendered prompt; the reply's tokens (end marker included) are trained.
    """
    if max_len < 2:
        raise ValueError(f"max_len must be >= 2, got {max_len}")
    template = template or chat_template_for(tokenizer)
    prompt_text, reply_text = template.split(record.messages())
    head = _with_bos(tokenizer, _encode_text(tokenizer, prompt_text))
    reply = _encode_text(tokenizer, reply_text)
    input_ids = (head + reply)[:max_len]
    if len(input_ids) <= len(head):
        return None, True
    labels = [IGNORE_INDEX] * len(head) + input_ids[len(head):]
    return {"input_ids": input_ids, "labels": labels}, len(head) + len(reply) > max_len


def encode_records(tokenizer: Any, records: Sequence[TaskRecord], max_len: int,
                   ) -> tuple[list[dict[str, list[int]]], TruncationCounts]:
    """Every record that fits encoded (see encode_record), and how many were cut or dropped."""
    template = chat_template_for(tokenizer)
    counts = TruncationCounts(total=len(records))
    out: list[dict[str, list[int]]] = []
    for record in records:
        example, cut = encode_record(tokenizer, record, max_len, template)
        if example is None:
            counts.dropped += 1
            continue
        counts.truncated += int(cut)
        out.append(example)
    return out, counts


def encode_sft(
    tokenizer: Any, records: Sequence[TaskRecord], max_len: int
) -> list[dict[str, list[int]]]:
    """Encode records as {"input_ids", "labels"}; labels are -100 on <bos> and the prompt.

    Sequences longer than `max_len` are cut at the end (the prompt's start is kept); records
    whose response would be cut entirely are dropped. Both are logged with their counts, and
    dropping also warns (UserWarning).
    """
    out, counts = encode_records(tokenizer, records, max_len)
    counts.warn(max_len)
    return out


def end_token_ids(tokenizer: Any, template: ChatTemplate | None = None) -> list[int]:
    """The ids that end a reply: EOS first, then any special token the template closes a reply with
    (e.g. `<|im_end|>` where that is not the tokenizer's EOS)."""
    _, eos, _ = _special_ids(tokenizer)
    template = template or chat_template_for(tokenizer)
    probe = "cotune"
    try:
        _, reply = template.split([{"role": "user", "content": "x"}, {"role": "assistant", "content": probe}])
    except ValueError:
        return [eos]
    if not reply.startswith(probe):
        return [eos]
    specials = _added_ids(tokenizer)
    ends = [eos]
    for token in _encode_text(tokenizer, reply[len(probe):]):
        if token in specials and token not in ends:
            ends.append(token)
    return ends


def _added_ids(tokenizer: Any) -> set[int]:
    if hasattr(tokenizer, "get_added_vocab"):
        return {int(i) for i in tokenizer.get_added_vocab().values()}
    if hasattr(tokenizer, "get_added_tokens_decoder"):
        return {int(i) for i in tokenizer.get_added_tokens_decoder()}
    return set()


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


def _example_len(example: Any) -> int:
    return len(example["input_ids"])


def bucket_batches(batches: Iterable[list[Any]], window: int, seed: int,
                   length: Callable[[Any], int] = _example_len) -> Iterator[list[Any]]:
    """Length bucketing: the same examples in batches of the same sizes, each batch made of
    examples of similar length, so a right-padded batch carries less padding.

    Every `window` consecutive batches are pooled, sorted by length (stably) and cut again
    into batches of the sizes they came in; their order within the window is then shuffled,
    seeded, so long and short batches alternate rather than trending. An example stays in the
    window (the slice of the seeded stream) it was drawn in, so every example is yielded
    exactly as often as in `batches`, and the same batches and seed give the same result.
    """
    if window < 1:
        raise ValueError(f"bucket window must be >= 1 batch, got {window}")
    rng = random.Random(f"cotune-bucket:{seed}")
    pending: list[list[Any]] = []

    def flush() -> Iterator[list[Any]]:
        pool = sorted((ex for batch in pending for ex in batch), key=length)
        out: list[list[Any]] = []
        start = 0
        for size in (len(batch) for batch in pending):
            out.append(pool[start:start + size])
            start += size
        rng.shuffle(out)
        pending.clear()
        yield from out

    for batch in batches:
        pending.append(batch)
        if len(pending) == window:
            yield from flush()
    if pending:
        yield from flush()


def training_batches(examples: Sequence[Any], batch_size: int, seed: int, epochs: float | None,
                     max_steps: int | None = None, bucket_window: int | None = None) -> Iterator[list[Any]]:
    """The batches a training loop takes: `iterate_batches`' seeded order, length-bucketed over
    windows of `bucket_window` batches when one is given (`bucket_batches`)."""
    batches = iterate_batches(examples, batch_size, seed, epochs, max_steps)
    return batches if bucket_window is None else bucket_batches(batches, bucket_window, seed)
