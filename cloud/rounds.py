"""The round state machine (DESIGN.md §4), driven by a background thread.

open -> collecting -> aggregating -> server_step -> publishing -> closed (or failed).

Each step does its slow work (aggregation, the strategy's server step) outside any
transaction, stores results content-addressed, and then commits the transition with a
compare-and-set on the round's state. A coordinator killed anywhere restarts, finds the
round in the last committed state and redoes at most the step that was under way; that
step is deterministic (seeded), so the run ends where an uninterrupted one would.
"""

from __future__ import annotations

import logging
import threading
import traceback
from datetime import datetime, timedelta, timezone
from typing import Any

from sqlalchemy import func, select, update

from cloud.db import Client, Round, RoundEvent, Run, Update
from cloud.faults import failpoint
from cloud.service import Coordinator, aware
from cloud.strategies import UpdateFile
from common.protocol import RoundState, RunSpec, RunState
from common.tensorfile import save_arrays

log = logging.getLogger("cotune.rounds")

# States whose work is slow and done by one replica at a time, under a lease.
_LEASED = (RoundState.aggregating, RoundState.server_step)


def _now() -> datetime:
    return datetime.now(timezone.utc)


class RoundDriver:
    def __init__(self, coordinator: Coordinator) -> None:
        self.c = coordinator
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="cotune-round-driver", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.tick()
            except Exception:  # a database hiccup must not kill the driver
                log.exception("round driver tick failed; retrying")
                busy = False
            if not busy:
                self._stop.wait(self.c.settings.tick_s)

    # -- one step ------------------------------------------------------------------------

    def tick(self) -> bool:
        """Advance every running run by at most one transition; True if anything moved."""
        with self.c.Session() as s:
            run_ids = list(s.scalars(select(Run.id).where(Run.state == RunState.running.value)))
        moved = False
        for run_id in run_ids:
            moved |= self.advance(run_id)
        return self._publish_pending_builds() or moved

    def _publish_pending_builds(self) -> bool:
        """After a run's last round, export the edge builds its spec asks for (once)."""
        from cloud.builds import publish_builds

        with self.c.Session() as s:
            runs = [r for r in s.scalars(select(Run).where(Run.state == RunState.finished.value))
                    if r.spec.get("builds") and "builds" not in r.metrics]
        for run in runs:
            try:
                record: dict[str, Any] = {"names": [b.name for b in publish_builds(self.c, run.id, run.spec["builds"])]}
            except Exception as exc:  # the run itself succeeded; only its builds failed
                log.exception("run %s: publishing builds failed", run.id)
                detail = getattr(exc, "detail", None)
                record = {"error": detail.message if detail is not None else f"{type(exc).__name__}: {exc}"}
            with self.c.Session.begin() as s:
                row = s.get(Run, run.id)
                row.metrics = {**row.metrics, "builds": record}
        return bool(runs)

    def advance(self, run_id: str) -> bool:
        with self.c.Session() as s:
            run = s.get(Run, run_id)
            rnd = s.scalar(select(Round).where(Round.run_id == run_id, Round.number == run.current_round))
        if run.state != RunState.running.value or rnd is None:
            return False
        spec = RunSpec.model_validate(run.spec)
        step = {
            RoundState.open.value: self._open,
            RoundState.collecting.value: self._collecting,
            RoundState.aggregating.value: self._aggregating,
            RoundState.server_step.value: self._server_step,
            RoundState.publishing.value: self._publishing,
        }.get(rnd.state)
        if step is None:
            return False
        try:
            if "initial" not in run.metrics:
                self._initial_metrics(run)
                return True
            return step(run, rnd, spec)
        except Exception as exc:
            if self._is_transient(exc):
                raise
            self._fail(run, rnd, exc)
            return True

    @staticmethod
    def _is_transient(exc: Exception) -> bool:
        from sqlalchemy.exc import OperationalError

        return isinstance(exc, OperationalError)

    def _initial_metrics(self, run: Run) -> None:
        with self.c.Session() as s:
            first = s.scalar(select(Round).where(Round.run_id == run.id, Round.number == 1))
        with self.c.model_lock:
            metrics = self.c.strategy(run).initial_metrics(dict(first.inputs))
        with self.c.Session.begin() as s:
            row = s.get(Run, run.id)
            row.metrics = {**row.metrics, "initial": metrics}

    def _cas(self, rnd: Round, old: RoundState, new: RoundState, **values: Any) -> bool:
        """Move the round from `old` to `new` in one transaction; False if it was not in `old`."""
        with self.c.Session.begin() as s:
            moved = self._cas_in(s, rnd, old, new, **values)
        return moved

    def _cas_in(self, s: Any, rnd: Round, old: RoundState, new: RoundState, **values: Any) -> bool:
        # A slow step commits only while this replica still holds the round's lease, so two
        # replicas sharing one database never both publish a result for the same step.
        guard = [Round.id == rnd.id, Round.state == old.value]
        if old in _LEASED:
            guard.append(Round.lease_owner == self.c.instance_id)
        moved = s.execute(
            update(Round).where(*guard).values(state=new.value, lease_owner=None, lease_until=None, **values)
        ).rowcount == 1
        if moved:
            log.info("run %s round %d: %s -> %s", rnd.run_id, rnd.number, old.value, new.value)
        return moved

    def _claim(self, rnd: Round, state: RoundState) -> bool:
        """Take (or renew) the lease on a round's slow step; False while another replica holds it."""
        now = _now()
        me = self.c.instance_id
        with self.c.Session.begin() as s:
            claimed = s.execute(
                update(Round)
                .where(Round.id == rnd.id, Round.state == state.value,
                       (Round.lease_owner.is_(None)) | (Round.lease_owner == me) | (Round.lease_until < now))
                .values(lease_owner=me, lease_until=now + timedelta(seconds=self.c.settings.lease_s))
            ).rowcount == 1
            if claimed:
                s.add(RoundEvent(round_id=rnd.id, step=state.value, instance=me))
        return claimed

    def _active_clients(self, run_id: str) -> int:
        with self.c.Session() as s:
            return s.scalar(select(func.count()).select_from(Client).where(
                Client.run_id == run_id, Client.revoked.is_(False))) or 0

    def _open(self, run: Run, rnd: Round, spec: RunSpec) -> bool:
        # The deadline clock starts once enough devices are enrolled to make a quorum.
        if self._active_clients(run.id) < spec.min_clients:
            return False
        now = _now()
        return self._cas(rnd, RoundState.open, RoundState.collecting, collecting_at=now,
                         deadline_at=now + timedelta(seconds=spec.round_deadline_s))

    def _collecting(self, run: Run, rnd: Round, spec: RunSpec) -> bool:
        with self.c.Session() as s:
            n_updates = s.scalar(select(func.count()).select_from(Update).where(Update.round_id == rnd.id))
        if n_updates < spec.min_clients:
            return False
        everyone_in = n_updates >= self._active_clients(run.id)
        past_deadline = rnd.deadline_at is not None and _now() >= aware(rnd.deadline_at)
        if not (everyone_in or past_deadline):
            return False
        return self._cas(rnd, RoundState.collecting, RoundState.aggregating)

    def _aggregating(self, run: Run, rnd: Round, spec: RunSpec) -> bool:
        if not self._claim(rnd, RoundState.aggregating):
            return False
        strategy = self.c.strategy(run)
        with self.c.Session() as s:
            rows = list(s.execute(select(Update.sha256, Update.num_samples)
                                  .where(Update.round_id == rnd.id).order_by(Update.id)))
            client_metrics = list(s.scalars(select(Update.metrics).where(Update.round_id == rnd.id)))
        updates = (UpdateFile(self.c.store.path(sha), n) for sha, n in rows)
        aggregate = strategy.aggregate(updates, strategy.update_schema(dict(rnd.inputs)))
        digest = self.c.store.put_bytes(save_arrays(aggregate))
        failpoint("aggregated")
        metrics = {**rnd.metrics, "num_updates": len(rows), "num_samples": sum(n for _, n in rows),
                   "aggregate_sha256": digest}
        # Devices report the privacy they have spent; the round's figure is the worst of them.
        epsilons = [m["privacy"]["epsilon"] for m in client_metrics
                    if isinstance(m.get("privacy"), dict) and m["privacy"].get("epsilon") is not None]
        if epsilons:
            metrics["privacy_epsilon_max"] = max(epsilons)
        return self._cas(rnd, RoundState.aggregating, RoundState.server_step,
                         aggregate_digest=digest, metrics=metrics)

    def _server_step(self, run: Run, rnd: Round, spec: RunSpec) -> bool:
        if not self._claim(rnd, RoundState.server_step):
            return False
        strategy = self.c.strategy(run)
        started = _now()
        with self.c.model_lock:
            result = strategy.server_step(rnd.number, dict(rnd.inputs), rnd.aggregate_digest)
        failpoint("server_stepped")
        metrics = {**rnd.metrics, **result.metrics,
                   "server_step_s": round((_now() - started).total_seconds(), 3)}
        with self.c.Session.begin() as s:
            moved = self._cas_in(s, rnd, RoundState.server_step, RoundState.publishing,
                                 outputs=result.outputs, metrics=metrics)
            if moved:
                self.c._add_artifacts(s, run.id, result.outputs, strategy)
        return moved

    def _publishing(self, run: Run, rnd: Round, spec: RunSpec) -> bool:
        with self.c.Session.begin() as s:
            moved = s.execute(
                update(Round).where(Round.id == rnd.id, Round.state == RoundState.publishing.value)
                .values(state=RoundState.closed.value, closed_at=_now())
            ).rowcount == 1
            if not moved:
                return False
            row = s.get(Run, run.id)
            if rnd.number < spec.rounds:
                s.add(Round(run_id=run.id, number=rnd.number + 1, state=RoundState.open.value,
                            inputs=rnd.outputs, metrics={}))
                row.current_round = rnd.number + 1
            else:
                row.state = RunState.finished.value
                row.artifacts = rnd.outputs
        log.info("run %s round %d: closed%s", run.id, rnd.number,
                 "" if rnd.number < spec.rounds else "; run finished")
        return True

    def _fail(self, run: Run, rnd: Round, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        log.error("run %s round %d failed: %s\n%s", run.id, rnd.number, message, traceback.format_exc())
        with self.c.Session.begin() as s:
            row = s.get(Round, rnd.id)
            row.state = RoundState.failed.value
            row.error = message
            run_row = s.get(Run, run.id)
            run_row.state = RunState.failed.value
            run_row.error = f"round {rnd.number}: {message}"
