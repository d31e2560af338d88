"""Completions from the run's LLM (with its current co-tuned adapter) for devices that
escalate a prompt they are unsure about."""

from __future__ import annotations

import time
from typing import Any

from common.protocol import GenerateRequest, GenerateResponse


def complete(model: Any, tokenizer: Any, request: GenerateRequest, model_name: str) -> GenerateResponse:
    import torch

    from common.ml.batching import _prompt_ids, _special_ids

    started = time.perf_counter()
    _, eos, pad = _special_ids(tokenizer)
    ids = _prompt_ids(tokenizer, request.prompt)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and len(ids) + request.max_tokens > limit:
        raise ValueError(f"prompt of {len(ids)} tokens plus {request.max_tokens} new ones exceeds the "
                         f"LLM's context of {limit}; shorten the prompt or ask for fewer tokens")
    sampling: dict[str, Any] = {"do_sample": False}
    if request.temperature > 0:
        sampling = {"do_sample": True, "temperature": request.temperature, "top_p": request.top_p}
    model.eval()
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=request.max_tokens, eos_token_id=eos, pad_token_id=pad, **sampling)
    new = out[0, len(ids):].tolist()
    if eos in new:
        new = new[: new.index(eos)]
    text = tokenizer.decode(new, skip_special_tokens=True)
    for stop in request.stop:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return GenerateResponse(text=text, tokens=len(new), model=model_name,
                            seconds=round(time.perf_counter() - started, 4))
