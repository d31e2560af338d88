"""Collaborative inference: answer on the device, escalate to the coordinator's LLM when unsure.

The device always answers first (it is free, private and works offline). When its answer
looks unsure by a configurable signal, the prompt goes to the coordinator's
`POST /v1/generate`; if the coordinator cannot be reached, or refuses, the local answer
stands. Every answer says which path produced it and why.

Signals (computed from the local generation, higher = less sure):
- "mean_entropy": mean entropy (nats) of the next-token distributions while generating;
- "max_entropy": the largest such entropy (one very unsure step is enough);
- "mean_nll": mean negative log-likelihood of the tokens chosen;
- or any callable taking the GenerationResult and returning a float.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from edge_sdk.runtime.base import GenerationResult

if TYPE_CHECKING:
    from edge_sdk.runtime.loader import EdgeModel

Signal = Literal["mean_entropy", "max_entropy", "mean_nll"] | Callable[[GenerationResult], float]

_SIGNALS: dict[str, Callable[[GenerationResult], float | None]] = {
    "mean_entropy": lambda r: r.mean_entropy,
    "max_entropy": lambda r: r.max_entropy,
    "mean_nll": lambda r: r.mean_neg_logprob,
}


@dataclass
class RoutedAnswer:
    text: str
    path: Literal["local", "cloud"]
    reason: str
    signal: str
    signal_value: float | None
    threshold: float
    local: GenerationResult
    cloud: dict[str, Any] | None = None
    cloud_error: str | None = None
    cloud_seconds: float | None = None
    escalated: bool = field(default=False)

    def to_dict(self) -> dict[str, Any]:
        return {
            "text": self.text, "path": self.path, "reason": self.reason, "signal": self.signal,
            "signal_value": self.signal_value, "threshold": self.threshold, "escalated": self.escalated,
            "cloud": self.cloud, "cloud_error": self.cloud_error, "cloud_seconds": self.cloud_seconds,
            "local": self.local.to_dict(),
        }


class CollaborativeRouter:
    """Routes prompts between an EdgeModel and the coordinator's LLM.

    coordinator_url: base URL of the coordinator (None: always answer locally).
    token: the device's client bearer token (from enrollment).
    signal / threshold: escalate when signal(local result) > threshold.
    timeout_s: how long to wait for the coordinator before keeping the local answer.
    """

    def __init__(
        self,
        model: EdgeModel,
        coordinator_url: str | None = None,
        token: str | None = None,
        signal: Signal = "mean_entropy",
        threshold: float = 2.0,
        timeout_s: float = 30.0,
        connect_timeout_s: float = 3.0,
    ) -> None:
        if isinstance(signal, str) and signal not in _SIGNALS:
            raise ValueError(f"unknown signal {signal!r}; choose one of {', '.join(_SIGNALS)} or pass a callable")
        self.model = model
        self.coordinator_url = coordinator_url.rstrip("/") if coordinator_url else None
        self.token = token
        self.signal = signal
        self.threshold = float(threshold)
        self.timeout_s = timeout_s
        self.connect_timeout_s = connect_timeout_s

    @property
    def signal_name(self) -> str:
        return self.signal if isinstance(self.signal, str) else getattr(self.signal, "__name__", "custom")

    def measure(self, result: GenerationResult) -> float | None:
        fn = _SIGNALS[self.signal] if isinstance(self.signal, str) else self.signal
        value = fn(result)
        return None if value is None else float(value)

    def answer(
        self,
        prompt: str,
        max_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: str | Sequence[str] | None = None,
    ) -> RoutedAnswer:
        local = self.model.generate(prompt, max_tokens, temperature, top_p, stop, track_confidence=True)
        value = self.measure(local)
        name = self.signal_name
        common = {"signal": name, "signal_value": value, "threshold": self.threshold, "local": local}
        shown = "n/a" if value is None else f"{value:.3f}"
        if value is None or value <= self.threshold:
            why = (f"confident: {name} {shown} <= threshold {self.threshold:g}" if value is not None
                   else f"no {name} to judge by (nothing generated); kept the local answer")
            return RoutedAnswer(text=local.text, path="local", reason=why, **common)
        unsure = f"unsure: {name} {shown} > threshold {self.threshold:g}"
        if not self.coordinator_url:
            return RoutedAnswer(text=local.text, path="local", reason=f"{unsure}, but no coordinator is configured",
                                **common)
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        t0 = time.perf_counter()
        try:
            reply = self._ask_cloud({"prompt": prompt, "max_tokens": max_tokens, "temperature": temperature,
                                     "top_p": top_p, "stop": stops})
        except _CloudFailure as exc:
            return RoutedAnswer(text=local.text, path="local", escalated=True,
                                reason=f"{unsure}; the coordinator {exc.kind}, so the local answer stands",
                                cloud_error=str(exc), cloud_seconds=time.perf_counter() - t0, **common)
        return RoutedAnswer(text=reply["text"], path="cloud", escalated=True,
                            reason=f"{unsure}; answered by the coordinator's {reply.get('model', 'LLM')}",
                            cloud=reply, cloud_seconds=time.perf_counter() - t0, **common)

    def _ask_cloud(self, body: dict[str, Any]) -> dict[str, Any]:
        import httpx

        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        timeout = httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s)
        try:
            response = httpx.post(f"{self.coordinator_url}/v1/generate", json=body, headers=headers, timeout=timeout)
        except httpx.TimeoutException as exc:
            raise _CloudFailure("timed out", f"no answer from {self.coordinator_url} in time ({exc})") from None
        except httpx.TransportError as exc:
            raise _CloudFailure("is unreachable", f"cannot reach {self.coordinator_url}: {exc}") from None
        if response.status_code in (401, 403):
            raise _CloudFailure("refused this device", f"HTTP {response.status_code}: check the client token")
        if not response.is_success:
            raise _CloudFailure("failed", f"HTTP {response.status_code}: {response.text[:200]}")
        try:
            reply = response.json()
            if not isinstance(reply, dict) or not isinstance(reply.get("text"), str):
                raise ValueError("no 'text' string in the reply")
        except ValueError as exc:
            raise _CloudFailure("answered in an unexpected format", str(exc)) from None
        return reply


class _CloudFailure(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        self.kind = kind
        super().__init__(detail)
