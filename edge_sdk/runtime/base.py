"""What every inference backend provides, the results they report, and the errors they raise.

A backend only runs the model: tokenize, feed tokens into its KV cache and hand back the
logits of the last position. Sampling, stop strings, token counting and timing live in
`edge_sdk.runtime.generation`, shared by all backends, so `generate` and `stream` behave
the same whichever engine runs underneath.
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from collections.abc import Container, Sequence
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from common.errors import EdgeRuntimeError

if TYPE_CHECKING:
    import numpy as np


# -- errors -------------------------------------------------------------------------------


class ModelFileError(EdgeRuntimeError):
    """The build's model or tokenizer file is missing, truncated or cannot be parsed."""


class UnsupportedBuildError(EdgeRuntimeError):
    """The build is valid but this backend (or this device) cannot run it."""


class BackendUnavailableError(UnsupportedBuildError):
    """The engine a build needs (llama-cpp-python, onnxruntime, tokenizers) is not installed."""


class GpuUnavailableError(BackendUnavailableError):
    """A GPU was asked for explicitly, but this install (or machine) cannot use one."""


class ContextOverflowError(EdgeRuntimeError, ValueError):
    """The prompt does not fit in the model's context window."""


class AdapterError(EdgeRuntimeError):
    """A LoRA adapter cannot be loaded or does not fit the loaded base model."""


class InferenceError(EdgeRuntimeError):
    """The engine failed while computing (out of memory, aborted, internal error)."""


# -- results ------------------------------------------------------------------------------

FINISH_REASONS = ("eos", "stop", "length", "context", "cancelled", "error")


@dataclass
class Timings:
    """Seconds, measured with time.perf_counter around the engine calls.

    ttft_s runs from the call to the first generated token (tokenizing, prefill, first
    sample); decode_s from the first generated token to the last one.
    """

    tokenize_s: float = 0.0
    prefill_s: float = 0.0
    ttft_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    prompt_tokens: int = 0
    decoded_tokens: int = 0

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s > 0 else 0.0

    @property
    def decode_tok_s(self) -> float:
        # The first token comes out of the prefill; decode speed counts the ones after it.
        return self.decoded_tokens / self.decode_s if self.decode_s > 0 else 0.0

    def to_dict(self) -> dict[str, float]:
        out = {k: float(v) for k, v in asdict(self).items()}
        out["prefill_tok_s"] = self.prefill_tok_s
        out["decode_tok_s"] = self.decode_tok_s
        return out


@dataclass
class GenerationResult:
    text: str
    token_ids: list[int]  # the answer's tokens (an end-of-sequence token is not included)
    prompt_tokens: int
    finish_reason: str
    timings: Timings
    backend: str
    stop_string: str | None = None
    # Filled when generate(track_confidence=True): per generated token, in nats.
    entropies: list[float] | None = None
    logprobs: list[float] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def mean_entropy(self) -> float | None:
        return sum(self.entropies) / len(self.entropies) if self.entropies else None

    @property
    def max_entropy(self) -> float | None:
        return max(self.entropies) if self.entropies else None

    @property
    def mean_neg_logprob(self) -> float | None:
        return -sum(self.logprobs) / len(self.logprobs) if self.logprobs else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "backend": self.backend,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "stop_string": self.stop_string,
            "mean_entropy": self.mean_entropy,
            "timings": self.timings.to_dict(),
        }


@dataclass
class Chunk:
    """One step of `stream`: the token sampled and the text it released.

    `text` may be empty while bytes of a multi-byte character, or a possible start of a
    stop string, are held back; the held text comes out with a later chunk.
    """

    text: str
    token_id: int
    index: int
    entropy: float | None = None
    logprob: float | None = None


# -- the engine interface -----------------------------------------------------------------


class Detokenizer(ABC):
    """Turns generated token ids into text incrementally, one token at a time."""

    @abstractmethod
    def step(self, token_id: int) -> str:
        """Text completed by this token (possibly empty)."""

    @abstractmethod
    def flush(self) -> str:
        """Whatever is still held back at the end of generation."""


@dataclass
class BackendInfo:
    name: str
    model_path: str
    context_length: int
    vocab_size: int
    threads: int
    extra: dict[str, Any] = field(default_factory=dict)


class Backend(ABC):
    """One loaded model in one engine, with a single sequence's KV cache."""

    name: str = "backend"

    @property
    @abstractmethod
    def info(self) -> BackendInfo: ...

    @property
    def context_length(self) -> int:
        return self.info.context_length

    @property
    @abstractmethod
    def eos_ids(self) -> Container[int]:
        """Tokens that end a generation (end of sequence / end of turn)."""

    @abstractmethod
    def tokenize(self, text: str) -> list[int]:
        """The prompt's ids, with the special tokens the model expects in front (e.g. <bos>)."""

    @abstractmethod
    def detokenizer(self, prompt_ids: Sequence[int] = ()) -> Detokenizer:
        """A fresh incremental decoder for text generated after `prompt_ids`."""

    @abstractmethod
    def reset(self) -> None:
        """Empty the KV cache: the next call is a fresh prefill."""

    @abstractmethod
    def prefill(self, ids: Sequence[int]) -> np.ndarray:
        """Feed ids after what is cached; the float32 logits of the last one, shape (vocab,).

        The array may be a view into engine memory, valid until the next call.
        """

    @abstractmethod
    def step(self, token_id: int) -> np.ndarray:
        """Feed one token; the logits that follow it (same contract as prefill)."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Free engine memory; the backend is unusable afterwards."""


def default_threads() -> int:
    """CPU threads for an engine: the cores this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)
