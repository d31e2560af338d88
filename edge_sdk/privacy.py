"""Local differential privacy for uploads: clip each update's change to an L2 bound and add
Gaussian noise on the device, before anything leaves it; account the privacy spent.

The accountant is the Rényi-DP bound of the Gaussian mechanism (Mironov 2017): one release
with noise multiplier sigma is (alpha, alpha / (2 sigma^2))-RDP for every alpha > 1, releases
compose by adding, and (alpha, r)-RDP implies (r + log(1/delta) / (alpha - 1), delta)-DP.
It is a few lines of arithmetic, so it is written here rather than pulling in opacus (and
torch) on devices that only need the number. No subsampling amplification is claimed: each
device's whole dataset shapes its update every round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

_ALPHAS = np.concatenate([np.linspace(1.01, 10, 200), np.linspace(10.5, 256, 200), [512.0, 1024.0]])


@dataclass(frozen=True)
class PrivatizedUpdate:
    arrays: dict[str, np.ndarray]
    norm_before: float
    clipped: bool


def l2_norm(arrays: Mapping[str, np.ndarray]) -> float:
    return float(math.sqrt(sum(float(np.sum(np.square(a, dtype=np.float64))) for a in arrays.values())))


def privatize(
    start: Mapping[str, np.ndarray],
    trained: Mapping[str, np.ndarray],
    clip_norm: float,
    noise_multiplier: float,
    rng: np.random.Generator | None = None,
) -> PrivatizedUpdate:
    """start + clip(trained - start) + N(0, (noise_multiplier * clip_norm)^2) per coordinate."""
    if clip_norm <= 0:
        raise ValueError("clip_norm must be positive")
    # Fresh OS entropy by default: noise a server could reproduce would protect nothing.
    rng = rng or np.random.default_rng()
    delta = {k: trained[k].astype(np.float64) - start[k].astype(np.float64) for k in start}
    norm = l2_norm(delta)
    scale = min(1.0, clip_norm / norm) if norm > 0 else 1.0
    sigma = noise_multiplier * clip_norm
    out = {}
    for k, d in delta.items():
        noisy = d * scale + (rng.normal(0.0, sigma, size=d.shape) if sigma > 0 else 0.0)
        out[k] = (start[k].astype(np.float64) + noisy).astype(np.float32)
    return PrivatizedUpdate(arrays=out, norm_before=norm, clipped=scale < 1.0)


def gaussian_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """(epsilon, delta)-DP after `releases` Gaussian releases; inf without noise."""
    if noise_multiplier <= 0:
        return math.inf
    if not 0 < delta < 1:
        raise ValueError("delta must be in (0, 1)")
    rdp = releases * _ALPHAS / (2 * noise_multiplier**2)
    return float(np.min(rdp + math.log(1 / delta) / (_ALPHAS - 1)))
