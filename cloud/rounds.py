"""The round state machine (ARCHITECTURE.md, "Round state machine"), driven by a background
thread or, in process, by calling `tick()`.

open -> collecting -> aggregating -> server_step -> publishing -> closed (or failed).

Each step does its slow work (aggregation, the strategy's server step) outside any
transaction, stores results content-addressed, and then commits the transition with a
compare-and-set on the round's state through `CoordinatorState` (ARCHITECTURE.md, "State
interface"). A coordinator killed anywhere restarts, finds the round in the last committed
state and redoes at most the step that was under way; that step is deterministic (seeded),
so the run ends where an uninterrupted one would. The slow steps run under a lease, so of
several replicas sharing one database only one does each; the holder renews it while the step
runs (`LeaseKeeper`), so a step longer than `lease_s` keeps it. A finished run's builds are
published under a lease too, taken on its last (closed) round.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from cloud import telemetry
from cloud.faults import failpoint
from cloud.secure.phases import SecureRound
from cloud.secure.spec import device_task
from cloud.secure.unmask import MaskedUpdate, UnmaskError, missing_secrets, revealed, unmask
from cloud.services.builds import BuildsService
from cloud.services.runs import RunsService
from cloud.state import CoordinatorState, StateUnavailable
from cloud.state.records import RoundRecord, RunRecord, UpdateRecord
from cloud.store import BlobStore
from cloud.strategies import Strategy, UpdateFile
from cloud.strategies.aggregation import Aggregate
from common.protocol import RoundState, RunSpec, RunState
from common.secagg.ring import Layout, error_bound, layout_of, unflatten
from common.tensorfile import load_arrays, read_header, save_arrays

log = logging.getLogger("cotune.rounds")

# States whose work is slow and done by one replica at a time, under a lease.
_LEASED = (RoundState.aggregating, RoundState.server_step)


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _flat(path: Path, layout: Layout) -> np.ndarray:
    """A masked upload as one uint64 vector in the layout's order."""
    arrays = load_arrays(path, read_header(path))
    return np.concatenate([np.asarray(arrays[name]).reshape(-1) for name, _ in layout]).view(np.uint64)


@dataclass(frozen=True)
class DriverConfig:
    # Names this replica in leases and audit events; stable across restarts.
    instance_id: str
    lease_s: float = 600.0
    tick_s: float = 0.5


Step = Callable[[RunRecord, RoundRecord, RunSpec], bool]


class LeaseKeeper:
    """Renews a lease from a thread every `lease_s / 3` while a slow step runs, so the step keeps
    its lease however long it takes; a replica that dies or stalls stops renewing and another
    takes over once the lease runs out. Once a renewal finds another replica holding the lease,
    renewing stops; the step's result is then refused by the compare-and-set on the holder."""

    def __init__(self, renew: Callable[[], bool], lease_s: float, what: str) -> None:
        self._renew = renew
        self._every = lease_s / 3
        self._what = what
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"cotune-lease {what}", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            try:
                if not self._renew():
                    log.warning("%s: lost the lease to another replica; its result will not be published",
                                self._what)
                    return
            except Exception:  # a database hiccup: the lease still runs; try again next time
                log.exception("%s: renewing the lease failed; retrying", self._what)

    def __enter__(self) -> LeaseKeeper:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


class RoundDriver:
    def __init__(self, state: CoordinatorState, runs: RunsService, store: BlobStore, model_lock: threading.Lock,
                 config: DriverConfig, builds: BuildsService | None = None) -> None:
        self.state = state
        self.runs = runs
        self.store = store
        # Held models are shared with /v1/generate: a server step must not swap adapters under it.
        self.model_lock = model_lock
        self.config = config
        self.builds = builds
        self._steps: dict[RoundState, Step] = {
            RoundState.open: self._open,
            RoundState.keys: self._keys,
            RoundState.shares: self._shares,
            RoundState.collecting: self._collecting,
            RoundState.unmasking: self._unmasking,
            RoundState.aggregating: self._aggregating,
            RoundState.server_step: self._server_step,
            RoundState.publishing: self._publishing,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

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
                self._stop.wait(self.config.tick_s)

    # -- one step --------------------------------------------------------------------------

    def tick(self) -> bool:
        """Advance every running run by at most one transition; True if anything moved."""
        moved = False
        for run in self.state.list_runs(RunState.running):
            moved |= self.advance(run.id)
        return self._publish_builds() or moved

    def _publish_builds(self) -> bool:
        """Publish the builds each finished run's spec asks for, once, under a lease on its last
        round, so of several replicas only one exports; True if any run was handled here."""
        if self.builds is None:
            return False
        handled = False
        for run in self.builds.pending_runs():
            last = self.state.current_round(run.id)
            if last is None or last.state != RoundState.closed:
                continue
            with self._leased(last) as held:
                # Re-read under the lease: another replica may have published meanwhile.
                fresh = self.state.get_run(run.id)
                if held and fresh is not None and "builds" not in fresh.metrics:
                    self.builds.publish_run(fresh)
                    handled = True
        return handled

    def advance(self, run_id: str) -> bool:
        run = self.state.get_run(run_id)
        if run is None or run.state != RunState.running:
            return False
        rnd = self.state.current_round(run_id)
        step = self._steps.get(rnd.state) if rnd is not None else None
        if step is None:
            return False
        try:
            if "initial" not in run.metrics:
                self._initial_metrics(run)
                return True
            return step(run, rnd, RunSpec.model_validate(run.spec))
        except StateUnavailable:
            raise  # transient: the next tick tries again
        except Exception as exc:
            self._fail(run, rnd, exc)
            return True

    def _initial_metrics(self, run: RunRecord) -> None:
        first = self.state.get_round(run.id, 1)
        with self.model_lock:
            metrics = self.runs.strategy(run).initial_metrics(dict(first.inputs))
        self.state.set_run_metrics(run.id, {"initial": metrics})

    def _cas(self, rnd: RoundRecord, old: RoundState, new: RoundState, **changes: object) -> bool:
        # A slow step commits only while this replica still holds the round's lease, so two
        # replicas sharing one database never both publish a result for the same step.
        holder = self.config.instance_id if old in _LEASED else None
        moved = self.state.transition(rnd.run_id, rnd.number, old, new, lease_holder=holder, **changes)
        if moved:
            telemetry.round_phase(rnd, old, new)
            log.info("run %s round %d: %s -> %s", rnd.run_id, rnd.number, old.value, new.value)
        return moved

    def _claim(self, rnd: RoundRecord) -> bool:
        """Take (or renew) the lease on the round's slow step; False while another replica holds it."""
        until = _now() + timedelta(seconds=self.config.lease_s)
        return self.state.claim_lease(rnd.run_id, rnd.number, rnd.state, self.config.instance_id, until)

    @contextlib.contextmanager
    def _leased(self, rnd: RoundRecord) -> Iterator[bool]:
        """Take the lease on the round's step and keep it renewed until the block ends; yields
        False (and runs nothing in the background) while another replica holds it."""
        if not self._claim(rnd):
            yield False
            return
        what = f"run {rnd.run_id} round {rnd.number} {rnd.state.value}"
        with LeaseKeeper(lambda: self._claim(rnd), self.config.lease_s, what):
            yield True

    def _open(self, run: RunRecord, rnd: RoundRecord, spec: RunSpec) -> bool:
        # The deadline clock starts once enough devices are enrolled to make a quorum.
        if self.state.count_active_clients(run.id) < spec.min_clients:
            return False
        now = _now()
        if spec.secure_aggregation is not None:
            return self._cas(rnd, RoundState.open, RoundState.keys,
                             deadline_at=now + timedelta(seconds=spec.secure_aggregation.phase_deadline_s))
        return self._cas(rnd, RoundState.open, RoundState.collecting, collecting_at=now,
                         deadline_at=now + timedelta(seconds=spec.round_deadline_s))

    @staticmethod
    def _phase_over(rnd: RoundRecord, spec: RunSpec, arrived: int, expected: int) -> bool:
        """A collecting phase ends with its quorum once everyone expected is in, or at its deadline."""
        if arrived < spec.min_clients:
            return False
        return arrived >= expected or (rnd.deadline_at is not None and _now() >= rnd.deadline_at)

    def _secure_round(self, run: RunRecord, rnd: RoundRecord, spec: RunSpec) -> SecureRound:
        return SecureRound(self.state, run.id, rnd.number, spec.seed, spec.secure_aggregation)

    def _keys(self, run: RunRecord, rnd: RoundRecord, spec: RunSpec) -> bool:
        sec = self._secure_round(run, rnd, spec)
        if not self._phase_over(rnd, spec, len(sec.members), self.state.count_active_clients(run.id)):
            return False
        failpoint("secagg_keys_closing")
        return self._cas(rnd, RoundState.keys, RoundState.shares,
                         deadline_at=_now() + timedelta(seconds=spec.secure_aggregation.phase_deadline_s))

    def _shares(self, run: RunRecord, rnd: RoundRecord, spec: RunSpec) -> bool:
        sec = self._secure_round(run, rnd, spec)
        if not self._phase_over(rnd, spec, len(sec.dealers), len(sec.members)):
            return False
        failpoint("secagg_shares_closing")
        now = _now()
        return self._cas(rnd, RoundState.shares, RoundState.collecting, collecting_at=now,
                         deadline_at=now + timedelta(seconds=spec.round_deadline_s))

    def _collecting(self, run: RunRecord, rnd: RoundRecord, spec: RunSpec) -> bool:
        n_updates = self.state.count_updates(run.id, rnd.number)
        if spec.secure_aggregation is not None:  # everyone expected: the devices whose shares are in
            if not self._phase_over(rnd, spec, n_updates, len(self._secure_round(run, rnd, spec).dealers)):
                return False
            failpoint("secagg_collecting_closing")
            return self._cas(rnd, RoundState.collecting, RoundState.unmasking,
                             deadline_at=_now() + timedelta(seconds=spec.secure_aggregation.phase_deadline_s))
        if n_updates < spec.min_clients:
            return False
        everyone_in = n_updates >= self.state.count_active_clients(run.id)
        past_deadline = rnd.deadline_at is not None and _now() >= rnd.deadline_at
        if not (everyone_in or past_deadline):
            return False
        return self._cas(rnd, RoundState.collecting, RoundState.aggregating)

    def _unmasking(self, run: RunRecord, rnd: RoundRecord, spec: RunSpec) -> bool:
        sec = self._secure_round(run, rnd, spec)
        reveals = revealed(sec)
        if len(reveals) < len(sec.uploaders):
            if rnd.deadline_at is None or _now() < rnd.deadline_at:
                return False
            short = missing_secrets(sec, reveals)
            if short:  # past the deadline and the sum can never be unmasked
                raise UnmaskError(f"{len(short)} secrets the sum needs cannot be rebuilt (e.g. {short[0]}): fewer "
                                  f"than {sec.threshold} neighbours revealed their shares before the unmask "
                                  "phase's deadline")
        failpoint("secagg_unmasking_closing")
        return self._cas(rnd, RoundState.unmasking, RoundState.aggregating)

    def _aggregating(self, run: RunRecord, rnd: RoundRecord, spec: RunSpec) -> bool:
        with self._leased(rnd) as held:
            if not held:
                return False
            strategy = self.runs.strategy(run)
            updates = self.state.list_updates(run.id, rnd.number)
            elapsed = telemetry.stopwatch()
            if spec.secure_aggregation is not None:
                aggregate = self._unmask(run, rnd, spec, strategy, updates)
            else:
                files = (UpdateFile(self.store.path(u.sha256), u.num_samples) for u in updates)
                aggregate = strategy.aggregate_round(files, dict(rnd.inputs))
            telemetry.aggregated(elapsed())
            digest = self.store.put_bytes(save_arrays(aggregate.arrays))
            failpoint("aggregated")
            metrics = {**rnd.metrics, "num_updates": len(updates),
                       "num_samples": sum(u.num_samples for u in updates), "aggregate_sha256": digest,
                       "aggregation": aggregate.figures,
                       **strategy.round_metrics([dict(u.metrics) for u in updates])}
        # Committed once renewing stopped (the last renewal was at most lease_s/3 ago), so no
        # renewal races the transition that ends the step.
        return self._cas(rnd, RoundState.aggregating, RoundState.server_step, aggregate_digest=digest,
                         metrics=metrics)

    def _unmask(self, run: RunRecord, rnd: RoundRecord, spec: RunSpec, strategy: Strategy,
                updates: list[UpdateRecord]) -> Aggregate:
        """The weighted mean of the round's masked updates (cloud/secure/unmask.py), as the aggregate."""
        task = device_task(spec)
        layout = layout_of(strategy.update_schema(dict(rnd.inputs)))
        masked = [MaskedUpdate(u.client_id, _flat(self.store.path(u.sha256), layout), min(u.num_samples,
                                                                                          task.weight_cap))
                  for u in updates]
        sec = self._secure_round(run, rnd, spec)
        result = unmask(sec, masked, layout, task.fraction_bits, task.clip)
        figures = {"rule": "mean", "updates": len(updates), "secure_aggregation": {
            "members": len(sec.members), "dealers": len(sec.dealers), "uploaders": len(sec.uploaders),
            "neighbours": sec.degree, "threshold": sec.threshold, "rebuilt_seeds": result.rebuilt_seeds,
            "rebuilt_keys": result.rebuilt_keys, "out_of_range": result.out_of_range,
            "fraction_bits": task.fraction_bits, "error_bound": error_bound(task.fraction_bits)}}
        return strategy.aggregate_mean(unflatten(result.mean, layout, np.float64), dict(rnd.inputs), figures)

    def _server_step(self, run: RunRecord, rnd: RoundRecord, spec: RunSpec) -> bool:
        with self._leased(rnd) as held:
            if not held:
                return False
            strategy = self.runs.strategy(run)
            started = _now()
            with self.model_lock:
                result = strategy.server_step(rnd.number, dict(rnd.inputs), rnd.aggregate_digest)
            telemetry.server_stepped((_now() - started).total_seconds())
            failpoint("server_stepped")
            metrics = {**rnd.metrics, **result.metrics,
                       "server_step_s": round((_now() - started).total_seconds(), 3)}
        return self._cas(rnd, RoundState.server_step, RoundState.publishing, outputs=result.outputs,
                         metrics=metrics, artifacts=self.runs.artifact_records(strategy, result.outputs))

    def _publishing(self, run: RunRecord, rnd: RoundRecord, spec: RunSpec) -> bool:
        last = rnd.number >= spec.rounds
        if not self.state.close_round(run.id, rnd.number, last):
            return False
        log.info("run %s round %d: closed%s", run.id, rnd.number, "; run finished" if last else "")
        telemetry.round_phase(rnd, RoundState.publishing, RoundState.closed)
        return True

    def _fail(self, run: RunRecord, rnd: RoundRecord, exc: Exception) -> None:
        message = f"{type(exc).__name__}: {exc}"
        log.error("run %s round %d failed: %s\n%s", run.id, rnd.number, message, traceback.format_exc())
        self.state.fail_run(run.id, rnd.number, message)
        telemetry.round_phase(rnd, rnd.state, RoundState.failed)
