"""Retry with exponential backoff and full jitter, for calls over an unreliable network.

Written here rather than taken from `tenacity` or `backoff` to keep the edge install
small and because the policy is a dozen lines: which errors are worth retrying is the
caller's knowledge, passed in as a predicate.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    max_tries: int = 6
    base_s: float = 0.5
    max_s: float = 20.0
    max_total_s: float | None = 120.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full jitter (AWS architecture blog): uniform in [0, min(max, base * 2**attempt)]."""
        return rng.uniform(0.0, min(self.max_s, self.base_s * (2**attempt)))


def call_with_retry(
    fn: Callable[[], T],
    should_retry: Callable[[BaseException], bool],
    policy: Backoff = Backoff(),
    on_retry: Callable[[int, BaseException, float], None] | None = None,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """Call `fn` until it succeeds, an error is not retryable, or the policy runs out."""
    rng = rng or random.Random()
    started = time.monotonic()
    attempt = 0
    while True:
        try:
            return fn()
        except BaseException as exc:
            attempt += 1
            if not should_retry(exc) or attempt >= policy.max_tries:
                raise
            wait = policy.delay(attempt - 1, rng)
            if policy.max_total_s is not None and time.monotonic() - started + wait > policy.max_total_s:
                raise
            if on_retry is not None:
                on_retry(attempt, exc, wait)
            sleep(wait)
