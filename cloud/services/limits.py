"""Admission limits for work a device can ask of the coordinator (`POST /v1/generate`): a token
bucket per device, and a bound on how many requests may wait for the held models at once
(ARCHITECTURE.md, "Privacy", hostile input). Past either, 429 with Retry-After."""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from cloud import telemetry
from cloud.errors import ApiError


class TooManyRequests(ApiError):
    """429, with the whole seconds to wait before trying again in a Retry-After header."""

    def __init__(self, code: str, message: str, retry_after_s: float, hint: str | None = None) -> None:
        self.retry_after = max(1, math.ceil(retry_after_s))
        super().__init__(429, code, message, hint, headers={"Retry-After": str(self.retry_after)})
        telemetry.generate_refused(code)


@dataclass(frozen=True)
class GenerateLimits:
    rate_per_minute: float = 30.0
    burst: int = 10
    # Requests that may wait for (or hold) the model lock at once.
    queue: int = 8


class TokenBuckets:
    """One token bucket per key: `burst` requests at once, refilled at `rate_per_s`.

    Written here rather than taken from a library: `limits` and `pyrate-limiter` count requests
    in time windows (no burst separate from the rate) and bring storage backends this does not
    need; a bucket, and the exact wait until its next token, are a few lines. Keys are enrolled
    client ids, so their number is bounded by the runs' `max_devices`.
    """

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rate_per_s <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, when counted)
        self._lock = threading.Lock()

    def _tokens(self, key: str, now: float) -> float:
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) * self.rate_per_s)

    def take(self, key: str) -> float:
        """Take one token: 0.0 if there was one, else the seconds until there is (none taken)."""
        with self._lock:
            now = self._clock()
            tokens = self._tokens(key, now)
            if tokens >= 1.0:
                self._buckets[key] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key] = (tokens, now)
            return (1.0 - tokens) / self.rate_per_s

    def give_back(self, key: str) -> None:
        """Return a token taken for a request that was then refused for another reason."""
        with self._lock:
            now = self._clock()
            self._buckets[key] = (min(float(self.burst), self._tokens(key, now) + 1.0), now)
