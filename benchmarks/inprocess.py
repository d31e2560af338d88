"""Drive a strategy's rounds and its devices' task handlers in one process, without HTTP.

The quality benchmark uses this to run many methods x seeds quickly on the same code the
coordinator and the devices run: the strategy's initial_inputs / update_schema / aggregate /
server_step, the registered device handler, the worker's artifact cache and the safetensors
update bodies. What it leaves out is the REST transport and the round state machine (the
tests cover those). Bytes are counted as a device would move them: a download is an
artifact the device's cache did not hold yet, an upload is the update body.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud.store import BlobStore
from cloud.strategies import Strategy, UpdateFile
from edge_sdk.handlers import DeviceContext, TaskHandler, handler_for
from common.protocol import META_METRICS, META_NUM_SAMPLES, ArtifactRef, RoundInfo, RoundState, RunState
from common.records import TaskRecord
from common.tensorfile import check_schema, read_header, save_arrays
from edge_sdk.worker import ArtifactCache


class StoreTransport:
    """Stands in for CoordinatorClient.download: copies blobs out of the store, counting bytes."""

    def __init__(self, store: BlobStore) -> None:
        self.store = store
        self.bytes_down = 0

    def download(self, ref: ArtifactRef, dest: Path) -> Path:
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.store.path(ref.sha256), dest)
        self.bytes_down += ref.size
        return dest


@dataclass
class Device:
    name: str
    records: list[TaskRecord]
    state_dir: Path
    local_slm: Path | None = None
    eval_records: list[TaskRecord] = field(default_factory=list)
    transport: StoreTransport | None = None
    handler: TaskHandler | None = None
    bytes_up: int = 0


@dataclass
class RoundRecord:
    round: int
    info: RoundInfo
    metrics: dict[str, Any]
    outputs: dict[str, str]
    bytes_up: list[int]
    bytes_down: list[int]
    device_s: list[float]
    server_s: float


def _info(strategy: Strategy, run_id: str, rounds: int, number: int, inputs: dict[str, str]) -> RoundInfo:
    refs = [ArtifactRef(name=n, sha256=d, size=strategy.store.size(d))
            for n, d in sorted(inputs.items()) if strategy.client_visible(n)]
    return RoundInfo(run_id=run_id, run_state=RunState.running, rounds_total=rounds, round=number,
                     state=RoundState.collecting, artifacts=refs, task=strategy.client_task(number), submitted=False)


def run_inprocess(
    strategy: Strategy,
    devices: Sequence[Device],
    rounds: int,
    work_dir: Path,
    after_round: Callable[[RoundRecord, Sequence[Device]], None] | None = None,
    run_id: str = "bench",
) -> tuple[dict[str, str], list[RoundRecord]]:
    """Run `rounds` rounds; return the final inputs (name -> digest) and a record per round.

    `after_round(record, devices)` runs after each server step, e.g. to evaluate models.
    """
    inputs = strategy.initial_inputs()
    for dev in devices:
        dev.transport = StoreTransport(strategy.store)
        cache = ArtifactCache(dev.state_dir / "cache", dev.transport)  # type: ignore[arg-type]
        ctx = DeviceContext(records=dev.records, eval_records=dev.eval_records, cache=cache,
                            state_dir=dev.state_dir, say=lambda _msg: None, progress=False,
                            local_slm=dev.local_slm)
        dev.handler = handler_for(strategy.client_task(1).kind)(ctx)
    history: list[RoundRecord] = []
    spool = Path(work_dir) / "updates"
    spool.mkdir(parents=True, exist_ok=True)
    for number in range(1, rounds + 1):
        info = _info(strategy, run_id, rounds, number, inputs)
        schema = strategy.update_schema(inputs)
        updates, ups, downs, times = [], [], [], []
        for dev in devices:
            assert dev.handler is not None and dev.transport is not None
            before, started = dev.transport.bytes_down, time.perf_counter()
            payload = dev.handler.run(info)
            body = save_arrays(payload.arrays, {META_NUM_SAMPLES: str(payload.num_samples),
                                                META_METRICS: json.dumps(payload.metrics)})
            times.append(time.perf_counter() - started)
            path = spool / f"r{number}-{dev.name}.safetensors"
            path.write_bytes(body)
            check_schema(read_header(path), schema)  # what the coordinator checks on upload
            updates.append(UpdateFile(path, payload.num_samples))
            ups.append(len(body))
            downs.append(dev.transport.bytes_down - before)
        started = time.perf_counter()
        aggregate = strategy.aggregate(iter(updates), schema)
        result = strategy.server_step(number, inputs, strategy.store.put_bytes(save_arrays(aggregate)))
        record = RoundRecord(number, info, result.metrics, result.outputs, ups, downs, times,
                             time.perf_counter() - started)
        inputs = result.outputs
        history.append(record)
        if after_round is not None:
            after_round(record, devices)
    return inputs, history
