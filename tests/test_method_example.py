"""The README's "Adding a method" example: FedAvgM, registered from its own module with one
call, runs its rounds in process on the unchanged `lora_sft` device handler."""

from __future__ import annotations

import numpy as np
import pytest

from cloud.strategies import SpecError, strategy_class
from common.methods import fedavg, method_names
from common.protocol import RunSpec
from common.records import read_jsonl
from common.tensorfile import load_arrays
from tests.support import TinyWorld, run_spec


def test_fedavgm_registers_and_runs_a_round_in_process(world: TinyWorld, tmp_path, monkeypatch) -> None:
    from benchmarks.inprocess import Device, run_inprocess
    from cloud.store import BlobStore
    from edge_sdk.handlers.lora_sft import LoraSftHandler

    # As `cotune serve` would find it: named in COTUNE_METHODS, imported on the first lookup.
    monkeypatch.setenv("COTUNE_METHODS", "examples.methods.fedavgm")
    cls = strategy_class("fedavgm")
    from examples.methods.fedavgm import VELOCITY

    assert "fedavgm" in method_names()
    spec = RunSpec.model_validate(run_spec(world, name="m", algorithm="fedavgm", rounds=1, eval_data=None,
                                           params={"momentum": 0.5, "server_lr": 2.0}))
    cls.check_spec(spec)
    with pytest.raises(SpecError, match=r"params\.momentum"):
        cls.check_spec(spec.model_copy(update={"params": {"momentum": 1.5}}))
    strategy = cls(spec, BlobStore(tmp_path / "store"))
    means = []
    aggregate = strategy.aggregate_round

    def keep_mean(updates, inputs):
        result = aggregate(updates, inputs)
        means.append(result.arrays)
        return result

    strategy.aggregate_round = keep_mean  # type: ignore[method-assign]
    devices = [Device(f"d{k}", read_jsonl(world.data[f"client_{k}"]), tmp_path / f"d{k}") for k in range(2)]
    final, history = run_inprocess(strategy, devices, 1, tmp_path)
    published = {ref.name: ref.sha256 for ref in history[0].info.artifacts}

    assert all(isinstance(d.handler, LoraSftHandler) for d in devices), "devices need nothing new"
    start = load_arrays(strategy.store.path(published[fedavg.SLM_ADAPTER]))
    after = load_arrays(strategy.store.path(final[fedavg.SLM_ADAPTER]))
    velocity = load_arrays(strategy.store.path(final[VELOCITY]))
    for name, weights in start.items():
        change = means[0][name].astype(np.float64) - weights
        np.testing.assert_allclose(velocity[name], change, rtol=1e-6, atol=1e-9)  # no earlier velocity
        np.testing.assert_allclose(after[name], weights + 2.0 * change, rtol=1e-5, atol=1e-7)
    assert not strategy.client_visible(VELOCITY) and strategy.client_visible(fedavg.SLM_ADAPTER)
    assert history[0].info.task.kind == fedavg.LORA_SFT
