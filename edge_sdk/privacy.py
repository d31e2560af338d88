"""Local differential privacy for uploads: clip each update's change to an L2 bound and add
Gaussian noise on the device, before anything leaves it; account the privacy spent
(ARCHITECTURE.md, "Privacy").

Sensitivity. Local DP protects a device's whole dataset against the coordinator: neighbouring
inputs are two datasets of one device (replace-one-device), so the clipped change u, with
||u|| <= C, may become any other clipped change u'. The L2 sensitivity of the release is
therefore max ||u - u'|| = 2C, not C. The noise added is what `PrivacySpec` promises,
sigma = z * C per coordinate (z = `noise_multiplier`, C = `clip_norm`), and it is accounted
with sensitivity 2C: a Gaussian mechanism of noise multiplier sigma / 2C = z / 2. (The other
honest choice, sigma = z * 2C, would silently halve every existing run's signal-to-noise; the
spec's noise stays as written and the epsilon tells the truth instead.) For z = 1.1,
delta = 1e-5 and 3 releases this reports about 19.0 (the exact figure is 17.8), where counting
sensitivity C understated it as 8.8.

Accountant. Google's dp-accounting RDP accountant, with one Gaussian DP event per release
composed over the releases the device has made in the run; no subsampling amplification is
claimed, since each device's whole dataset shapes its update every round. Each release counts,
a second one for the same round included (a coordinator may ask again; only an update that
never left the device, re-sent byte for byte, is not a new release).

What leaves the device. Under DP only the noised update and the DP block (epsilon, delta,
releases, clip and noise settings) are sent: the pre-clip norm, whether it was clipped, the
training loss, local evaluation scores and the exact sample count are all functions of the
private data without noise, so they stay here. The device declares `DECLARED_SAMPLES` as its
sample count, so the coordinator weighs every device under DP alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

SENSITIVITY_FACTOR = 2.0  # the release's L2 sensitivity, in units of clip_norm (replace-one-device)
DECLARED_SAMPLES = 1  # the sample count a device declares under DP: the exact count is private


@dataclass(frozen=True)
class PrivatizedUpdate:
    arrays: dict[str, np.ndarray]
    norm_before: float  # stays on the device: it is the private data's, without noise
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


def local_epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """(epsilon, delta)-DP of `releases` updates, each clipped to C and noised with
    std `noise_multiplier` * C (sensitivity 2C; see the module docstring); inf without noise."""
    if not 0 < delta < 1:
        raise ValueError("delta must be in (0, 1)")
    if releases <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    try:
        import dp_accounting
        from dp_accounting.rdp import rdp_privacy_accountant
    except ImportError as exc:
        raise ImportError(f"local DP needs the dp-accounting package ({exc}); "
                          "install it with pip install 'cotune[train]'") from None
    event = dp_accounting.GaussianDpEvent(noise_multiplier / SENSITIVITY_FACTOR)
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(event, releases))
    return float(accountant.get_epsilon(delta))
