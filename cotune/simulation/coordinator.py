"""The coordinator's side of a run in one process, without HTTP.

The real services do the work: RunsService creates the run, enrolls devices and hands out
each round's RoundInfo, UpdatesService checks and accepts an upload exactly as the route does
once the body is spooled (every upload check included), and `RoundDriver.tick()` moves each
round through the round state machine (ARCHITECTURE.md, "Round state machine") over SQLite in
memory (ARCHITECTURE.md, "State interface"). Only the REST transport is left out.
`cotune simulate` and the quality benchmark's in-process loop (benchmarks/inprocess.py) share it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from cloud.coordinator import Coordinator
from cloud.rounds import RoundDriver
from cloud.services.runs import StrategyFactory
from cloud.settings import CoordinatorSettings
from cloud.state import SqlState
from cloud.state.records import ClientRecord, Direction
from cloud.state.records import RoundRecord as StateRound
from cloud.state.sql import MEMORY_URL
from cloud.store import BlobStore
from common.protocol import ClientRegistration, RunState, UpdateReceipt
from edge_sdk.handlers import task_kinds


def in_memory_coordinator(work_dir: Path, store: BlobStore | Path,
                          factory: StrategyFactory | None = None) -> Coordinator:
    """A coordinator over SQLite in memory and the blob store `store` (a BlobStore or its folder);
    `factory` makes each run's strategy (default: by the run's algorithm, as `cotune serve` does)."""
    root = store.root if isinstance(store, BlobStore) else Path(store)
    settings = CoordinatorSettings(state_url=MEMORY_URL, artifact_dir=str(root),
                                   work_dir=Path(work_dir) / "coordinator")
    return Coordinator(settings, state=SqlState.in_memory(), store=store if isinstance(store, BlobStore) else None,
                       factory=factory)


def enroll(coordinator: Coordinator, enroll_token: str, name: str, local_slm: Path | None = None) -> ClientRecord:
    """Enroll a device as `POST /v1/clients` does; a device bringing its own SLM describes it."""
    slm = None
    if local_slm is not None:
        from common.checkpoint import describe_local_slm

        slm = describe_local_slm(local_slm)
    creds = coordinator.runs.enroll(enroll_token, ClientRegistration(name=name, task_kinds=task_kinds(), slm=slm))
    return coordinator.state.get_client(creds.client_id)


def upload(coordinator: Coordinator, client: ClientRecord, run_id: str, number: int, body: bytes) -> UpdateReceipt:
    """An update body through the checks and acceptance `PUT .../updates/{client}` runs."""
    # Where the HTTP route spools an upload; accepting it moves the file into the store.
    spooled = coordinator.spool_dir / f"{client.id}-{number}.safetensors"
    spooled.write_bytes(body)
    coordinator.updates.check_can_upload(client, run_id, number, client.id)
    return coordinator.updates.accept_update(client, run_id, number, spooled)


def transfer_bytes(coordinator: Coordinator, run_id: str, number: int, clients: Sequence[ClientRecord | None],
                   direction: Direction) -> list[int]:
    """Each client's bytes in `direction` in round `number`, as the coordinator counted them."""
    totals = coordinator.state.transfer_totals(run_id, number)
    by_client = {t.client_id: t.bytes for t in totals if t.direction is direction}
    return [by_client.get(c.id, 0) if c is not None else 0 for c in clients]


class RoundMachine:
    """The round driver, ticked by hand until the run's current round reaches a condition."""

    def __init__(self, coordinator: Coordinator, run_id: str) -> None:
        self.state = coordinator.state
        self.run_id = run_id
        self.driver: RoundDriver = coordinator.driver()

    def tick_until(self, reached: Callable[[StateRound], bool]) -> None:
        while not reached(self.state.current_round(self.run_id)):
            if self.driver.tick():
                continue
            run, rnd = self.state.get_run(self.run_id), self.state.current_round(self.run_id)
            if run.state is RunState.failed:
                raise RuntimeError(f"the run failed: {run.error}")
            raise RuntimeError(f"round {rnd.number} is stuck in {rnd.state.value} ({run.state.value} run)")
