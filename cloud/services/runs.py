"""Runs: creation (idempotent by name and enroll token), status, rounds as each caller may see
them, enrollment, and the per-run strategy instances."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cloud.auth import hash_token, new_token
from cloud.errors import ApiError, not_found, unauthorized
from cloud.models import ModelHolder
from cloud.services.auth import check_member
from cloud.services.builds import builds_state
from cloud.state import CoordinatorState, RunExists, RunFull
from cloud.state.records import ArtifactRecord, ClientRecord, NewRun, RoundRecord, RunRecord
from cloud.store import BlobStore
from cloud.strategies import SpecError, Strategy, strategy_class
from common.protocol import (
    ArtifactRef,
    ClientCredentials,
    ClientRegistration,
    DeviceInfo,
    RoundInfo,
    RoundState,
    RoundSummary,
    RunCreated,
    RunSpec,
    RunState,
    RunStatus,
)

log = logging.getLogger("cotune.runs")

_PAST_SERVER_STEP = (RoundState.publishing, RoundState.closed)

StrategyFactory = Callable[[RunSpec], Strategy]


def device_run_error(run: RunRecord) -> str:
    """What a device is told of a failed run: the recorded error (exception text, paths on the
    coordinator's disk) is for the admin only."""
    return f"run_failed: round {run.current_round} failed on the coordinator; its operator can see why"


def _shown_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as the admin reads it back: everything but the enroll token (a secret, shown once)."""
    return {k: v for k, v in spec.items() if k != "enroll_token"}


def strategy_factory(store: BlobStore, holder: ModelHolder) -> StrategyFactory:
    """Strategies as the coordinator makes them: by the spec's algorithm, on its store and models."""
    return lambda spec: strategy_class(spec.algorithm)(spec, store, holder)


@dataclass(frozen=True)
class Holdings:
    """What a run holds now: the outputs of its last closed round (name -> digest)."""

    named: dict[str, str]
    # The round those outputs came out of; 0 for the starting models.
    round: int


def spec_differences(stored: dict[str, Any], spec: RunSpec) -> list[str]:
    """The top-level fields in which `spec` differs from a stored run's spec (enroll token aside).
    The stored spec is read through RunSpec first, so fields added since it was stored count
    at their defaults and a run made by an older coordinator still resumes."""
    try:
        before = json.loads(RunSpec.model_validate({**stored, "enroll_token": None}).model_dump_json())
    except ValueError:  # stored by a coordinator whose RunSpec this one no longer accepts
        before = dict(stored)
    after = json.loads(spec.model_dump_json())
    return sorted(k for k in before.keys() | after.keys() if k != "enroll_token" and before.get(k) != after.get(k))


class RunsService:
    def __init__(self, state: CoordinatorState, store: BlobStore, factory: StrategyFactory,
                 model_lock: threading.Lock | None = None) -> None:
        self.state = state
        self.store = store
        self._factory = factory
        # Held models are shared with the round driver and /v1/generate (see Coordinator):
        # preparing a run's starting models on them must take turns with those.
        self.model_lock = model_lock if model_lock is not None else threading.Lock()
        self._strategies: dict[str, Strategy] = {}
        self._strategies_lock = threading.Lock()

    # -- lookups ---------------------------------------------------------------------------

    def get(self, run_id: str) -> RunRecord:
        run = self.state.get_run(run_id)
        if run is None:
            raise not_found(f"run {run_id!r}")
        return run

    def strategy(self, run: RunRecord) -> Strategy:
        """The run's strategy; one instance per run, since strategies cache what they load."""
        with self._strategies_lock:
            if run.id not in self._strategies:
                self._strategies[run.id] = self._factory(RunSpec.model_validate(run.spec))
            return self._strategies[run.id]

    def holdings(self, run: RunRecord, current: RoundRecord | None = None) -> Holdings:
        if run.state == RunState.finished and run.artifacts:
            return Holdings(dict(run.artifacts), run.current_round)
        current = current or self.state.current_round(run.id)
        return Holdings(dict(current.inputs) if current else {}, run.current_round - 1)

    def artifact_records(self, strategy: Strategy, named: dict[str, str]) -> list[ArtifactRecord]:
        """Named blobs as the run's artifacts, visible to clients where the strategy says so."""
        return [ArtifactRecord(digest, self.store.size(digest), strategy.client_visible(name))
                for name, digest in named.items()]

    def refs(self, named: dict[str, str], strategy: Strategy, visible_only: bool) -> list[ArtifactRef]:
        return [ArtifactRef(name=name, sha256=digest, size=self.store.size(digest))
                for name, digest in sorted(named.items())
                if not visible_only or strategy.client_visible(name)]

    # -- creation --------------------------------------------------------------------------

    def create(self, spec: RunSpec) -> RunCreated:
        try:
            strategy_class(spec.algorithm).check_spec(spec)
        except SpecError as exc:
            raise ApiError(422, "invalid_spec", str(exc)) from None
        if spec.max_devices < spec.min_clients:
            raise ApiError(422, "invalid_spec", f"max_devices ({spec.max_devices}) is below min_clients "
                           f"({spec.min_clients}): no round could ever reach its quorum",
                           "raise max_devices or lower min_clients")
        resent = self._resent(spec)
        if resent is not None:
            return resent
        enroll_token = spec.enroll_token or new_token()
        strategy = self._factory(spec)
        try:
            with self.model_lock:
                inputs = strategy.initial_inputs()
        except (OSError, ValueError) as exc:
            raise ApiError(422, "invalid_spec", f"cannot prepare the run's models: {exc}") from None
        stored_spec = json.loads(spec.model_copy(update={"enroll_token": None}).model_dump_json())
        new = NewRun(id=uuid.uuid4().hex, name=spec.name, algorithm=spec.algorithm, spec=stored_spec,
                     enroll_token_hash=hash_token(enroll_token))
        try:
            self.state.create_run(new, inputs, self.artifact_records(strategy, inputs))
        except RunExists:
            # Another replica created it between our check and our insert: answer as a resend.
            resent = self._resent(spec)
            if resent is not None:
                return resent
            raise ApiError(409, "run_exists", "that enroll token belongs to another run",
                           "send another enroll token, or none to have one generated") from None
        with self._strategies_lock:
            self._strategies[new.id] = strategy
        log.info("created run %s (%s, %s)", spec.name, new.id, spec.algorithm)
        return RunCreated(run_id=new.id, name=spec.name, enroll_token=enroll_token, created=True)

    def _resent(self, spec: RunSpec) -> RunCreated | None:
        """The stored run if `spec` resends it (same spec and enroll token); 409 if the name is taken."""
        existing = self.state.run_by_name(spec.name)
        if existing is None:
            return None
        differences = spec_differences(existing.spec, spec)
        if differences:  # names only: the values may be paths or settings the caller sent
            raise ApiError(409, "run_exists", f"a run named {spec.name!r} already exists with another spec: "
                           f"{', '.join(differences)} differ", "choose another name, or resend the run's own spec")
        if spec.enroll_token and hash_token(spec.enroll_token) == existing.enroll_token_hash:
            return RunCreated(run_id=existing.id, name=existing.name, enroll_token=spec.enroll_token, created=False)
        raise ApiError(409, "run_exists", f"a run named {spec.name!r} already exists with another enroll token",
                       "choose another name, or resend the same spec with the run's enroll token")

    # -- reading ---------------------------------------------------------------------------

    def list_runs(self) -> list[RunStatus]:
        return [self._status(run, None) for run in self.state.list_runs()]

    def status(self, run_id: str, viewer: ClientRecord | None = None) -> RunStatus:
        check_member(viewer, run_id, "a client may only read the run it belongs to")
        return self._status(self.get(run_id), viewer)

    def _status(self, run: RunRecord, viewer: ClientRecord | None) -> RunStatus:
        summaries = [self._summary(run, r, viewer) for r in self.state.list_rounds(run.id)]
        initial = run.metrics.get("initial")
        if initial is not None:
            summaries.insert(0, RoundSummary(round=0, state=RoundState.closed, num_updates=0,
                                             num_samples=0, metrics=initial))
        error = run.error if viewer is None or run.error is None else device_run_error(run)
        return RunStatus(run_id=run.id, name=run.name, algorithm=run.algorithm, state=run.state,
                         rounds_total=run.spec["rounds"], current_round=run.current_round,
                         num_clients=self.state.count_active_clients(run.id), error=error, rounds=summaries,
                         spec=_shown_spec(run.spec) if viewer is None else None)

    def devices(self, run_id: str) -> list[DeviceInfo]:
        """The run's devices as the admin sees them, revoked ones included."""
        self.get(run_id)
        return [DeviceInfo(client_id=c.client.id, name=c.client.name, profile=c.client.profile,
                           enrolled_at=c.client.enrolled_at, last_seen=c.client.last_seen,
                           updates_sent=c.updates_sent, revoked=c.client.revoked)
                for c in self.state.list_clients(run_id)]

    def round_summary(self, run_id: str, number: int, viewer: ClientRecord | None = None) -> RoundSummary:
        check_member(viewer, run_id, "a client may only read the run it belongs to")
        run = self.get(run_id)
        rnd = self.state.get_round(run_id, number)
        if rnd is None:
            raise not_found(f"round {number} of run {run_id!r}")
        return self._summary(run, rnd, viewer)

    def _summary(self, run: RunRecord, rnd: RoundRecord, viewer: ClientRecord | None) -> RoundSummary:
        updates = self.state.list_updates(run.id, rnd.number)
        per_client: dict[str, dict[str, Any]] = defaultdict(lambda: {"bytes_up": 0, "bytes_down": 0})
        for total in self.state.transfer_totals(run.id, rnd.number):
            per_client[total.client_id][f"bytes_{total.direction.value}"] = total.bytes
        for u in updates:
            per_client[u.client_id].update(num_samples=u.num_samples, client_metrics=u.metrics)
        if viewer is not None:  # a device sees its own figures, never another's
            per_client = {k: v for k, v in per_client.items() if k == viewer.id}
        artifacts = self.refs(rnd.outputs, self.strategy(run), viewer is not None) if rnd.outputs else []
        return RoundSummary(round=rnd.number, state=rnd.state, num_updates=len(updates),
                            num_samples=sum(u.num_samples for u in updates),
                            opened_at=rnd.opened_at, collecting_at=rnd.collecting_at, deadline=rnd.deadline_at,
                            closed_at=rnd.closed_at, phase_times=self._phase_times(rnd),
                            metrics={**rnd.metrics, "clients": dict(per_client)}, artifacts=artifacts)

    def _phase_times(self, rnd: RoundRecord) -> dict[str, datetime]:
        """When the round entered each state it went through, for a timeline: the round row holds
        open, collecting and closed; the slow steps' first lease events hold aggregating and
        server_step; publishing began when the server step ended (its start plus its seconds)."""
        times: dict[str, datetime] = {}
        for event in self.state.round_events(rnd.run_id, rnd.number):
            times.setdefault(event.step, event.at)
        step_s = rnd.metrics.get("server_step_s")
        started = times.get(RoundState.server_step.value)
        if started is not None and isinstance(step_s, (int, float)) and rnd.state in _PAST_SERVER_STEP:
            times[RoundState.publishing.value] = started + timedelta(seconds=float(step_s))
        stamps = {RoundState.open: rnd.opened_at, RoundState.collecting: rnd.collecting_at,
                  RoundState.closed: rnd.closed_at}
        times.update({state.value: at for state, at in stamps.items() if at is not None})
        order = [state.value for state in RoundState]
        return dict(sorted(times.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order)))

    def current_round(self, client: ClientRecord, run_id: str) -> RoundInfo:
        check_member(client, run_id, "this client is not enrolled in that run")
        run = self.get(run_id)
        rnd = self.state.current_round(run_id)
        strategy = self.strategy(run)
        named = self.holdings(run, rnd).named
        return RoundInfo(
            run_id=run.id, run_state=run.state, rounds_total=run.spec["rounds"], round=rnd.number,
            state=rnd.state, deadline=rnd.deadline_at, artifacts=self.refs(named, strategy, True),
            task=strategy.client_task(rnd.number),
            submitted=self.state.get_update(run_id, rnd.number, client.id) is not None,
            builds=builds_state(run),
        )

    # -- the admin's actions -------------------------------------------------------------

    def stop(self, run_id: str) -> RunStatus:
        """End a running run now: no round advances any more, devices see it stopped and leave."""
        run = self.get(run_id)
        if not self.state.stop_run(run_id):
            now = self.get(run_id).state.value
            raise ApiError(409, "run_over", f"run {run.name!r} has already {now}; only a running run can be stopped",
                           "nothing to do: the run takes no more rounds")
        log.info("run %s (%s) stopped by the admin", run.name, run_id)
        return self._status(self.get(run_id), None)

    # -- enrollment ------------------------------------------------------------------------

    def enroll(self, enroll_token: str | None, reg: ClientRegistration) -> ClientCredentials:
        if not enroll_token:
            raise unauthorized("enrollment needs the run's enroll token as the bearer token")
        run = self.state.run_by_enroll_token_hash(hash_token(enroll_token))
        if run is None:
            raise unauthorized("unknown enroll token")
        if run.state != RunState.running:
            raise ApiError(409, "run_over", f"run {run.name!r} has {run.state.value}; it takes no new devices")
        try:
            self.strategy(run).check_join(reg)
        except SpecError as exc:
            raise ApiError(409, "cannot_join", str(exc)) from None
        token = new_token()
        limit = RunSpec.model_validate(run.spec).max_devices
        try:
            client = self.state.enroll_client(ClientRecord(
                id=uuid.uuid4().hex, run_id=run.id, name=reg.name, token_hash=hash_token(token),
                profile={**reg.profile.model_dump(), "task_kinds": reg.task_kinds,
                         "slm": reg.slm.model_dump() if reg.slm else None}), max_clients=limit)
        except RunFull:
            raise ApiError(409, "run_full", f"run {run.name!r} already has its {limit} devices (max_devices)",
                           "ask the run's operator to revoke a device that left the run") from None
        log.info("enrolled client %s (%s) into run %s", client.id, reg.name, run.name)
        return ClientCredentials(client_id=client.id, run_id=run.id, token=token)
