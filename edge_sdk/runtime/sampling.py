"""Choosing the next token from logits: greedy, temperature, top-k and top-p (nucleus).

Both backends hand their logits to the same sampler, so the same settings and seed give
the same choices on llama.cpp and ONNX Runtime. Everything works on numpy float32 views;
with vocabularies of 256k entries a full sort per token would cost more than the model's
own step, so top-p sorts only the few candidates that can matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Candidates partitioned out before sorting for top-p; a wider sort only happens when these
# do not yet reach the requested probability mass.
_TOP_P_CANDIDATES = 512


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 means no limit), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64, copy=False)
    shifted = x - x.max()
    return shifted - np.log(np.exp(shifted).sum())


def entropy_and_logprob(logits: np.ndarray, token_id: int) -> tuple[float, float]:
    """Entropy (nats) of the model's distribution at this step, and the chosen token's log-prob."""
    logp = log_softmax(logits)
    p = np.exp(logp)
    return float(-(p * logp).sum()), float(logp[token_id])


class Sampler:
    """Stateful only through its random generator (seeded for reproducible sampling)."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        p = self.params
        if p.greedy:
            return int(np.argmax(logits))
        scaled = logits.astype(np.float64) / p.temperature
        n = scaled.shape[0]
        idx = np.argpartition(scaled, n - p.top_k)[n - p.top_k:] if p.top_k and p.top_k < n else None
        if p.top_p < 1.0:
            idx = self._nucleus(scaled, idx)
        if idx is None:
            probs = np.exp(scaled - scaled.max())
            probs /= probs.sum()
            return int(self._rng.choice(n, p=probs))
        sub = scaled[idx]
        probs = np.exp(sub - sub.max())
        probs /= probs.sum()
        return int(idx[self._rng.choice(len(idx), p=probs)])

    def _nucleus(self, scaled: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
        """The smallest set of most likely tokens whose probability reaches top_p."""
        top_p = self.params.top_p
        pool = allowed if allowed is not None else np.arange(scaled.shape[0])
        # Normalise over the whole pool (after top-k), as nucleus sampling is defined.
        pool_logits = scaled[pool]
        shift = pool_logits.max()
        log_z = shift + np.log(np.exp(pool_logits - shift).sum())
        width = min(_TOP_P_CANDIDATES, len(pool))
        while True:
            if width < len(pool):
                part = np.argpartition(pool_logits, len(pool) - width)[len(pool) - width:]
            else:
                part = np.arange(len(pool))
            order = part[np.argsort(-pool_logits[part], kind="stable")]
            cum = np.cumsum(np.exp(pool_logits[order] - log_z))
            if cum[-1] >= top_p or width >= len(pool):
                keep = int(np.searchsorted(cum, top_p) + 1)
                return pool[order[: min(keep, len(order))]]
            width = min(len(pool), width * 8)
