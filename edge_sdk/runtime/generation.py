"""The generation loop every backend shares: prefill, sample, stop, count and time.

Keeping this out of the backends is what makes `generate` and `stream` behave the same on
llama.cpp and ONNX Runtime: the engines differ only in how they compute logits.
"""

from __future__ import annotations

import time
from collections.abc import Container, Iterator, Sequence
from dataclasses import dataclass

from edge_sdk.runtime.base import (
    Backend,
    Chunk,
    ContextOverflowError,
    GenerationResult,
    Timings,
)
from edge_sdk.runtime.sampling import Sampler, SamplingParams, entropy_and_logprob


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str | Sequence[int]
    max_tokens: int = 128
    sampling: SamplingParams = SamplingParams()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    track_confidence: bool = False

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must be non-empty")


class StopMatcher:
    """Finds stop strings in streamed text, holding back what could still become one.

    Text is released only when no stop string can start inside it, so a streaming caller
    never sees the beginning of a stop string that the final text then drops.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._longest = max((len(s) for s in self.stops), default=0)
        self.pending = ""

    def feed(self, text: str) -> tuple[str, str | None]:
        """(text safe to release, the stop string found or None). After a hit, drop the rest."""
        if not self.stops:
            return text, None
        self.pending += text
        # Only a window that the new text touches can hold a new match.
        start = max(0, len(self.pending) - len(text) - self._longest + 1)
        hit_at, hit = -1, None
        for s in self.stops:
            i = self.pending.find(s, start)
            if i != -1 and (hit_at == -1 or i < hit_at):
                hit_at, hit = i, s
        if hit is not None:
            out, self.pending = self.pending[:hit_at], ""
            return out, hit
        hold = self._partial_suffix()
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(self.pending) - hold:]
        return out, None

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _partial_suffix(self) -> int:
        """Length of the longest tail of `pending` that is a proper prefix of a stop string."""
        best = 0
        tail_max = min(len(self.pending), self._longest - 1)
        for n in range(tail_max, 0, -1):
            tail = self.pending[-n:]
            if any(s.startswith(tail) for s in self.stops):
                best = n
                break
        return best


class GenerationStream:
    """Iterate for `Chunk`s; once exhausted (or closed early) `.result` holds the totals.

    The backend's KV cache belongs to one generation at a time: starting another one on
    the same model while this stream is unfinished abandons this stream.
    """

    def __init__(self, backend: Backend, request: GenerationRequest) -> None:
        self._backend = backend
        self._request = request
        self.result: GenerationResult | None = None
        # The prompt is checked here, so a bad one fails at the call, not at the first chunk.
        self._t0 = time.perf_counter()
        self._timings = Timings()
        if isinstance(request.prompt, str):
            self._ids = backend.tokenize(request.prompt)
        else:
            self._ids = [int(i) for i in request.prompt]
            vocab = backend.info.vocab_size
            bad = [i for i in self._ids if not 0 <= i < vocab]
            if bad:
                raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary (0..{vocab - 1})")
        self._timings.tokenize_s = time.perf_counter() - self._t0
        n_ctx = backend.context_length
        if not self._ids:
            raise ValueError("the prompt is empty after tokenization; give at least one token")
        if len(self._ids) >= n_ctx:
            raise ContextOverflowError(
                f"the prompt is {len(self._ids)} tokens long but the context holds {n_ctx}",
                "a prompt must leave room for at least one generated token",
                f"shorten the prompt to under {n_ctx} tokens, or load the model with a larger n_ctx "
                "if the build allows it",
            )
        self._iter = self._run()

    def __iter__(self) -> Iterator[Chunk]:
        return self

    def __next__(self) -> Chunk:
        return next(self._iter)

    def close(self) -> None:
        self._iter.close()

    def collect(self) -> GenerationResult:
        for _ in self:
            pass
        assert self.result is not None
        return self.result

    def _run(self) -> Iterator[Chunk]:
        backend, req, ids, t0, timings = self._backend, self._request, self._ids, self._t0, self._timings
        n_ctx = backend.context_length
        # Generation stops at the context's end rather than failing halfway.
        budget = min(req.max_tokens, n_ctx - len(ids))
        sampler = Sampler(req.sampling)
        detok = backend.detokenizer(ids)
        stopper = StopMatcher(req.stop)
        eos: Container[int] = () if req.ignore_eos else backend.eos_ids
        generated: list[int] = []
        sampled = 0  # tokens sampled, the end-of-sequence one included
        entropies: list[float] | None = [] if req.track_confidence else None
        logprobs: list[float] | None = [] if req.track_confidence else None
        pieces: list[str] = []
        finish, stop_hit = "length", None

        def finish_result(t_first: float | None) -> None:
            t_end = time.perf_counter()
            if t_first is not None:
                timings.decode_s = t_end - t_first
                timings.decoded_tokens = max(0, sampled - 1)
            timings.total_s = t_end - t0
            self.result = GenerationResult(
                text="".join(pieces), token_ids=list(generated), prompt_tokens=len(ids), finish_reason=finish,
                timings=timings, backend=backend.name, stop_string=stop_hit, entropies=entropies,
                logprobs=logprobs,
            )

        backend.reset()
        t_prefill = time.perf_counter()
        logits = backend.prefill(ids)
        timings.prefill_s = time.perf_counter() - t_prefill
        timings.prompt_tokens = len(ids)
        t_first: float | None = None
        try:
            while True:
                token = sampler(logits)
                sampled += 1
                if t_first is None:
                    t_first = time.perf_counter()
                    timings.ttft_s = t_first - t0
                entropy = logprob = None
                if entropies is not None and logprobs is not None:
                    entropy, logprob = entropy_and_logprob(logits, token)
                    entropies.append(entropy)
                    logprobs.append(logprob)
                if token in eos:
                    # The end token is not part of the answer: no text, not in token_ids.
                    finish = "eos"
                    break
                generated.append(token)
                released, stop_hit = stopper.feed(detok.step(token))
                if released:
                    pieces.append(released)
                if stop_hit is not None:
                    finish = "stop"
                    yield Chunk(released, token, len(generated) - 1, entropy, logprob)
                    break
                if len(generated) >= budget:
                    finish = "length" if len(generated) >= req.max_tokens else "context"
                    tail, stop_hit = stopper.feed(detok.flush())
                    tail = tail if stop_hit else tail + stopper.flush()
                    if stop_hit:
                        finish = "stop"
                    pieces.append(tail)
                    yield Chunk(released + tail, token, len(generated) - 1, entropy, logprob)
                    break
                yield Chunk(released, token, len(generated) - 1, entropy, logprob)
                logits = backend.step(token)
            if finish == "eos":
                tail, stop_hit = stopper.feed(detok.flush())
                tail = tail if stop_hit else tail + stopper.flush()
                if stop_hit:
                    finish = "stop"
                pieces.append(tail)
                if tail and generated:
                    yield Chunk(tail, generated[-1], len(generated) - 1, None, None)
        except GeneratorExit:
            finish = "cancelled"
            raise
        except BaseException:
            finish = "error"
            raise
        finally:
            finish_result(t_first)
