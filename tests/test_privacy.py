"""Local differential privacy: clipping, noise scale, and the privacy accountant."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from common.protocol import ClientTask, LoraSpec, PrivacySpec, RoundInfo, RoundState, RunState, TrainSpec
from edge_sdk.handlers.lora_sft import private_payload
from edge_sdk.paths import UnsafePathError
from edge_sdk.privacy import l2_norm, local_epsilon, privatize


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


def test_device_reports_epsilon_spent_over_its_releases(tmp_path) -> None:
    ctx = SimpleNamespace(state_dir=tmp_path)
    task = ClientTask(lora=LoraSpec(), train=TrainSpec(), seed=0,
                      privacy=PrivacySpec(clip_norm=1.0, noise_multiplier=1.1, delta=1e-5))
    start, trained = _arrays(0.0), _arrays(1.0, seed=3)
    spent = []
    # Round 2 asked twice: two noised updates were made, and the coordinator may hold both.
    for number in (1, 2, 2, 3):
        info = RoundInfo(run_id="r", run_state=RunState.running, rounds_total=3, round=number,
                         state=RoundState.collecting, artifacts=[], task=task, submitted=False)
        report = private_payload(ctx, info, start, trained).metrics["privacy"]
        spent.append((report["releases"], report["epsilon"]))
    assert [r for r, _ in spent] == [1, 2, 3, 4]
    assert spent[0][1] < spent[1][1] < spent[2][1] < spent[3][1]
    assert spent[3][1] == pytest.approx(local_epsilon(1.1, 4, 1e-5))


def test_ledger_of_a_run_id_that_is_a_path_is_refused(tmp_path) -> None:
    ctx = SimpleNamespace(state_dir=tmp_path / "state", coordinator="http://coordinator.example")
    ctx.state_dir.mkdir()
    task = ClientTask(lora=LoraSpec(), train=TrainSpec(), seed=0, privacy=PrivacySpec(noise_multiplier=1.0))
    info = RoundInfo(run_id="../escaped", run_state=RunState.running, rounds_total=1, round=1,
                     state=RoundState.collecting, artifacts=[], task=task, submitted=False)
    with pytest.raises(UnsafePathError, match="run id"):
        private_payload(ctx, info, _arrays(0.0), _arrays(1.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]
