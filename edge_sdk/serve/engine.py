"""The model behind the server: model ids, adapter selection, generation and escalation.

Everything here is synchronous and touches the one llama.cpp/ONNX context; the app calls it
from a worker thread while holding its lock, one request at a time (ARCHITECTURE.md, "Edge
runtime and export": an EdgeModel is not thread-safe).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edge_sdk.runtime.router import CollaborativeRouter

if TYPE_CHECKING:
    from edge_sdk.runtime import EdgeModel, GenerationResult


class UnknownModelError(LookupError):
    """The request names a model id this server does not serve."""


@dataclass(frozen=True)
class Params:
    max_tokens: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int | None


@dataclass
class Answer:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # OpenAI's: "stop" or "length"
    source: str  # "local" or "coordinator"


@dataclass(frozen=True)
class Escalation:
    coordinator_url: str
    token: str | None
    signal: str = "mean_entropy"
    threshold: float = 2.0
    timeout_s: float = 30.0


def openai_finish(reason: str) -> str:
    # Ours: eos/stop/length/context. OpenAI knows "stop" (natural end or stop string) and "length".
    return "length" if reason in ("length", "context") else "stop"


class _Seeded:
    """The model as the router sees it, with this request's seed (the router takes none)."""

    def __init__(self, model: EdgeModel, seed: int | None) -> None:
        self._model, self._seed = model, seed

    def generate(self, *args: Any, **kwargs: Any) -> GenerationResult:
        return self._model.generate(*args, seed=self._seed, **kwargs)


class ServeEngine:
    """One EdgeModel served under `model_id`, and under `model_id:adapter` per loaded LoRA adapter."""

    def __init__(self, model: EdgeModel, model_id: str, escalation: Escalation | None = None) -> None:
        self.model = model
        self.model_id = model_id
        self.escalation = escalation
        # The adapters switched on at load are what the plain model id means.
        self._initial = model.active_adapters[:1] if model.backend_name == "llama.cpp" else []
        self._current: str | None = self._initial[0][0] if self._initial else None

    def model_ids(self) -> list[str]:
        adapters = self.model.adapters if self.model.backend_name == "llama.cpp" else []
        return [self.model_id, *(f"{self.model_id}:{name}" for name in adapters)]

    def resolve(self, model: str) -> str | None:
        """The adapter a model id selects (None: the build as loaded); UnknownModelError otherwise."""
        if model == self.model_id:
            return self._initial[0][0] if self._initial else None
        prefix = f"{self.model_id}:"
        if model.startswith(prefix) and model in self.model_ids():
            return model[len(prefix):]
        raise UnknownModelError(model)

    def _activate(self, adapter: str | None) -> None:
        if adapter == self._current:
            return  # switching clears the KV cache, so only when it changes
        scale = self._initial[0][1] if self._initial and self._initial[0][0] == adapter else 1.0
        self.model.use_adapter(adapter, scale)
        self._current = adapter

    def generate(self, prompt: str, params: Params, adapter: str | None) -> Answer:
        self._activate(adapter)
        if self.escalation is not None:
            return self._routed(prompt, params)
        result = self.model.generate(prompt, params.max_tokens, params.temperature, params.top_p, params.stop,
                                     seed=params.seed)
        return Answer(result.text, result.prompt_tokens, result.completion_tokens,
                      openai_finish(result.finish_reason), "local")

    def stream(self, prompt: str, params: Params, adapter: str | None) -> tuple[Iterator[str], list[Answer]]:
        """(text pieces, a list that holds the totals once the pieces are exhausted).

        With escalation configured the whole answer is decided first (the router judges a
        finished local answer), then sent as one piece.
        """
        self._activate(adapter)
        done: list[Answer] = []
        if self.escalation is not None:
            answer = self._routed(prompt, params)
            done.append(answer)
            return iter([answer.text] if answer.text else []), done
        chunks = self.model.stream(prompt, params.max_tokens, params.temperature, params.top_p, params.stop,
                                   seed=params.seed)

        def pieces() -> Iterator[str]:
            for chunk in chunks:
                if chunk.text:
                    yield chunk.text
            result = chunks.result
            assert result is not None
            done.append(Answer(result.text, result.prompt_tokens, result.completion_tokens,
                               openai_finish(result.finish_reason), "local"))

        return pieces(), done

    def _routed(self, prompt: str, params: Params) -> Answer:
        esc = self.escalation
        assert esc is not None
        router = CollaborativeRouter(_Seeded(self.model, params.seed), esc.coordinator_url, esc.token,  # type: ignore[arg-type]
                                     signal=esc.signal, threshold=esc.threshold, timeout_s=esc.timeout_s)
        routed = router.answer(prompt, params.max_tokens, params.temperature, params.top_p, list(params.stop))
        local = routed.local
        if routed.path == "cloud" and routed.cloud is not None:
            tokens = int(routed.cloud.get("tokens") or 0)
            return Answer(routed.text, local.prompt_tokens, tokens,
                          "length" if tokens >= params.max_tokens else "stop", "coordinator")
        return Answer(local.text, local.prompt_tokens, local.completion_tokens,
                      openai_finish(local.finish_reason), "local")
