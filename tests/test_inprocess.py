"""The in-process driver runs the coordinator's own round state machine and services: one
FedAvg round with two tiny devices, no HTTP."""

from __future__ import annotations

from pathlib import Path

from benchmarks.inprocess import Device, RoundRecord, run_inprocess
from cloud.store import BlobStore
from cloud.strategies import strategy_class
from common.protocol import RoundState, RunSpec
from common.records import read_jsonl
from common.tensorfile import read_header
from tests.support import run_spec


def test_one_fedavg_round_in_process(world, tmp_path: Path) -> None:
    spec = RunSpec.model_validate(run_spec(world, name="inproc", algorithm="fedavg", rounds=1, eval_data=None))
    store = BlobStore(tmp_path / "store")
    strategy = strategy_class("fedavg")(spec, store, None)
    devices = [Device(f"device-{k}", read_jsonl(world.data[f"client_{k}"]), tmp_path / f"device-{k}")
               for k in range(2)]
    seen: list[RoundRecord] = []

    final, history = run_inprocess(strategy, devices, 1, tmp_path / "work",
                                   after_round=lambda record, _devs: seen.append(record))

    assert [r.round for r in history] == [1] and seen == history
    record = history[0]
    assert record.info.round == 1 and record.info.state is RoundState.collecting
    assert record.metrics["num_updates"] == 2
    assert record.metrics["num_samples"] == sum(len(d.records) for d in devices)
    # FedAvg publishes the aggregate as the next adapter, and the run ends holding it.
    adapter = record.outputs["slm/adapter.safetensors"]
    assert adapter == record.metrics["aggregate_sha256"]
    assert final == record.outputs
    assert read_header(store.path(adapter)).tensors
    # Bytes as the coordinator counts them: each update up, the base model and adapter down.
    assert record.bytes_up == [d.bytes_up for d in devices] and min(record.bytes_up) > 0
    published = sum(ref.size for ref in record.info.artifacts)
    assert record.bytes_down == [published, published], "a fresh device fetches every published artifact once"
    assert len(record.device_s) == 2 and record.server_s > 0
