"""Run a strategy's rounds with its devices' task handlers in one process, without HTTP.

The quality benchmark uses this to run many methods x seeds quickly on the very code a
deployment runs: the coordinator's services create the run and enroll the devices, each
device's handler works on the RoundInfo the coordinator hands out, its update is encoded as
the worker encodes it and accepted through the updates service (every upload check
included), and `RoundDriver.tick()` moves each round through the round state machine
(ARCHITECTURE.md, "Round state machine") over the in-memory SQL state (ARCHITECTURE.md,
"State interface"). Only the REST transport is left out. Bytes are the coordinator's own
per-round transfer figures: a download is an artifact the device's cache did not hold yet,
an upload is the update body. The coordinator's side (cotune/simulation/coordinator.py) is the
one `cotune simulate` runs; here every device works in this process, one after another.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cloud.coordinator import Coordinator
from cloud.state.records import ClientRecord, Direction
from cloud.strategies import Strategy
from common.protocol import ArtifactRef, RoundInfo, RoundState
from common.records import TaskRecord
from cotune.simulation.coordinator import RoundMachine, enroll, in_memory_coordinator, transfer_bytes, upload
from edge_sdk.handlers import DeviceContext, TaskHandler, handler_for
from edge_sdk.update_encoding import encode_payload
from edge_sdk.worker import ArtifactCache, encode_update


class CoordinatorTransport:
    """Stands in for CoordinatorClient.download: the coordinator's access rules and transfer
    accounting, with the blob copied straight out of its store."""

    def __init__(self, coordinator: Coordinator, client: ClientRecord) -> None:
        self.coordinator = coordinator
        self.client = client

    def download(self, ref: ArtifactRef, dest: Path) -> Path:
        source = self.coordinator.artifacts.for_client(self.client, ref.sha256)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, dest)
        self.coordinator.updates.record_transfer(self.client, Direction.down, ref.size)
        return dest


@dataclass
class Device:
    name: str
    records: list[TaskRecord]
    state_dir: Path
    local_slm: Path | None = None
    eval_records: list[TaskRecord] = field(default_factory=list)
    transport: CoordinatorTransport | None = None
    handler: TaskHandler | None = None
    bytes_up: int = 0
    client: ClientRecord | None = None


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


def run_inprocess(
    strategy: Strategy,
    devices: Sequence[Device],
    rounds: int,
    work_dir: Path,
    after_round: Callable[[RoundRecord, Sequence[Device]], None] | None = None,
    run_id: str = "bench",
) -> tuple[dict[str, str], list[RoundRecord]]:
    """Run `rounds` rounds; return the final artifacts (name -> digest) and a record per round.

    `run_id` names the run. `after_round(record, devices)` runs after each round closes,
    e.g. to evaluate models.
    """
    # The coordinator runs this very strategy instance, so the caller can look into its models.
    coordinator = in_memory_coordinator(Path(work_dir), strategy.store, factory=lambda _spec: strategy)
    try:
        spec = strategy.spec.model_copy(update={"name": run_id, "rounds": rounds, "min_clients": len(devices),
                                                "builds": [], "enroll_token": None})
        created = coordinator.runs.create(spec)
        for dev in devices:
            _enroll(coordinator, created.enroll_token, dev)
        machine = RoundMachine(coordinator, created.run_id)
        history = []
        for number in range(1, rounds + 1):
            machine.tick_until(lambda rnd, n=number: rnd.number == n and rnd.state is RoundState.collecting)
            infos, device_s = [], []
            for dev in devices:
                started = time.perf_counter()
                infos.append(_take_part(coordinator, created.run_id, dev))
                device_s.append(time.perf_counter() - started)
            started = time.perf_counter()
            machine.tick_until(lambda rnd, n=number: rnd.number > n or rnd.state is RoundState.closed)
            server_s = time.perf_counter() - started
            closed = coordinator.state.get_round(created.run_id, number)
            clients = [dev.client for dev in devices]
            record = RoundRecord(number, infos[0], closed.metrics, dict(closed.outputs or {}),
                                 transfer_bytes(coordinator, created.run_id, number, clients, Direction.up),
                                 transfer_bytes(coordinator, created.run_id, number, clients, Direction.down),
                                 device_s, server_s)
            history.append(record)
            if after_round is not None:
                after_round(record, devices)
        return coordinator.runs.holdings(coordinator.runs.get(created.run_id)).named, history
    finally:
        coordinator.close()


def _enroll(coordinator: Coordinator, enroll_token: str, dev: Device) -> None:
    dev.client = enroll(coordinator, enroll_token, dev.name, dev.local_slm)
    dev.transport = CoordinatorTransport(coordinator, dev.client)


def _take_part(coordinator: Coordinator, run_id: str, dev: Device) -> RoundInfo:
    """One device's round, as the worker does it: fetch the task, run it, upload the update."""
    assert dev.client is not None and dev.transport is not None
    info = coordinator.runs.current_round(dev.client, run_id)
    if dev.handler is None:
        ctx = DeviceContext(records=dev.records, eval_records=dev.eval_records,
                            cache=ArtifactCache(dev.state_dir / "cache", dev.transport),  # type: ignore[arg-type]
                            state_dir=dev.state_dir, say=lambda _msg: None, progress=False, local_slm=dev.local_slm)
        dev.handler = handler_for(info.task.kind)(ctx)
    # The run's update encoding, as the join loop applies it (edge_sdk/update_encoding.py).
    body = encode_update(encode_payload(dev.handler.run(info), info, dev.handler.ctx.cache), info.task.kind)
    upload(coordinator, dev.client, run_id, info.round, body)
    dev.bytes_up += len(body)
    return info
