"""Several candidate answers per prompt: the greedy one and seeded samples.

CrossLM's server LLM writes its synthetic samples this way; several candidates per prompt
give the devices' scores something to choose between.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from common.ml.batching import _special_ids
from common.ml.device import model_device, rng_devices
from common.ml.evaluate import decode_answer, generate_greedy, prompt_batches


def sample_answers(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    num_samples: int,
    seed: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 24,
    include_greedy: bool = True,
    batch_size: int = 16,
) -> list[list[str]]:
    """Per prompt, distinct non-empty answers: the greedy one first (if asked), then samples.

    Answers are cut at the first newline and stripped, like `generate_greedy`'s. The same
    model, prompts and seed give the same answers.
    """

    if num_samples < 0 or (num_samples == 0 and not include_greedy):
        raise ValueError("ask for at least one answer per prompt")
    if temperature <= 0 or not 0 < top_p <= 1:
        raise ValueError(f"need temperature > 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
    answers: list[list[str]] = [[] for _ in prompts]
    if include_greedy:
        for i, text in enumerate(generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size)):
            if text:
                answers[i].append(text)
    if num_samples == 0:
        return answers
    _, eos, pad = _special_ids(tokenizer)
    batches = prompt_batches(tokenizer, prompts, batch_size)
    for i, new_ids in sampled_ids(model, batches, num_samples, seed, temperature, top_p, max_new_tokens, eos, pad):
        text = decode_answer(tokenizer, new_ids, eos)
        if text and text not in answers[i]:
            answers[i].append(text)
    return answers


def sampled_ids(model: Any, batches: Iterable[tuple[list[int], Any, Any]], num_samples: int, seed: int,
                temperature: float, top_p: float, max_new_tokens: int, eos: int,
                pad: int) -> Iterator[tuple[int, list[int]]]:
    """(prompt index, new token ids) for `num_samples` seeded samples of every prompt in `batches`
    (as `prompt_batches` yields them: indices, left-padded ids, attention mask). The model is in
    eval mode while sampling and back in its own mode after."""
    import torch

    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        # Sampling on CUDA draws from the CUDA generator: fork and seed it too.
        with torch.random.fork_rng(devices=rng_devices(device)):
            torch.manual_seed(seed)
            for idx, input_ids, attention_mask in batches:
                with torch.inference_mode():
                    out = model.generate(
                        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                        max_new_tokens=max_new_tokens,
                        do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
                        num_return_sequences=num_samples, eos_token_id=eos, pad_token_id=pad,
                    )
                # generate() returns each prompt's samples next to each other.
                width = input_ids.shape[1]
                for row, i in enumerate(idx):
                    for k in range(num_samples):
                        yield i, out[row * num_samples + k, width:].tolist()
    finally:
        model.train(was_training)
