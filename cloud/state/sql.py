"""`CoordinatorState` in SQL (ARCHITECTURE.md, "State interface"): a SQLite file by default,
PostgreSQL by URL (replicas share it), and SQLite in memory for in-process use.

Every method is one transaction. Round transitions are compare-and-set UPDATEs whose WHERE
names the expected state (and, for slow steps, the lease holder), so of two replicas racing
for one step at most one commits (ARCHITECTURE.md, "Round state machine").
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, func, inspect, select, text, update
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from cloud.state.base import CoordinatorState, RunExists, RunFull, StateUnavailable
from cloud.state.records import (
    ArtifactRecord,
    BuildRecord,
    ClientListing,
    ClientRecord,
    Direction,
    NewRun,
    RoundEventRecord,
    RoundRecord,
    RunRecord,
    SecaggMessage,
    SecaggShare,
    StateCounts,
    TransferTotal,
    UpdateInsert,
    UpdateOutcome,
    UpdateRecord,
)
from cloud.state.tables import (
    Artifact,
    Base,
    Build,
    Client,
    Round,
    RoundEvent,
    Run,
    SecaggKeyRow,
    SecaggMessageRow,
    SecaggShareRow,
    Transfer,
    Update,
    utcnow,
)
from common.protocol import RoundState, RunState

MEMORY_URL = "sqlite://"
_ACCEPTING = (RoundState.open.value, RoundState.collecting.value)


def aware(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything stored is UTC."""
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt


def _in_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def make_engine(url: str) -> Engine:
    parsed = make_url(url)
    kwargs: dict[str, Any] = {}
    if _in_memory(parsed):
        # One connection for every thread: each new connection would open a new, empty database.
        kwargs.update(poolclass=StaticPool, connect_args={"check_same_thread": False})
    elif parsed.get_backend_name() == "sqlite":
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
    else:
        kwargs["pool_pre_ping"] = True
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    Base.metadata.create_all(engine)
    _add_missing_columns(engine)
    return engine


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    # WAL lets readers (polling clients) go on while a transition commits; synchronous=FULL
    # makes a committed transition survive a power cut, not only a process kill.
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _add_missing_columns(engine: Engine) -> None:
    # A state file written before device-made builds existed lacks builds.client_id;
    # create_all adds tables, never columns.
    if "client_id" not in {c["name"] for c in inspect(engine).get_columns("builds")}:
        with engine.begin() as conn:
            conn.execute(text("ALTER TABLE builds ADD COLUMN client_id VARCHAR(32) REFERENCES clients (id)"))
    # ... and one written before devices' last_seen was kept lacks clients.last_seen.
    if "last_seen" not in {c["name"] for c in inspect(engine).get_columns("clients")}:
        stamp = "TIMESTAMP WITH TIME ZONE" if engine.dialect.name == "postgresql" else "DATETIME"
        with engine.begin() as conn:
            conn.execute(text(f"ALTER TABLE clients ADD COLUMN last_seen {stamp}"))
    # Byte counts and sizes were 32-bit INTEGER on PostgreSQL, too small for a build over 2 GiB.
    # (SQLite's INTEGER is already 64-bit.)
    if engine.dialect.name == "postgresql":
        wide = [("transfers", "bytes"), ("updates", "size"), ("artifacts", "size")]
        narrow = [(table, column) for table, column in wide
                  if str(next(c["type"] for c in inspect(engine).get_columns(table) if c["name"] == column))
                  == "INTEGER"]
        if narrow:
            with engine.begin() as conn:
                for table, column in narrow:
                    conn.execute(text(f"ALTER TABLE {table} ALTER COLUMN {column} TYPE BIGINT"))


class SqlState(CoordinatorState):
    def __init__(self, url: str) -> None:
        parsed = make_url(url)
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)
        # The in-memory database is one shared connection: transactions must take turns.
        self._serial: threading.RLock | None = threading.RLock() if _in_memory(parsed) else None

    @classmethod
    def in_memory(cls) -> SqlState:
        return cls(MEMORY_URL)

    def close(self) -> None:
        self.engine.dispose()

    @contextmanager
    def _tx(self, write: bool = False) -> Iterator[Session]:
        """A session; with `write`, one transaction committed on leaving (rolled back on error)."""
        turn: AbstractContextManager[Any] = self._serial if self._serial is not None else nullcontext()
        try:
            with turn, self._sessions() as s:
                if write:
                    with s.begin():
                        yield s
                else:
                    yield s
        except OperationalError as exc:
            raise StateUnavailable(f"state database unavailable: {exc.orig}") from exc

    # -- runs ------------------------------------------------------------------------------

    def create_run(self, run: NewRun, inputs: dict[str, str], artifacts: Sequence[ArtifactRecord]) -> RunRecord:
        try:
            with self._tx(write=True) as s:
                row = Run(id=run.id, name=run.name, algorithm=run.algorithm, spec=run.spec,
                          state=RunState.running.value, current_round=1,
                          enroll_token_hash=run.enroll_token_hash, artifacts={}, metrics={})
                s.add(row)
                s.flush()
                s.add(Round(run_id=run.id, number=1, state=RoundState.open.value, inputs=dict(inputs), metrics={}))
                _add_artifacts(s, run.id, artifacts)
                s.flush()
                return _run(row)
        except IntegrityError:
            raise RunExists(f"a run named {run.name!r} (or with that enroll token) exists") from None

    def get_run(self, run_id: str) -> RunRecord | None:
        with self._tx() as s:
            row = s.get(Run, run_id)
            return _run(row) if row is not None else None

    def run_by_name(self, name: str) -> RunRecord | None:
        return self._one_run(Run.name == name)

    def run_by_enroll_token_hash(self, token_hash: str) -> RunRecord | None:
        return self._one_run(Run.enroll_token_hash == token_hash)

    def _one_run(self, where: Any) -> RunRecord | None:
        with self._tx() as s:
            row = s.scalar(select(Run).where(where))
            return _run(row) if row is not None else None

    def list_runs(self, state: RunState | None = None) -> list[RunRecord]:
        query = select(Run).order_by(Run.created_at, Run.id)
        if state is not None:
            query = query.where(Run.state == state.value)
        with self._tx() as s:
            return [_run(r) for r in s.scalars(query)]

    def set_run_metrics(self, run_id: str, values: dict[str, Any]) -> None:
        with self._tx(write=True) as s:
            row = s.scalar(select(Run).where(Run.id == run_id).with_for_update())
            if row is not None:
                row.metrics = {**row.metrics, **values}

    def fail_run(self, run_id: str, number: int, message: str) -> None:
        with self._tx(write=True) as s:
            rnd = s.scalar(_round_query(run_id, number))
            if rnd is not None:
                rnd.state = RoundState.failed.value
                rnd.error = message
            run = s.get(Run, run_id)
            if run is not None:
                run.state = RunState.failed.value
                run.error = f"round {number}: {message}"

    def stop_run(self, run_id: str) -> bool:
        with self._tx(write=True) as s:
            return s.execute(update(Run).where(Run.id == run_id, Run.state == RunState.running.value)
                             .values(state=RunState.stopped.value)).rowcount == 1

    # -- rounds ----------------------------------------------------------------------------

    def get_round(self, run_id: str, number: int) -> RoundRecord | None:
        with self._tx() as s:
            row = s.scalar(_round_query(run_id, number))
            return _round(row) if row is not None else None

    def current_round(self, run_id: str) -> RoundRecord | None:
        with self._tx() as s:
            row = s.scalar(select(Round).join(Run, Run.id == Round.run_id)
                           .where(Round.run_id == run_id, Round.number == Run.current_round))
            return _round(row) if row is not None else None

    def list_rounds(self, run_id: str) -> list[RoundRecord]:
        with self._tx() as s:
            return [_round(r) for r in s.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.number))]

    def transition(
        self,
        run_id: str,
        number: int,
        old: RoundState,
        new: RoundState,
        *,
        lease_holder: str | None = None,
        collecting_at: datetime | None = None,
        deadline_at: datetime | None = None,
        aggregate_digest: str | None = None,
        outputs: dict[str, str] | None = None,
        metrics: dict[str, Any] | None = None,
        artifacts: Sequence[ArtifactRecord] = (),
    ) -> bool:
        guard = [Round.run_id == run_id, Round.number == number, Round.state == old.value]
        if lease_holder is not None:
            guard.append(Round.lease_owner == lease_holder)
        given = {"collecting_at": collecting_at, "deadline_at": deadline_at, "aggregate_digest": aggregate_digest,
                 "outputs": outputs, "metrics": metrics}
        values = {k: v for k, v in given.items() if v is not None}
        with self._tx(write=True) as s:
            moved = s.execute(update(Round).where(*guard).values(
                state=new.value, lease_owner=None, lease_until=None, **values)).rowcount == 1
            if moved:
                _add_artifacts(s, run_id, artifacts)
        return moved

    def claim_lease(self, run_id: str, number: int, state: RoundState, instance: str, until: datetime,
                    now: datetime | None = None) -> bool:
        now = now or utcnow()
        free = (Round.lease_owner.is_(None)) | (Round.lease_owner == instance) | (Round.lease_until < now)
        with self._tx(write=True) as s:
            claimed = s.execute(
                update(Round)
                .where(Round.run_id == run_id, Round.number == number, Round.state == state.value, free)
                .values(lease_owner=instance, lease_until=until)
            ).rowcount == 1
            if claimed:
                round_id = s.scalar(select(Round.id).where(Round.run_id == run_id, Round.number == number))
                s.add(RoundEvent(round_id=round_id, step=state.value, instance=instance, at=now))
        return claimed

    def round_events(self, run_id: str, number: int) -> list[RoundEventRecord]:
        with self._tx() as s:
            rows = s.scalars(select(RoundEvent).join(Round, Round.id == RoundEvent.round_id)
                             .where(Round.run_id == run_id, Round.number == number).order_by(RoundEvent.id))
            return [RoundEventRecord(step=r.step, instance=r.instance, at=aware(r.at)) for r in rows]

    def close_round(self, run_id: str, number: int, last: bool) -> bool:
        with self._tx(write=True) as s:
            # A write on the run's row first: it takes that row's lock (PostgreSQL) or the write
            # lock (SQLite) until commit, so a stop either lands before (and nothing moves) or after.
            if s.execute(update(Run).where(Run.id == run_id, Run.state == RunState.running.value)
                         .values(state=Run.state)).rowcount != 1:
                return False
            outputs = s.scalar(select(Round.outputs).where(Round.run_id == run_id, Round.number == number))
            moved = s.execute(
                update(Round)
                .where(Round.run_id == run_id, Round.number == number, Round.state == RoundState.publishing.value)
                .values(state=RoundState.closed.value, closed_at=utcnow())
            ).rowcount == 1
            if not moved:
                return False
            run = s.get(Run, run_id)
            if last:
                run.state = RunState.finished.value
                run.artifacts = dict(outputs or {})
            else:
                s.add(Round(run_id=run_id, number=number + 1, state=RoundState.open.value,
                            inputs=dict(outputs or {}), metrics={}))
                run.current_round = number + 1
        return True

    # -- clients ---------------------------------------------------------------------------

    def enroll_client(self, client: ClientRecord, max_clients: int | None = None) -> ClientRecord:
        with self._tx(write=True) as s:
            if max_clients is not None and self.engine.dialect.name != "sqlite":
                # Enrollments into one run take turns on its row, so each counts the others' rows.
                # SQLite needs no lock: the insert below takes its one write lock until commit.
                s.execute(select(Run.id).where(Run.id == client.run_id).with_for_update())
            now = utcnow()  # enrolling is a call: the device was seen
            s.add(Client(id=client.id, run_id=client.run_id, name=client.name, token_hash=client.token_hash,
                         profile=dict(client.profile), revoked=client.revoked, created_at=now, last_seen=now))
            s.flush()
            if max_clients is not None:
                active = s.scalar(select(func.count()).select_from(Client).where(
                    Client.run_id == client.run_id, Client.revoked.is_(False))) or 0
                if active > max_clients:  # rolls the insert back
                    raise RunFull(f"run {client.run_id} has its {max_clients} clients")
        return replace(client, enrolled_at=now, last_seen=now)

    def get_client(self, client_id: str) -> ClientRecord | None:
        with self._tx() as s:
            row = s.get(Client, client_id)
            return _client(row) if row is not None else None

    def client_by_token_hash(self, token_hash: str) -> ClientRecord | None:
        with self._tx() as s:
            row = s.scalar(select(Client).where(Client.token_hash == token_hash))
            return _client(row) if row is not None else None

    def revoke_client(self, client_id: str) -> bool:
        with self._tx(write=True) as s:
            row = s.get(Client, client_id)
            if row is None:
                return False
            row.revoked = True
        return True

    def count_active_clients(self, run_id: str) -> int:
        with self._tx() as s:
            return s.scalar(select(func.count()).select_from(Client).where(
                Client.run_id == run_id, Client.revoked.is_(False))) or 0

    def list_clients(self, run_id: str) -> list[ClientListing]:
        sent = (select(Update.client_id, func.count().label("n")).join(Round, Round.id == Update.round_id)
                .where(Round.run_id == run_id).group_by(Update.client_id).subquery())
        query = (select(Client, func.coalesce(sent.c.n, 0)).outerjoin(sent, sent.c.client_id == Client.id)
                 .where(Client.run_id == run_id).order_by(Client.created_at, Client.id))
        with self._tx() as s:
            return [ClientListing(_client(row), int(n)) for row, n in s.execute(query).all()]

    def touch_client(self, client_id: str, now: datetime, every_s: float) -> bool:
        stale = Client.last_seen.is_(None) | (Client.last_seen < now - timedelta(seconds=every_s))
        with self._tx(write=True) as s:
            return s.execute(update(Client).where(Client.id == client_id, stale)
                             .values(last_seen=now)).rowcount == 1

    # -- updates ---------------------------------------------------------------------------

    def insert_update(self, update: UpdateRecord, before_commit: Callable[[], object] | None = None) -> UpdateInsert:
        with self._tx(write=True) as s:
            # A write first, before any check: it takes the round row's lock on PostgreSQL and the
            # database's write lock on SQLite (whose driver begins the transaction only at the
            # first write, so checks read before it could be stale by the insert). Until commit
            # no transition can move the round, nor another upload of this client slip in.
            s.execute(Round.__table__.update().where(Round.run_id == update.run_id, Round.number == update.round)
                      .values(state=Round.state))
            run = s.get(Run, update.run_id)
            rnd = s.scalar(_round_query(update.run_id, update.round))
            if run is None or rnd is None or run.state != RunState.running.value or rnd.state not in _ACCEPTING:
                return UpdateInsert(UpdateOutcome.closed, None)
            previous = s.scalar(select(Update).where(Update.round_id == rnd.id, Update.client_id == update.client_id))
            if previous is not None:
                same = previous.sha256 == update.sha256
                return UpdateInsert(UpdateOutcome.duplicate if same else UpdateOutcome.conflict,
                                    _update(previous, update.run_id, update.round))
            s.add(Update(round_id=rnd.id, client_id=update.client_id, sha256=update.sha256, size=update.size,
                         num_samples=update.num_samples, metrics=dict(update.metrics)))
            s.add(Transfer(run_id=update.run_id, client_id=update.client_id, round=update.round,
                           direction=Direction.up.value, bytes=update.size))
            _add_artifacts(s, update.run_id, [ArtifactRecord(update.sha256, update.size, client_visible=False)])
            if before_commit is not None:
                s.flush()  # the rows are in (constraints checked) before the caller stores the blob
                before_commit()
        return UpdateInsert(UpdateOutcome.accepted, update)

    def get_update(self, run_id: str, number: int, client_id: str) -> UpdateRecord | None:
        with self._tx() as s:
            row = s.scalar(_updates_query(run_id, number).where(Update.client_id == client_id))
            return _update(row, run_id, number) if row is not None else None

    def list_updates(self, run_id: str, number: int) -> list[UpdateRecord]:
        with self._tx() as s:
            return [_update(r, run_id, number) for r in s.scalars(_updates_query(run_id, number).order_by(Update.id))]

    def count_updates(self, run_id: str, number: int) -> int:
        with self._tx() as s:
            return s.scalar(select(func.count()).select_from(_updates_query(run_id, number).subquery())) or 0

    # -- secure aggregation ----------------------------------------------------------------

    def put_secagg_message(self, message: SecaggMessage, phase_state: RoundState,
                           shares: Sequence[SecaggShare] = (), public_keys: Sequence[str] = ()) -> UpdateOutcome:
        with self._tx(write=True) as s:
            # As in insert_update: a write first takes the round's lock, so the state read below
            # holds until commit and no transition slips between the check and the insert.
            s.execute(Round.__table__.update().where(Round.run_id == message.run_id, Round.number == message.round)
                      .values(state=Round.state))
            run = s.get(Run, message.run_id)
            rnd = s.scalar(_round_query(message.run_id, message.round))
            if run is None or rnd is None or run.state != RunState.running.value or rnd.state != phase_state.value:
                return UpdateOutcome.closed
            previous = s.scalar(select(SecaggMessageRow).where(
                SecaggMessageRow.round_id == rnd.id, SecaggMessageRow.client_id == message.client_id,
                SecaggMessageRow.phase == message.phase))
            if previous is not None:
                return UpdateOutcome.duplicate if previous.digest == message.digest else UpdateOutcome.conflict
            if public_keys and s.scalar(select(SecaggKeyRow.id).where(SecaggKeyRow.public_key.in_(list(public_keys)))):
                return UpdateOutcome.reused
            s.add(SecaggMessageRow(round_id=rnd.id, client_id=message.client_id, phase=message.phase,
                                   body=dict(message.body), digest=message.digest))
            s.add_all(SecaggKeyRow(public_key=key, round_id=rnd.id) for key in public_keys)
            s.add_all(SecaggShareRow(round_id=rnd.id, sender=sh.sender, recipient=sh.recipient,
                                     ciphertext=sh.ciphertext, seed_commitment=sh.seed_commitment,
                                     key_commitment=sh.key_commitment) for sh in shares)
        return UpdateOutcome.accepted

    def list_secagg_messages(self, run_id: str, number: int, phase: str) -> list[SecaggMessage]:
        with self._tx() as s:
            rows = s.scalars(select(SecaggMessageRow).join(Round, Round.id == SecaggMessageRow.round_id)
                             .where(Round.run_id == run_id, Round.number == number, SecaggMessageRow.phase == phase)
                             .order_by(SecaggMessageRow.id))
            return [SecaggMessage(run_id=run_id, round=number, client_id=r.client_id, phase=r.phase,
                                  body=dict(r.body), digest=r.digest) for r in rows]

    def secagg_shares_for(self, run_id: str, number: int, recipient: str) -> list[SecaggShare]:
        with self._tx() as s:
            rows = s.scalars(select(SecaggShareRow).join(Round, Round.id == SecaggShareRow.round_id)
                             .where(Round.run_id == run_id, Round.number == number,
                                    SecaggShareRow.recipient == recipient).order_by(SecaggShareRow.sender))
            return [SecaggShare(sender=r.sender, recipient=r.recipient, ciphertext=r.ciphertext,
                                seed_commitment=r.seed_commitment, key_commitment=r.key_commitment) for r in rows]

    # -- artifacts -------------------------------------------------------------------------

    def add_artifacts(self, run_id: str, artifacts: Sequence[ArtifactRecord]) -> None:
        with self._tx(write=True) as s:
            _add_artifacts(s, run_id, artifacts)

    def artifact_visible(self, run_id: str, digest: str) -> bool:
        with self._tx() as s:
            return s.scalar(select(Artifact.id).where(Artifact.run_id == run_id, Artifact.sha256 == digest,
                                                      Artifact.client_visible.is_(True))) is not None

    # -- builds ----------------------------------------------------------------------------

    def upsert_builds(self, builds: Sequence[BuildRecord], artifacts: Sequence[ArtifactRecord] = ()) -> None:
        runs = {b.run_id for b in builds}
        if len(runs) > 1:
            raise ValueError(f"builds of one run at a time, got runs {sorted(runs)}")
        if not builds:
            return
        run_id = runs.pop()
        with self._tx(write=True) as s:
            _add_artifacts(s, run_id, artifacts)
            for build in builds:
                owner = Build.client_id.is_(None) if build.client_id is None else Build.client_id == build.client_id
                row = s.scalar(select(Build).where(Build.run_id == run_id, Build.round == build.round,
                                                   Build.name == build.name, owner))
                if row is None:
                    s.add(Build(run_id=run_id, round=build.round, name=build.name, manifest=dict(build.manifest),
                                client_id=build.client_id))
                else:
                    row.manifest = dict(build.manifest)

    def list_builds(self, run_id: str, client_id: str | None = None) -> list[BuildRecord]:
        query = select(Build).where(Build.run_id == run_id).order_by(Build.round, Build.name, Build.id)
        if client_id is not None:
            query = query.where(Build.client_id.is_(None) | (Build.client_id == client_id))
        with self._tx() as s:
            return [BuildRecord(run_id=r.run_id, round=r.round, name=r.name, manifest=r.manifest,
                                client_id=r.client_id) for r in s.scalars(query)]

    # -- transfers -------------------------------------------------------------------------

    def record_transfer(self, run_id: str, client_id: str, direction: Direction, nbytes: int) -> None:
        with self._tx(write=True) as s:
            run = s.get(Run, run_id)
            number = run.current_round if run is not None and run.state == RunState.running.value else None
            s.add(Transfer(run_id=run_id, client_id=client_id, round=number, direction=direction.value, bytes=nbytes))

    def transfer_totals(self, run_id: str, number: int) -> list[TransferTotal]:
        with self._tx() as s:
            rows = s.execute(
                select(Transfer.client_id, Transfer.direction, func.sum(Transfer.bytes))
                .where(Transfer.run_id == run_id, Transfer.round == number)
                .group_by(Transfer.client_id, Transfer.direction)
                .order_by(Transfer.client_id, Transfer.direction)
            ).all()
        return [TransferTotal(client_id=c, direction=Direction(d), bytes=int(total or 0)) for c, d, total in rows]

    # -- operations ------------------------------------------------------------------------

    def counts(self) -> StateCounts:
        with self._tx() as s:
            runs = dict(s.execute(select(Run.state, func.count()).group_by(Run.state)).all())
            clients = s.scalar(select(func.count()).select_from(Client)) or 0
            updates = s.scalar(select(func.count()).select_from(Update)) or 0
        return StateCounts(runs_by_state={str(k): int(v) for k, v in runs.items()}, clients=clients, updates=updates)


# -- helpers --------------------------------------------------------------------------------


def _round_query(run_id: str, number: int) -> Any:
    return select(Round).where(Round.run_id == run_id, Round.number == number)


def _updates_query(run_id: str, number: int) -> Any:
    return select(Update).join(Round, Round.id == Update.round_id).where(Round.run_id == run_id,
                                                                         Round.number == number)


def _add_artifacts(s: Session, run_id: str, artifacts: Sequence[ArtifactRecord]) -> None:
    # The same bytes may be named twice, visibly and not (FedAvg's aggregate becomes the SLM
    # adapter): one row per digest, and visibility only ever widens.
    wanted: dict[str, ArtifactRecord] = {}
    for a in artifacts:
        seen = wanted.get(a.sha256)
        wanted[a.sha256] = a if seen is None or a.client_visible else seen
    if not wanted:
        return
    rows = {r.sha256: r for r in s.scalars(select(Artifact).where(Artifact.run_id == run_id,
                                                                   Artifact.sha256.in_(list(wanted))))}
    for digest, a in wanted.items():
        row = rows.get(digest)
        if row is None:
            s.add(Artifact(run_id=run_id, sha256=digest, size=a.size, client_visible=a.client_visible))
        elif a.client_visible and not row.client_visible:
            row.client_visible = True


def _run(r: Run) -> RunRecord:
    return RunRecord(id=r.id, name=r.name, algorithm=r.algorithm, spec=r.spec, state=RunState(r.state),
                     current_round=r.current_round, enroll_token_hash=r.enroll_token_hash,
                     artifacts=dict(r.artifacts or {}), metrics=dict(r.metrics or {}), error=r.error,
                     created_at=aware(r.created_at))


def _round(r: Round) -> RoundRecord:
    return RoundRecord(run_id=r.run_id, number=r.number, state=RoundState(r.state), inputs=dict(r.inputs),
                       aggregate_digest=r.aggregate_digest, outputs=dict(r.outputs) if r.outputs is not None else None,
                       metrics=dict(r.metrics or {}), error=r.error, opened_at=aware(r.opened_at),
                       collecting_at=aware(r.collecting_at), deadline_at=aware(r.deadline_at),
                       closed_at=aware(r.closed_at), lease_owner=r.lease_owner, lease_until=aware(r.lease_until))


def _client(r: Client) -> ClientRecord:
    return ClientRecord(id=r.id, run_id=r.run_id, name=r.name, token_hash=r.token_hash,
                        profile=dict(r.profile or {}), revoked=r.revoked, enrolled_at=aware(r.created_at),
                        last_seen=aware(r.last_seen))


def _update(r: Update, run_id: str, number: int) -> UpdateRecord:
    return UpdateRecord(run_id=run_id, round=number, client_id=r.client_id, sha256=r.sha256, size=r.size,
                        num_samples=r.num_samples, metrics=dict(r.metrics or {}))
