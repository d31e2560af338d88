"""The coordinator's core: runs, enrollment, updates, and what each caller may see.

HTTP lives in app.py and the round state machine in rounds.py; this module is the
part both share, and it is where the access rules are enforced.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import uuid
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError

from cloud.auth import hash_token, new_token, same_token
from cloud.db import Artifact, Client, Round, Run, Transfer, Update, make_engine, make_sessionmaker
from cloud.errors import ApiError, forbidden, not_found, unauthorized
from cloud.models import ModelHolder
from cloud.settings import CoordinatorSettings
from cloud.store import BlobStore, file_sha256
from cloud.strategies import SpecError, Strategy, strategy_class
from common.protocol import (
    META_METRICS,
    META_NUM_SAMPLES,
    ArtifactRef,
    ClientCredentials,
    ClientRegistration,
    GenerateRequest,
    GenerateResponse,
    RoundInfo,
    RoundState,
    RoundSummary,
    RunCreated,
    RunSpec,
    RunState,
    RunStatus,
    UpdateReceipt,
)
from common.tensorfile import TensorFileError, check_finite, check_schema, load_arrays, read_header

log = logging.getLogger("cotune.coordinator")

ACCEPTING = (RoundState.open.value, RoundState.collecting.value)


def aware(dt: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything here is UTC."""
    if dt is not None and dt.tzinfo is None:
        return dt.replace(tzinfo=timezone.utc)
    return dt


class Coordinator:
    def __init__(self, settings: CoordinatorSettings) -> None:
        self.settings = settings
        self.engine = make_engine(settings.state_url)
        self.Session = make_sessionmaker(self.engine)
        self.store = BlobStore(settings.artifact_dir)
        self.spool_dir = Path(settings.work_dir) / "uploads"
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.holder = ModelHolder(self.store)
        self.admin_token = settings.admin_token or new_token()
        self.instance_id = settings.instance_id or f"{socket.gethostname()}:{settings.port}"
        self._strategies: dict[str, Strategy] = {}
        self._strategies_lock = threading.Lock()
        # Held models are shared by the round driver (server steps) and /v1/generate.
        self.model_lock = threading.Lock()

    # -- helpers -------------------------------------------------------------------------

    def strategy(self, run: Run) -> Strategy:
        with self._strategies_lock:
            if run.id not in self._strategies:
                spec = RunSpec.model_validate(run.spec)
                self._strategies[run.id] = strategy_class(spec.algorithm)(spec, self.store, self.holder)
            return self._strategies[run.id]

    def is_admin(self, token: str | None) -> bool:
        return bool(token) and same_token(token, self.admin_token)

    def check_admin(self, token: str | None) -> None:
        if not self.is_admin(token):
            raise unauthorized("this endpoint needs the admin token")

    def authenticate_client(self, token: str | None) -> Client:
        if not token:
            raise unauthorized()
        with self.Session() as s:
            client = s.scalar(select(Client).where(Client.token_hash == hash_token(token)))
        if client is None:
            raise unauthorized("unknown client token")
        if client.revoked:
            raise forbidden("this client's token was revoked", "enroll the device again")
        return client

    def _run(self, s: Any, run_id: str) -> Run:
        run = s.get(Run, run_id)
        if run is None:
            raise not_found(f"run {run_id!r}")
        return run

    @staticmethod
    def _round(s: Any, run_id: str, number: int) -> Round | None:
        return s.scalar(select(Round).where(Round.run_id == run_id, Round.number == number))

    def _refs(self, names_digests: dict[str, str], visible_only: bool, strategy: Strategy) -> list[ArtifactRef]:
        return [
            ArtifactRef(name=name, sha256=digest, size=self.store.size(digest))
            for name, digest in sorted(names_digests.items())
            if not visible_only or strategy.client_visible(name)
        ]

    # -- runs ----------------------------------------------------------------------------

    def create_run(self, spec: RunSpec) -> RunCreated:
        try:
            cls = strategy_class(spec.algorithm)
            cls.check_spec(spec)
        except SpecError as exc:
            raise ApiError(422, "invalid_spec", str(exc)) from None
        comparable = spec.model_dump(exclude={"enroll_token"})
        with self.Session() as s:
            existing = s.scalar(select(Run).where(Run.name == spec.name))
            if existing is not None:
                same_spec = {k: v for k, v in existing.spec.items() if k != "enroll_token"} == comparable
                if same_spec and spec.enroll_token and hash_token(spec.enroll_token) == existing.enroll_token_hash:
                    return RunCreated(run_id=existing.id, name=existing.name,
                                      enroll_token=spec.enroll_token, created=False)
                raise ApiError(409, "run_exists", f"a run named {spec.name!r} already exists",
                               "choose another name, or resend the same spec with its enroll token")
        enroll_token = spec.enroll_token or new_token()
        run_id = uuid.uuid4().hex
        strategy = cls(spec, self.store, self.holder)
        try:
            inputs = strategy.initial_inputs()
        except (OSError, ValueError) as exc:
            raise ApiError(422, "invalid_spec", f"cannot prepare the run's models: {exc}") from None
        stored_spec = json.loads(spec.model_copy(update={"enroll_token": None}).model_dump_json())
        try:
            with self.Session.begin() as s:
                s.add(Run(id=run_id, name=spec.name, algorithm=spec.algorithm, spec=stored_spec,
                          state=RunState.running.value, current_round=1,
                          enroll_token_hash=hash_token(enroll_token), artifacts={}, metrics={}))
                s.flush()
                s.add(Round(run_id=run_id, number=1, state=RoundState.open.value, inputs=inputs, metrics={}))
                self._add_artifacts(s, run_id, inputs, strategy)
        except IntegrityError:
            # Another replica created it between our check and our insert: answer as a resend.
            return self.create_run(spec)
        with self._strategies_lock:
            self._strategies[run_id] = strategy
        log.info("created run %s (%s, %s)", spec.name, run_id, spec.algorithm)
        return RunCreated(run_id=run_id, name=spec.name, enroll_token=enroll_token, created=True)

    def _add_artifacts(self, s: Any, run_id: str, named: dict[str, str], strategy: Strategy) -> None:
        known = set(s.scalars(select(Artifact.sha256).where(Artifact.run_id == run_id)))
        for name, digest in named.items():
            if digest in known:
                # The same bytes may be published under a visible name later (FedAvg's
                # aggregate becomes the SLM adapter): visibility only ever widens.
                if strategy.client_visible(name):
                    row = s.scalar(select(Artifact).where(Artifact.run_id == run_id, Artifact.sha256 == digest))
                    row.client_visible = True
                continue
            s.add(Artifact(run_id=run_id, sha256=digest, size=self.store.size(digest),
                           client_visible=strategy.client_visible(name)))
            known.add(digest)

    def list_runs(self) -> list[RunStatus]:
        with self.Session() as s:
            ids = list(s.scalars(select(Run.id).order_by(Run.created_at)))
        return [self.run_status(run_id) for run_id in ids]

    def run_status(self, run_id: str, viewer: Client | None = None) -> RunStatus:
        if viewer is not None and viewer.run_id != run_id:
            raise forbidden("a client may only read the run it belongs to")
        with self.Session() as s:
            run = self._run(s, run_id)
            rounds = list(s.scalars(select(Round).where(Round.run_id == run_id).order_by(Round.number)))
            n_clients = s.scalar(select(func.count()).select_from(Client).where(
                Client.run_id == run_id, Client.revoked.is_(False))) or 0
            summaries = [self._summary(s, run, r, viewer) for r in rounds]
        initial = run.metrics.get("initial")
        if initial is not None:
            summaries.insert(0, RoundSummary(round=0, state=RoundState.closed, num_updates=0,
                                             num_samples=0, metrics=initial))
        return RunStatus(run_id=run.id, name=run.name, algorithm=run.algorithm, state=RunState(run.state),
                         rounds_total=run.spec["rounds"], current_round=run.current_round,
                         num_clients=n_clients, error=run.error, rounds=summaries)

    def round_summary(self, run_id: str, number: int, viewer: Client | None = None) -> RoundSummary:
        if viewer is not None and viewer.run_id != run_id:
            raise forbidden("a client may only read the run it belongs to")
        with self.Session() as s:
            run = self._run(s, run_id)
            rnd = self._round(s, run_id, number)
            if rnd is None:
                raise not_found(f"round {number} of run {run_id!r}")
            return self._summary(s, run, rnd, viewer)

    def _summary(self, s: Any, run: Run, rnd: Round, viewer: Client | None) -> RoundSummary:
        updates = list(s.scalars(select(Update).where(Update.round_id == rnd.id)))
        transfers = s.execute(
            select(Transfer.client_id, Transfer.direction, func.sum(Transfer.bytes))
            .where(Transfer.run_id == run.id, Transfer.round == rnd.number)
            .group_by(Transfer.client_id, Transfer.direction)
        ).all()
        per_client: dict[str, dict[str, Any]] = defaultdict(lambda: {"bytes_up": 0, "bytes_down": 0})
        for client_id, direction, total in transfers:
            per_client[client_id][f"bytes_{direction}"] = int(total or 0)
        for u in updates:
            per_client[u.client_id].update(num_samples=u.num_samples, client_metrics=u.metrics)
        if viewer is not None:
            per_client = {k: v for k, v in per_client.items() if k == viewer.id}
        metrics = {**rnd.metrics, "clients": dict(per_client)}
        strategy = self.strategy(run)
        visible_only = viewer is not None
        artifacts = self._refs(rnd.outputs or {}, visible_only, strategy) if rnd.outputs else []
        return RoundSummary(round=rnd.number, state=RoundState(rnd.state), num_updates=len(updates),
                            num_samples=sum(u.num_samples for u in updates),
                            opened_at=aware(rnd.opened_at), closed_at=aware(rnd.closed_at),
                            metrics=metrics, artifacts=artifacts)

    # -- clients -------------------------------------------------------------------------

    def register_client(self, enroll_token: str | None, reg: ClientRegistration) -> ClientCredentials:
        if not enroll_token:
            raise unauthorized("enrollment needs the run's enroll token as the bearer token")
        token = new_token()
        with self.Session.begin() as s:
            run = s.scalar(select(Run).where(Run.enroll_token_hash == hash_token(enroll_token)))
            if run is None:
                raise unauthorized("unknown enroll token")
            if run.state != RunState.running.value:
                raise ApiError(409, "run_over", f"run {run.name!r} has {run.state}; it takes no new devices")
            try:
                self.strategy(run).check_join(reg)
            except SpecError as exc:
                raise ApiError(409, "cannot_join", str(exc)) from None
            client = Client(id=uuid.uuid4().hex, run_id=run.id, name=reg.name,
                            token_hash=hash_token(token),
                            profile={**reg.profile.model_dump(), "task_kinds": reg.task_kinds,
                                     "slm": reg.slm.model_dump() if reg.slm else None})
            s.add(client)
        log.info("enrolled client %s (%s) into run %s", client.id, reg.name, run.name)
        return ClientCredentials(client_id=client.id, run_id=run.id, token=token)

    def revoke_client(self, client_id: str) -> None:
        with self.Session.begin() as s:
            client = s.get(Client, client_id)
            if client is None:
                raise not_found(f"client {client_id!r}")
            client.revoked = True

    def current_round(self, client: Client, run_id: str) -> RoundInfo:
        if client.run_id != run_id:
            raise forbidden("this client is not enrolled in that run")
        with self.Session() as s:
            run = self._run(s, run_id)
            rnd = self._round(s, run_id, run.current_round)
            strategy = self.strategy(run)
            submitted = rnd is not None and s.scalar(
                select(func.count()).select_from(Update).where(
                    Update.round_id == rnd.id, Update.client_id == client.id)) > 0
        finished = run.state != RunState.running.value
        named = run.artifacts if finished and run.artifacts else rnd.inputs
        return RoundInfo(
            run_id=run.id, run_state=RunState(run.state), rounds_total=run.spec["rounds"],
            round=rnd.number, state=RoundState(rnd.state), deadline=aware(rnd.deadline_at),
            artifacts=self._refs(named, True, strategy), task=strategy.client_task(rnd.number),
            submitted=bool(submitted), builds=builds_state(run),
        )

    def artifact_for_download(self, token: str | None, digest: str) -> tuple[Path, Client | None]:
        """Admins read any blob; a client only the visible artifacts of its own run."""
        if self.is_admin(token):
            if not self.store.has(digest):
                raise not_found(f"artifact {digest}")
            return self.store.path(digest), None
        viewer = self.authenticate_client(token)
        with self.Session() as s:
            row = s.scalar(select(Artifact).where(Artifact.run_id == viewer.run_id,
                                                  Artifact.sha256 == digest,
                                                  Artifact.client_visible.is_(True)))
        if row is None or not self.store.has(digest):
            # Same answer whether it exists elsewhere or not: no probing of other runs' blobs.
            raise not_found(f"artifact {digest} in this client's run")
        return self.store.path(digest), viewer

    def record_transfer(self, client: Client, direction: str, nbytes: int) -> None:
        with self.Session.begin() as s:
            run = s.get(Run, client.run_id)
            number = run.current_round if run.state == RunState.running.value else None
            s.add(Transfer(run_id=client.run_id, client_id=client.id, round=number,
                           direction=direction, bytes=nbytes))

    # -- updates -------------------------------------------------------------------------

    def check_can_upload(self, client: Client, run_id: str, number: int, client_id: str) -> None:
        """The cheap checks, before a byte of the body is read."""
        if client.run_id != run_id:
            raise forbidden("this client is not enrolled in that run")
        if client_id != client.id:
            raise forbidden("a client may only upload its own update",
                            "use the client id your enrollment returned")
        with self.Session() as s:
            run = self._run(s, run_id)
            rnd = self._round(s, run_id, number)
            self._check_round_accepts(run, rnd, number)

    @staticmethod
    def _check_round_accepts(run: Run, rnd: Round | None, number: int) -> None:
        if rnd is None:
            if number > run.current_round:
                raise ApiError(409, "round_not_open", f"round {number} has not opened yet",
                               f"the current round is {run.current_round}")
            raise not_found(f"round {number}")
        if rnd.state not in ACCEPTING or run.state != RunState.running.value:
            raise ApiError(409, "round_closed", f"round {number} is {rnd.state}; it takes no more updates",
                           "fetch the current round and train on its adapter")

    def accept_update(self, client: Client, run_id: str, number: int, body: Path) -> UpdateReceipt:
        """Check a spooled upload in full, then record it in one transaction."""
        with self.Session() as s:
            run = self._run(s, run_id)
            rnd = self._round(s, run_id, number)
            self._check_round_accepts(run, rnd, number)
            inputs = dict(rnd.inputs)
        strategy = self.strategy(run)
        try:
            header = read_header(body)
            check_schema(header, strategy.update_schema(inputs))
            check_finite(load_arrays(body, header))
        except TensorFileError as exc:
            raise ApiError(422, exc.code, exc.message, exc.hint) from None
        raw_samples = header.metadata.get(META_NUM_SAMPLES)
        if raw_samples is None or not raw_samples.isdigit() or int(raw_samples) <= 0:
            raise ApiError(422, "bad_metadata",
                           f"metadata {META_NUM_SAMPLES!r} must be a positive integer, got {raw_samples!r}",
                           "put the number of local training samples in the safetensors metadata")
        num_samples = int(raw_samples)
        metrics = _parse_metrics(header.metadata)
        digest = file_sha256(body)
        size = body.stat().st_size

        with self.Session.begin() as s:
            run = self._run(s, run_id)
            # Lock the round row (a no-op on SQLite, whose writers are serialized anyway) so
            # a concurrent close cannot slip between this check and the insert.
            rnd = s.scalar(select(Round).where(Round.run_id == run_id, Round.number == number)
                           .with_for_update())
            self._check_round_accepts(run, rnd, number)
            previous = s.scalar(select(Update).where(Update.round_id == rnd.id,
                                                     Update.client_id == client.id))
            if previous is not None:
                if previous.sha256 != digest:
                    raise ApiError(409, "update_exists",
                                   f"a different update from this client is already in round {number}",
                                   "an accepted update cannot be replaced; wait for the next round")
                return UpdateReceipt(run_id=run_id, round=number, client_id=client.id, sha256=digest,
                                     num_samples=previous.num_samples, duplicate=True)
            self.store.put_file(body, digest)
            s.add(Update(round_id=rnd.id, client_id=client.id, sha256=digest, size=size,
                         num_samples=num_samples, metrics=metrics))
            s.add(Transfer(run_id=run_id, client_id=client.id, round=number, direction="up", bytes=size))
            if s.scalar(select(Artifact).where(Artifact.run_id == run_id, Artifact.sha256 == digest)) is None:
                s.add(Artifact(run_id=run_id, sha256=digest, size=size, client_visible=False))
        log.info("run %s round %d: update from %s (%d samples)", run_id, number, client.id, num_samples)
        return UpdateReceipt(run_id=run_id, round=number, client_id=client.id, sha256=digest,
                             num_samples=num_samples, duplicate=False)


    def generate(self, client: Client, request: GenerateRequest) -> GenerateResponse:
        """Answer with the run's LLM and the adapter of its last closed round."""
        from cloud.generation import complete

        with self.Session() as s:
            run = self._run(s, client.run_id)
            rnd = self._round(s, run.id, run.current_round)
            closed = run.state == RunState.finished.value
            named = run.artifacts if closed and run.artifacts else rnd.inputs
            round_of = run.current_round if closed else run.current_round - 1
        spec = RunSpec.model_validate(run.spec)
        adapter = named.get("llm/adapter.safetensors")
        if spec.llm is None or adapter is None:
            raise ApiError(409, "no_llm", f"run {run.name!r} ({run.algorithm}) holds no LLM to answer with",
                           "answer on the device, or enroll in a run that co-tunes an LLM")
        with self.model_lock:
            model, tokenizer = self.holder.with_adapter(spec.llm, spec.lora, spec.seed, adapter)
            try:
                return complete(model, tokenizer, request, f"{run.name}/llm@round{round_of}")
            except ValueError as exc:
                raise ApiError(422, "prompt_too_long", str(exc)) from None


def builds_state(run: Run) -> str:
    """none (the run asks for no builds), pending, ready or failed."""
    if not run.spec.get("builds"):
        return "none"
    record = run.metrics.get("builds")
    if record is None:
        return "failed" if run.state == RunState.failed.value else "pending"
    return "failed" if "error" in record else "ready"


def _parse_metrics(metadata: dict[str, str]) -> dict[str, Any]:
    raw = metadata.get(META_METRICS)
    if raw is None:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError:
        raise ApiError(422, "bad_metadata", f"metadata {META_METRICS!r} is not JSON") from None
    if not isinstance(value, dict):
        raise ApiError(422, "bad_metadata", f"metadata {META_METRICS!r} must be a JSON object")
    return value
