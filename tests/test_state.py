"""One suite for every `CoordinatorState` backend (a SQLite file, SQLite in memory, and
PostgreSQL when COTUNE_TEST_POSTGRES_URL names a server): what the coordinator relies on."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from cloud.state import CoordinatorState, RunExists, SqlState
from cloud.state.records import (
    ArtifactRecord,
    BuildRecord,
    ClientRecord,
    Direction,
    NewRun,
    TransferTotal,
    UpdateOutcome,
    UpdateRecord,
)
from common.protocol import RoundState, RunState
from tests.conftest import postgres_database

D1, D2, D3 = ("1" * 64, "2" * 64, "3" * 64)
S = RoundState


@pytest.fixture(params=["sqlite-file", "sqlite-memory", "postgresql"])
def state(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[CoordinatorState]:
    if request.param == "postgresql":
        with postgres_database() as url:
            backend = SqlState(url)
            yield backend
            backend.close()
        return
    backend = SqlState.in_memory() if request.param == "sqlite-memory" else SqlState(f"sqlite:///{tmp_path / 's.db'}")
    yield backend
    backend.close()


def _run(state: CoordinatorState, name: str = "r", rounds: int = 2) -> str:
    run_id = f"run-{name}"
    state.create_run(NewRun(id=run_id, name=name, algorithm="fedavg", spec={"rounds": rounds},
                            enroll_token_hash=f"enroll-{name}"),
                     {"slm/adapter.safetensors": D1, "llm/adapter.safetensors": D2},
                     [ArtifactRecord(D1, 10, True), ArtifactRecord(D2, 20, False)])
    return run_id


def _client(state: CoordinatorState, run_id: str, name: str) -> ClientRecord:
    return state.enroll_client(ClientRecord(id=f"{run_id}{name}", run_id=run_id, name=name, token_hash=f"tok-{name}"))


def _update(run_id: str, client_id: str, digest: str, number: int = 1, samples: int = 5) -> UpdateRecord:
    return UpdateRecord(run_id=run_id, round=number, client_id=client_id, sha256=digest, size=100,
                        num_samples=samples, metrics={"loss": 1.0})


def _to_server_step(state: CoordinatorState, run_id: str, number: int = 1) -> None:
    """Walk a round to server_step as a driver named `me` would, holding that step's lease."""
    for old, new in [(S.open, S.collecting), (S.collecting, S.aggregating)]:
        assert state.transition(run_id, number, old, new)
    until = datetime.now(timezone.utc) + timedelta(minutes=5)
    assert state.claim_lease(run_id, number, S.aggregating, "me", until)
    assert state.transition(run_id, number, S.aggregating, S.server_step, lease_holder="me", aggregate_digest=D3)
    assert state.claim_lease(run_id, number, S.server_step, "me", until)


# -- runs --------------------------------------------------------------------------------------


def test_a_run_is_created_with_its_first_round_and_artifacts(state: CoordinatorState) -> None:
    run_id = _run(state)
    run = state.get_run(run_id)
    assert run.state is RunState.running and run.current_round == 1 and run.metrics == {}
    assert state.run_by_name("r") == run == state.run_by_enroll_token_hash("enroll-r")
    first = state.current_round(run_id)
    assert (first.number, first.state) == (1, S.open)
    assert first.inputs == {"slm/adapter.safetensors": D1, "llm/adapter.safetensors": D2}
    assert state.artifact_visible(run_id, D1) and not state.artifact_visible(run_id, D2)
    assert [r.id for r in state.list_runs(RunState.running)] == [run_id]
    assert state.list_runs(RunState.finished) == []
    assert state.get_run("nope") is None and state.run_by_name("nope") is None


def test_a_taken_name_creates_nothing(state: CoordinatorState) -> None:
    _run(state)
    with pytest.raises(RunExists):
        state.create_run(NewRun(id="other", name="r", algorithm="fedavg", spec={}, enroll_token_hash="x"), {}, [])
    assert state.get_run("other") is None
    assert state.get_round("other", 1) is None
    assert len(state.list_runs()) == 1


def test_run_metrics_merge_and_failure_marks_round_and_run(state: CoordinatorState) -> None:
    run_id = _run(state)
    state.set_run_metrics(run_id, {"initial": {"slm": 1}})
    state.set_run_metrics(run_id, {"builds": {"names": []}})
    assert state.get_run(run_id).metrics == {"initial": {"slm": 1}, "builds": {"names": []}}
    state.fail_run(run_id, 1, "ValueError: boom")
    run, rnd = state.get_run(run_id), state.get_round(run_id, 1)
    assert run.state is RunState.failed and run.error == "round 1: ValueError: boom"
    assert rnd.state is S.failed and rnd.error == "ValueError: boom"


# -- rounds ------------------------------------------------------------------------------------


def test_compare_and_set_refuses_a_wrong_old_state(state: CoordinatorState) -> None:
    run_id = _run(state)
    assert not state.transition(run_id, 1, S.collecting, S.aggregating)
    assert state.get_round(run_id, 1).state is S.open
    deadline = datetime.now(timezone.utc) + timedelta(minutes=10)
    assert state.transition(run_id, 1, S.open, S.collecting, collecting_at=datetime.now(timezone.utc),
                            deadline_at=deadline)
    rnd = state.get_round(run_id, 1)
    assert rnd.state is S.collecting and abs((rnd.deadline_at - deadline).total_seconds()) < 1e-3
    # The same move again (another replica, or a restart redoing it) changes nothing.
    assert not state.transition(run_id, 1, S.open, S.collecting)
    assert not state.transition(run_id, 2, S.open, S.collecting)


def test_a_held_lease_blocks_others_until_it_expires(state: CoordinatorState) -> None:
    run_id = _run(state)
    assert state.transition(run_id, 1, S.open, S.collecting)
    assert state.transition(run_id, 1, S.collecting, S.aggregating)
    now = datetime.now(timezone.utc)
    assert not state.claim_lease(run_id, 1, S.server_step, "a", now + timedelta(seconds=60)), "wrong state"
    assert state.claim_lease(run_id, 1, S.aggregating, "a", now + timedelta(seconds=60), now=now)
    assert state.claim_lease(run_id, 1, S.aggregating, "a", now + timedelta(seconds=90), now=now), "renewal"
    assert not state.claim_lease(run_id, 1, S.aggregating, "b", now + timedelta(seconds=60), now=now)
    # Without the lease, b cannot publish the step's result either.
    assert not state.transition(run_id, 1, S.aggregating, S.server_step, lease_holder="b", aggregate_digest=D3)
    later = now + timedelta(seconds=91)
    assert state.claim_lease(run_id, 1, S.aggregating, "b", later + timedelta(seconds=60), now=later)
    # a's lease ran out: its late result is refused, b's goes in.
    assert not state.transition(run_id, 1, S.aggregating, S.server_step, lease_holder="a", aggregate_digest=D1)
    assert state.transition(run_id, 1, S.aggregating, S.server_step, lease_holder="b", aggregate_digest=D3)
    rnd = state.get_round(run_id, 1)
    assert (rnd.state, rnd.aggregate_digest, rnd.lease_owner, rnd.lease_until) == (S.server_step, D3, None, None)
    assert [(e.step, e.instance) for e in state.round_events(run_id, 1)] == [
        ("aggregating", "a"), ("aggregating", "a"), ("aggregating", "b")]


def test_closing_opens_the_next_round_then_finishes_the_run(state: CoordinatorState) -> None:
    run_id = _run(state, rounds=2)
    outputs = {"slm/adapter.safetensors": D3}
    for number in (1, 2):
        _to_server_step(state, run_id, number)
        assert not state.close_round(run_id, number, last=number == 2), "not publishing yet"
        assert state.transition(run_id, number, S.server_step, S.publishing, lease_holder="me", outputs=outputs,
                                metrics={"n": number}, artifacts=[ArtifactRecord(D3, 30, True)])
        assert state.close_round(run_id, number, last=number == 2)
        assert not state.close_round(run_id, number, last=number == 2), "closed once"
        closed = state.get_round(run_id, number)
        assert closed.state is S.closed and closed.closed_at is not None and closed.metrics == {"n": number}
    run = state.get_run(run_id)
    assert run.state is RunState.finished and run.current_round == 2 and run.artifacts == outputs
    assert state.get_round(run_id, 2).inputs == outputs, "round 2 starts from round 1's outputs"
    assert state.get_round(run_id, 3) is None
    assert [r.number for r in state.list_rounds(run_id)] == [1, 2]
    assert state.current_round(run_id).number == 2
    assert state.artifact_visible(run_id, D3)


def test_a_stopped_run_stops_once_and_its_rounds_never_close(state: CoordinatorState) -> None:
    run_id = _run(state, rounds=1)
    _to_server_step(state, run_id)
    assert state.transition(run_id, 1, S.server_step, S.publishing, lease_holder="me", outputs={"x": D3})
    assert state.stop_run(run_id)
    assert not state.stop_run(run_id), "a stopped run is not stopped again"
    assert not state.stop_run("nobody")
    assert not state.close_round(run_id, 1, last=True), "a step under way when the run stopped cannot finish it"
    run = state.get_run(run_id)
    assert run.state is RunState.stopped and run.artifacts == {}
    assert state.get_round(run_id, 1).state is S.publishing
    assert [r.id for r in state.list_runs(RunState.running)] == []
    client = _client(state, run_id, "late")
    outcome = state.insert_update(_update(run_id, client.id, D1)).outcome
    assert outcome is UpdateOutcome.closed, "a stopped run takes no update"


def test_a_finished_run_cannot_be_stopped(state: CoordinatorState) -> None:
    run_id = _run(state, rounds=1)
    _to_server_step(state, run_id)
    assert state.transition(run_id, 1, S.server_step, S.publishing, lease_holder="me", outputs={"x": D3})
    assert state.close_round(run_id, 1, last=True)
    assert not state.stop_run(run_id)
    assert state.get_run(run_id).state is RunState.finished


# -- clients and updates -----------------------------------------------------------------------


def test_a_state_file_from_before_last_seen_opens(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'old.db'}"
    old = SqlState(url)
    run_id = _run(old)
    client = _client(old, run_id, "a")
    with old.engine.begin() as conn:  # as a coordinator that kept no last_seen wrote it
        conn.exec_driver_sql("ALTER TABLE clients DROP COLUMN last_seen")
    old.close()
    state = SqlState(url)
    try:
        assert [c.client.last_seen for c in state.list_clients(run_id)] == [None]
        now = datetime.now(timezone.utc)
        assert state.touch_client(client.id, now, every_s=30)
        assert state.get_client(client.id).last_seen == now
    finally:
        state.close()


def test_clients_are_listed_with_updates_sent_and_last_seen(state: CoordinatorState) -> None:
    run_id, other = _run(state, "r"), _run(state, "o")
    a, b = _client(state, run_id, "a"), _client(state, run_id, "b")
    _client(state, other, "x")
    assert a.enrolled_at is not None and a.last_seen is not None, "enrolling is a call"
    assert state.insert_update(_update(run_id, a.id, D1)).outcome is UpdateOutcome.accepted
    assert state.revoke_client(b.id)
    listed = state.list_clients(run_id)
    assert [(c.client.id, c.updates_sent, c.client.revoked) for c in listed] == [(a.id, 1, False), (b.id, 0, True)]
    seen = listed[0].client.last_seen
    assert seen is not None and seen.tzinfo is not None
    # Within `every_s` of the last write nothing is written; past it, once.
    assert not state.touch_client(a.id, seen + timedelta(seconds=10), every_s=30)
    later = seen + timedelta(seconds=31)
    assert state.touch_client(a.id, later, every_s=30)
    assert not state.touch_client(a.id, later + timedelta(seconds=1), every_s=30)
    assert state.get_client(a.id).last_seen == later
    assert not state.touch_client("nobody", later, every_s=30)
    assert state.list_clients("nobody") == []



def test_clients_enroll_and_are_revoked(state: CoordinatorState) -> None:
    run_id = _run(state)
    a, _b = _client(state, run_id, "a"), _client(state, run_id, "b")
    assert state.client_by_token_hash("tok-a") == a == state.get_client(a.id)
    assert state.count_active_clients(run_id) == 2
    assert state.revoke_client(a.id)
    assert state.client_by_token_hash("tok-a").revoked
    assert state.count_active_clients(run_id) == 1
    assert not state.revoke_client("nobody")


def test_an_update_is_accepted_once(state: CoordinatorState) -> None:
    run_id = _run(state)
    a, b = _client(state, run_id, "a"), _client(state, run_id, "b")
    first = state.insert_update(_update(run_id, a.id, D1))
    assert first.outcome is UpdateOutcome.accepted
    again = state.insert_update(_update(run_id, a.id, D1, samples=99))
    assert again.outcome is UpdateOutcome.duplicate and again.update.num_samples == 5
    other = state.insert_update(_update(run_id, a.id, D2))
    assert other.outcome is UpdateOutcome.conflict and other.update.sha256 == D1
    assert state.insert_update(_update(run_id, b.id, D2, samples=7)).outcome is UpdateOutcome.accepted
    assert state.count_updates(run_id, 1) == 2
    assert [(u.client_id, u.num_samples, u.metrics) for u in state.list_updates(run_id, 1)] == [
        (a.id, 5, {"loss": 1.0}), (b.id, 7, {"loss": 1.0})]
    assert state.get_update(run_id, 1, a.id).sha256 == D1 and state.get_update(run_id, 1, "x") is None
    # The upload counts as bytes up; its blob is the server's, not the clients'.
    assert TransferTotal(a.id, Direction.up, 100) in state.transfer_totals(run_id, 1)
    assert state.artifact_visible(run_id, D1), "D1 was published visibly at creation"
    assert not state.artifact_visible(run_id, D2), "an update blob stays hidden"


def test_a_round_past_collecting_takes_no_update(state: CoordinatorState) -> None:
    run_id = _run(state)
    a, b = _client(state, run_id, "a"), _client(state, run_id, "b")
    assert state.insert_update(_update(run_id, a.id, D1)).outcome is UpdateOutcome.accepted
    assert state.transition(run_id, 1, S.open, S.collecting)
    assert state.transition(run_id, 1, S.collecting, S.aggregating)
    late = state.insert_update(_update(run_id, b.id, D2))
    assert late.outcome is UpdateOutcome.closed and late.update is None
    assert state.insert_update(_update(run_id, b.id, D2, number=2)).outcome is UpdateOutcome.closed
    assert state.count_updates(run_id, 1) == 1
    assert state.transfer_totals(run_id, 1) == [TransferTotal(a.id, Direction.up, 100)]


# -- artifacts, builds, transfers --------------------------------------------------------------


def test_artifact_visibility_only_widens(state: CoordinatorState) -> None:
    run_id, other = _run(state, "r"), _run(state, "s")
    state.add_artifacts(run_id, [ArtifactRecord(D3, 5, False)])
    assert not state.artifact_visible(run_id, D3)
    state.add_artifacts(run_id, [ArtifactRecord(D3, 5, True)])
    assert state.artifact_visible(run_id, D3)
    state.add_artifacts(run_id, [ArtifactRecord(D3, 5, False)])
    assert state.artifact_visible(run_id, D3), "a hidden re-add never narrows"
    # One batch naming the same bytes twice: visible wins, whatever the order.
    state.add_artifacts(other, [ArtifactRecord(D3, 5, True), ArtifactRecord(D3, 5, False)])
    assert state.artifact_visible(other, D3)
    assert not state.artifact_visible(other, "f" * 64)


def test_builds_server_and_per_device(state: CoordinatorState) -> None:
    run_id = _run(state)
    a, b = _client(state, run_id, "a"), _client(state, run_id, "b")
    state.upsert_builds([BuildRecord(run_id, 1, "gguf-q8_0", {"v": 1})], [ArtifactRecord(D3, 7, True)])
    state.upsert_builds([BuildRecord(run_id, 1, "gguf-q8_0", {"v": 2})])
    state.upsert_builds([BuildRecord(run_id, 1, "gguf-q8_0", {"v": "a"}, client_id=a.id)])
    state.upsert_builds([BuildRecord(run_id, 1, "gguf-q8_0", {"v": "a"}, client_id=a.id)])  # resent: same row
    state.upsert_builds([BuildRecord(run_id, 1, "gguf-q8_0", {"v": "b"}, client_id=b.id)])
    assert state.artifact_visible(run_id, D3)
    everything = state.list_builds(run_id)
    assert sorted((x.client_id or "", x.manifest["v"]) for x in everything) == [("", 2), (a.id, "a"), (b.id, "b")]
    seen_by_a = state.list_builds(run_id, client_id=a.id)
    assert sorted((x.client_id or "", x.manifest["v"]) for x in seen_by_a) == [("", 2), (a.id, "a")]
    with pytest.raises(ValueError):
        state.upsert_builds([BuildRecord(run_id, 1, "x", {}), BuildRecord("other", 1, "x", {})])


def test_transfers_sum_per_round_client_and_direction(state: CoordinatorState) -> None:
    run_id = _run(state, rounds=1)
    a, b = _client(state, run_id, "a"), _client(state, run_id, "b")
    for client, direction, n in [(a, Direction.down, 10), (a, Direction.down, 5), (b, Direction.down, 7),
                                 (a, Direction.up, 3)]:
        state.record_transfer(run_id, client.id, direction, n)
    assert sorted(state.transfer_totals(run_id, 1), key=lambda t: (t.client_id, t.direction.value)) == [
        TransferTotal(a.id, Direction.down, 15), TransferTotal(a.id, Direction.up, 3),
        TransferTotal(b.id, Direction.down, 7)]
    _to_server_step(state, run_id)
    assert state.transition(run_id, 1, S.server_step, S.publishing, lease_holder="me", outputs={})
    assert state.close_round(run_id, 1, last=True)
    state.record_transfer(run_id, a.id, Direction.down, 1000)  # the final model: outside any round
    assert sum(t.bytes for t in state.transfer_totals(run_id, 1)) == 25


def test_byte_counts_past_32_bits(state: CoordinatorState) -> None:
    """A device pulling a 3 GiB build: counts are 64-bit on every backend."""
    run_id = _run(state, rounds=1)
    a = _client(state, run_id, "a")
    big = 3 * 2**30
    state.record_transfer(run_id, a.id, Direction.down, big)
    state.record_transfer(run_id, a.id, Direction.down, big)
    assert state.transfer_totals(run_id, 1) == [TransferTotal(a.id, Direction.down, 2 * big)]


def test_counts_for_metrics(state: CoordinatorState) -> None:
    first, second = _run(state, "r"), _run(state, "s")
    a = _client(state, first, "a")
    _client(state, second, "b")
    state.insert_update(_update(first, a.id, D1))
    state.fail_run(second, 1, "x")
    counts = state.counts()
    assert counts.runs_by_state == {"running": 1, "failed": 1}
    assert (counts.clients, counts.updates) == (2, 1)


def test_threads_share_one_state(state: CoordinatorState) -> None:
    """The round driver's thread and the request threads see one state (in memory too)."""
    run_id = _run(state)
    clients = [f"c{k}" for k in range(8)]
    errors: list[BaseException] = []

    def enroll(name: str) -> None:
        try:
            _client(state, run_id, name)
            state.record_transfer(run_id, f"{run_id}{name}", Direction.down, 1)
        except BaseException as exc:  # surfaced below, in the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=enroll, args=(name,)) for name in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert state.count_active_clients(run_id) == len(clients)
    assert sum(t.bytes for t in state.transfer_totals(run_id, 1)) == len(clients)
