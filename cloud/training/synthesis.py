"""CrossLM's "samples" synthesis: the LLM writes whole task samples from an instruction.

Given the prefix `<bos> instruction`, the LLM continues with a task input, the prompt/response
separator "\\n" (the SFT format of common.ml.batching) and an answer, ending at <eos> or at
`max_new_tokens`. A continuation becomes the sample x = instruction + generated input,
y = the answer; one without a separator, or with an empty input or answer, is dropped.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from common.methods.crosslm import Sample
from common.ml.batching import _encode_text, _special_ids
from common.records import TaskRecord

SEPARATOR = "\n"  # what ends the prompt in `<bos> prompt "\n" response <eos>`


def split_sample(instruction: str, continuation: str) -> tuple[str, str] | None:
    """(x, y) from a continuation of `instruction`, or None when it is malformed.

    x is the instruction followed by the generated input up to the first "\\n" (its trailing
    whitespace dropped); y is the rest, stripped. No separator, or an input or answer that is
    empty once stripped, makes it malformed.
    """
    generated_input, sep, answer = continuation.partition(SEPARATOR)
    if not sep or not generated_input.strip() or not answer.strip():
        return None
    return instruction + generated_input.rstrip(), answer.strip()


def build_samples(
    instructions: Sequence[TaskRecord], continuations: Sequence[Sequence[str]]
) -> tuple[list[Sample], dict[str, int]]:
    """Samples from each instruction's continuations, deduplicated on (x, y), and their counts.

    Each sample keeps its instruction's domain. Its group is its x (numbered in order of first
    appearance): answers to one generated input compete for "best per prompt", samples with
    different inputs do not. Counts: instructions, generated, well_formed, unique.
    """
    samples: list[Sample] = []
    seen: set[tuple[str, str]] = set()
    groups: dict[str, int] = {}
    generated = well_formed = 0
    for record, texts in zip(instructions, continuations, strict=True):
        for text in texts:
            generated += 1
            pair = split_sample(record.prompt, text)
            if pair is None:
                continue
            well_formed += 1
            if pair in seen:
                continue
            seen.add(pair)
            group = groups.setdefault(pair[0], len(groups))
            samples.append(Sample(TaskRecord(pair[0], pair[1], record.domain), group=group))
    stats = {"instructions": len(instructions), "generated": generated, "well_formed": well_formed,
             "unique": len(samples)}
    return samples, stats


def _prefix_batches(
    tokenizer: Any, prefixes: Sequence[list[int]], batch_size: int
) -> Iterator[tuple[list[int], Any, Any]]:
    # Left-padded like common.ml.evaluate.prompt_batches, but on raw prefixes: no "\n" appended.
    import torch

    _, _, pad = _special_ids(tokenizer)
    for start in range(0, len(prefixes), batch_size):
        idx = list(range(start, min(start + batch_size, len(prefixes))))
        width = max(len(prefixes[i]) for i in idx)
        input_ids = torch.full((len(idx), width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(idx), width), dtype=torch.long)
        for row, i in enumerate(idx):
            input_ids[row, width - len(prefixes[i]):] = torch.tensor(prefixes[i], dtype=torch.long)
            attention_mask[row, width - len(prefixes[i]):] = 1
        yield idx, input_ids, attention_mask


def _continuation(tokenizer: Any, instruction_ids: list[int], new_ids: list[int]) -> str:
    # Decoding the new ids alone may lose a leading space (tokenizers that mark word starts);
    # decode with the instruction and take what follows its own decoding when that is a prefix.
    full = tokenizer.decode(instruction_ids + new_ids, skip_special_tokens=True)
    head = tokenizer.decode(instruction_ids, skip_special_tokens=True)
    if full.startswith(head):
        return full[len(head):]
    return tokenizer.decode(new_ids, skip_special_tokens=True)


def sample_continuations(
    model: Any,
    tokenizer: Any,
    instructions: Sequence[str],
    num_samples: int,
    seed: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 48,
    batch_size: int = 16,
) -> list[list[str]]:
    """Per instruction, `num_samples` sampled continuations of `<bos> instruction`, as text up
    to <eos> (or `max_new_tokens`), newlines kept. The same model, instructions and seed give
    the same continuations."""
    from cloud.training.sampling import sampled_ids

    if num_samples < 1:
        raise ValueError(f"ask for at least one continuation per instruction, got {num_samples}")
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    bos, eos, pad = _special_ids(tokenizer)
    encoded = [_encode_text(tokenizer, text) for text in instructions]
    prefixes = [ids if bos is None else [bos, *ids] for ids in encoded]
    out: list[list[str]] = [[] for _ in instructions]
    batches = _prefix_batches(tokenizer, prefixes, batch_size)
    for i, new_ids in sampled_ids(model, batches, num_samples, seed, temperature, top_p, max_new_tokens, eos, pad):
        if eos in new_ids:
            new_ids = new_ids[: new_ids.index(eos)]
        out[i].append(_continuation(tokenizer, encoded[i], new_ids))
    return out
