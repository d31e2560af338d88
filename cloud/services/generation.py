"""Answers from a run's LLM, with the adapter of its last closed round, for devices that
escalate a prompt they are unsure about (edge-to-cloud collaboration).

Each answer holds the model lock and one of the server's worker threads, so admission is
limited: a token bucket per device, and at most `queue` requests waiting for (or holding) the
lock at once; past either, 429 with Retry-After rather than one more blocked thread."""

from __future__ import annotations

import threading
import time
from typing import Any

from cloud import telemetry
from cloud.errors import ApiError
from cloud.models import ModelHolder
from cloud.services.limits import GenerateLimits, TokenBuckets, TooManyRequests
from cloud.services.runs import RunsService
from cloud.state.records import ClientRecord
from common.protocol import GenerateRequest, GenerateResponse


class GenerationService:
    def __init__(self, runs: RunsService, holder: ModelHolder, model_lock: threading.Lock,
                 limits: GenerateLimits | None = None) -> None:
        self.runs = runs
        self.holder = holder
        # Shared with the round driver: server steps and answers use the same held models.
        self.model_lock = model_lock
        self.limits = limits or GenerateLimits()
        self._buckets = TokenBuckets(self.limits.rate_per_minute / 60.0, self.limits.burst)
        self._slots = threading.BoundedSemaphore(self.limits.queue)
        # Seconds the last answer took (a running mean): what a refused caller is told to wait.
        self._answer_s = 1.0

    def generate(self, client: ClientRecord, request: GenerateRequest) -> GenerateResponse:
        wait = self._buckets.take(client.id)
        if wait > 0:
            raise TooManyRequests(
                "rate_limited", f"this device may ask for {self.limits.rate_per_minute:g} answers a minute "
                f"(bursts of {self.limits.burst}); it has used them", wait,
                "answer on the device meanwhile, and retry after the Retry-After seconds")
        if not self._slots.acquire(blocking=False):
            self._buckets.give_back(client.id)  # refused for the server's load, not this device's rate
            raise TooManyRequests(
                "busy", f"{self.limits.queue} requests are already waiting for the coordinator's LLM",
                min(30.0, self._answer_s * self.limits.queue), "retry after the Retry-After seconds")
        try:
            return self._answer(client, request)
        finally:
            self._slots.release()

    @telemetry.times_generation
    def _answer(self, client: ClientRecord, request: GenerateRequest) -> GenerateResponse:
        run = self.runs.get(client.run_id)
        held = self.runs.holdings(run)
        served = self.runs.strategy(run).llm_adapter(held.named)
        if served is None:
            raise ApiError(409, "no_llm", f"run {run.name!r} ({run.algorithm}) holds no LLM to answer with",
                           "answer on the device, or enroll in a run that co-tunes an LLM")
        with self.model_lock:
            started = time.perf_counter()
            model, tokenizer = self.holder.with_adapter(served.checkpoint, served.lora, served.seed,
                                                        served.adapter_digest)
            try:
                return complete(model, tokenizer, request, f"{run.name}/llm@round{held.round}")
            except ValueError as exc:
                raise ApiError(422, "prompt_too_long", str(exc)) from None
            finally:
                self._answer_s = 0.8 * self._answer_s + 0.2 * (time.perf_counter() - started)


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
    from common.ml.device import model_device

    device = model_device(model)
    model.eval()
    with torch.inference_mode():
        out = model.generate(input_ids=torch.tensor([ids], device=device),
                             attention_mask=torch.ones(1, len(ids), dtype=torch.long, device=device),
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
