"""Updates: the checks on an upload (cheap ones before the body is read, the full ones on the
spooled file), accepting it once, and the bytes each client moves."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cloud.errors import ApiError, forbidden, not_found
from cloud.services.auth import check_member
from cloud.services.runs import RunsService
from cloud.state import CoordinatorState
from cloud.state.records import ClientRecord, Direction, RoundRecord, RunRecord, UpdateOutcome, UpdateRecord
from cloud.store import BlobStore
from cloud.strategies import Strategy
from common.digest import file_sha256
from common.protocol import META_METRICS, META_NUM_SAMPLES, RoundState, RunState, UpdateReceipt
from common.tensorfile import TensorFileError, check_finite, check_schema, load_arrays, read_header

log = logging.getLogger("cotune.updates")

_ACCEPTING = (RoundState.open, RoundState.collecting)


class UpdatesService:
    def __init__(self, state: CoordinatorState, store: BlobStore, runs: RunsService) -> None:
        self.state = state
        self.store = store
        self.runs = runs

    def check_can_upload(self, client: ClientRecord, run_id: str, number: int, client_id: str) -> None:
        """The cheap checks, before a byte of the body is read."""
        check_member(client, run_id, "this client is not enrolled in that run")
        if client_id != client.id:
            raise forbidden("a client may only upload its own update", "use the client id your enrollment returned")
        run = self.runs.get(run_id)
        _check_round_accepts(run, self.state.get_round(run_id, number), number)

    def accept_update(self, client: ClientRecord, run_id: str, number: int, body: Path) -> UpdateReceipt:
        """Check a spooled upload in full, then record it once; a refused upload changes nothing."""
        run = self.runs.get(run_id)
        rnd = self.state.get_round(run_id, number)
        _check_round_accepts(run, rnd, number)
        strategy = self.runs.strategy(run)
        try:
            header = read_header(body)
            check_schema(header, strategy.update_schema(dict(rnd.inputs)))
            check_finite(load_arrays(body, header))
        except TensorFileError as exc:
            raise ApiError(422, exc.code, exc.message, exc.hint) from None
        update = UpdateRecord(run_id=run_id, round=number, client_id=client.id, sha256=file_sha256(body),
                              size=body.stat().st_size, num_samples=_num_samples(header.metadata),
                              metrics=_device_metrics(header.metadata, strategy))
        previous = self.state.get_update(run_id, number, client.id)
        if previous is not None:  # answered without touching the store
            same = previous.sha256 == update.sha256
            return _receipt(UpdateOutcome.duplicate if same else UpdateOutcome.conflict, previous)
        # Into the store before the update row commits: an accepted update always has its blob.
        self.store.put_file(body, update.sha256)
        inserted = self.state.insert_update(update)
        if inserted.update is None:  # the round moved on while the body was checked
            _check_round_accepts(self.runs.get(run_id), self.state.get_round(run_id, number), number)
            raise _round_closed(number, "closed")
        if inserted.outcome is UpdateOutcome.accepted:
            log.info("run %s round %d: update from %s (%d samples)", run_id, number, client.id, update.num_samples)
        return _receipt(inserted.outcome, inserted.update)

    def record_transfer(self, client: ClientRecord, direction: Direction, nbytes: int) -> None:
        self.state.record_transfer(client.run_id, client.id, direction, nbytes)


def _check_round_accepts(run: RunRecord, rnd: RoundRecord | None, number: int) -> None:
    if rnd is None:
        if number > run.current_round:
            raise ApiError(409, "round_not_open", f"round {number} has not opened yet",
                           f"the current round is {run.current_round}")
        raise not_found(f"round {number}")
    if rnd.state not in _ACCEPTING or run.state != RunState.running:
        raise _round_closed(number, rnd.state.value)


def _round_closed(number: int, state: str) -> ApiError:
    return ApiError(409, "round_closed", f"round {number} is {state}; it takes no more updates",
                    "fetch the current round and train on its adapter")


def _receipt(outcome: UpdateOutcome, stored: UpdateRecord) -> UpdateReceipt:
    """The answer to an upload, given what the state did with it and the update it holds."""
    if outcome is UpdateOutcome.conflict:
        raise ApiError(409, "update_exists", f"a different update from this client is already in round {stored.round}",
                       "an accepted update cannot be replaced; wait for the next round")
    return UpdateReceipt(run_id=stored.run_id, round=stored.round, client_id=stored.client_id, sha256=stored.sha256,
                         num_samples=stored.num_samples, duplicate=outcome is UpdateOutcome.duplicate)


def _num_samples(metadata: dict[str, str]) -> int:
    raw = metadata.get(META_NUM_SAMPLES)
    if raw is None or not raw.isdigit() or int(raw) <= 0:
        raise ApiError(422, "bad_metadata", f"metadata {META_NUM_SAMPLES!r} must be a positive integer, got {raw!r}",
                       "put the number of local training samples in the safetensors metadata")
    return int(raw)


def _device_metrics(metadata: dict[str, str], strategy: Strategy) -> dict[str, Any]:
    """The device's metrics JSON, checked against what the run's method expects of it."""
    raw = metadata.get(META_METRICS)
    if raw is None:
        value: Any = {}
    else:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            raise ApiError(422, "bad_metadata", f"metadata {META_METRICS!r} is not JSON") from None
    if not isinstance(value, dict):
        raise ApiError(422, "bad_metadata", f"metadata {META_METRICS!r} must be a JSON object")
    try:
        strategy.device_metrics_schema().model_validate(value)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top level)'}: {e['msg']}" for e in exc.errors())
        raise ApiError(422, "bad_metadata", f"metadata {META_METRICS!r} does not fit this run's method: {problems}",
                       "send the metrics the run's device handler reports") from None
    # Stored as sent: the schema checks them, the strategy reads them back at aggregation.
    return value
