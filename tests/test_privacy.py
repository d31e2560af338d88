"""Local differential privacy: clipping, noise scale, and the privacy accountant."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from common.protocol import ClientTask, LoraSpec, PrivacySpec, RoundInfo, RoundState, RunState, TrainSpec
from edge_sdk.handlers.lora_sft import privatize_update
from edge_sdk.privacy import gaussian_epsilon, l2_norm, privatize


def _arrays(scale: float, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"a": (scale * rng.standard_normal((64, 8))).astype(np.float32),
            "b": (scale * rng.standard_normal((8, 64))).astype(np.float32)}


def test_clipping_bounds_the_change_and_keeps_small_updates() -> None:
    start, big = _arrays(0.0), _arrays(3.0, seed=1)
    out = privatize(start, big, clip_norm=0.5, noise_multiplier=0.0)
    change = {k: out.arrays[k] - start[k] for k in start}
    assert out.clipped
    assert l2_norm(change) == pytest.approx(0.5, rel=1e-5)
    small = _arrays(1e-3, seed=2)
    kept = privatize(start, small, clip_norm=0.5, noise_multiplier=0.0)
    assert not kept.clipped
    for k in start:
        np.testing.assert_allclose(kept.arrays[k], small[k], rtol=1e-6)


def test_noise_has_the_promised_scale() -> None:
    start = {"w": np.zeros((200, 200), np.float32)}
    out = privatize(start, start, clip_norm=2.0, noise_multiplier=0.5, rng=np.random.default_rng(0))
    assert float(np.std(out.arrays["w"])) == pytest.approx(1.0, rel=0.03)  # 0.5 * 2.0


def test_accountant_matches_the_closed_form_and_composes() -> None:
    # One release, sigma 1, delta 1e-5: min over alpha of alpha/2 + ln(1e5)/(alpha-1).
    log_inv_delta = math.log(1e5)
    alpha = 1 + math.sqrt(2 * log_inv_delta)
    exact = alpha / 2 + log_inv_delta / (alpha - 1)
    assert gaussian_epsilon(1.0, 1, 1e-5) == pytest.approx(exact, rel=0.01)
    assert gaussian_epsilon(1.0, 4, 1e-5) > gaussian_epsilon(1.0, 1, 1e-5)
    assert gaussian_epsilon(2.0, 4, 1e-5) < gaussian_epsilon(1.0, 4, 1e-5)
    assert gaussian_epsilon(0.0, 1, 1e-5) == math.inf


def test_device_reports_epsilon_spent_over_its_rounds(tmp_path) -> None:
    ctx = SimpleNamespace(state_dir=tmp_path)
    task = ClientTask(lora=LoraSpec(), train=TrainSpec(), seed=0,
                      privacy=PrivacySpec(clip_norm=1.0, noise_multiplier=1.1, delta=1e-5))
    start, trained = _arrays(0.0), _arrays(1.0, seed=3)
    spent = []
    for number in (1, 2, 2, 3):  # round 2 retried: counted once
        info = RoundInfo(run_id="r", run_state=RunState.running, rounds_total=3, round=number,
                         state=RoundState.collecting, artifacts=[], task=task, submitted=False)
        _arrays_out, report = privatize_update(ctx, info, start, trained)
        spent.append((report["releases"], report["epsilon"]))
    assert [r for r, _ in spent] == [1, 2, 2, 3]
    assert spent[0][1] < spent[1][1] == spent[2][1] < spent[3][1]
    assert spent[3][1] == pytest.approx(gaussian_epsilon(1.1, 3, 1e-5))
