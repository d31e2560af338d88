"""FedAvg's arithmetic: the streamed weighted mean equals a hand computation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cloud.strategies import UpdateFile, weighted_mean
from common.tensorfile import TensorFileError, save_arrays


def _update(tmp_path: Path, name: str, arrays: dict[str, np.ndarray], n: int) -> UpdateFile:
    path = tmp_path / f"{name}.safetensors"
    path.write_bytes(save_arrays(arrays))
    return UpdateFile(path, n)


def test_weighted_mean_matches_hand_computation(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    shapes = {"lora_A": (8, 16), "lora_B": (16, 8)}
    samples = [3, 10, 1]
    clients = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in samples]
    updates = [_update(tmp_path, f"c{i}", arr, n) for i, (arr, n) in enumerate(zip(clients, samples, strict=True))]
    schema = {k: (s, "F32") for k, s in shapes.items()}

    result = weighted_mean(iter(updates), schema)

    for name in shapes:
        by_hand = (3 * clients[0][name] + 10 * clients[1][name] + 1 * clients[2][name]) / 14
        assert result[name].dtype == np.float32
        np.testing.assert_allclose(result[name], by_hand, rtol=1e-6, atol=1e-7)


def test_single_update_is_returned_unchanged(tmp_path: Path) -> None:
    arr = {"w": np.linspace(-1, 1, 10, dtype=np.float32)}
    result = weighted_mean([_update(tmp_path, "only", arr, 5)], {"w": ((10,), "F32")})
    np.testing.assert_array_equal(result["w"], arr["w"])


def test_mismatched_update_is_refused(tmp_path: Path) -> None:
    good = _update(tmp_path, "good", {"w": np.zeros(4, np.float32)}, 1)
    bad = _update(tmp_path, "bad", {"w": np.zeros(5, np.float32)}, 1)
    with pytest.raises(TensorFileError):
        weighted_mean([good, bad], {"w": ((4,), "F32")})


def test_no_updates_is_an_error() -> None:
    with pytest.raises(ValueError, match="no updates"):
        weighted_mean([], {"w": ((4,), "F32")})
