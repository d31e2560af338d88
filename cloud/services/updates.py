"""Updates: the checks on an upload (cheap ones before the body is read, the full ones on the
spooled file), accepting it once, and the bytes each client moves.

Nothing an upload carries reaches the state unchecked or makes the coordinator fail: the
sample count is a bounded integer, the metrics a bounded report of the method's schema, and a
header or metrics JSON nested past the parser's depth is a 422 like any other bad body. A
refused upload changes nothing, its blob included (ARCHITECTURE.md, "Privacy").
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from cloud import telemetry
from cloud.errors import MAX_LISTED_ERRORS, ApiError, field_problem, forbidden, not_found
from cloud.services.auth import check_member
from cloud.services.runs import RunsService
from cloud.services.secagg import SecaggService
from cloud.state import CoordinatorState
from cloud.state.records import ClientRecord, Direction, RoundRecord, RunRecord, UpdateOutcome, UpdateRecord
from cloud.store import BlobStore, sync_file
from cloud.strategies import Strategy
from common.digest import file_sha256
from common.protocol import META_METRICS, META_NUM_SAMPLES, RoundState, RunState, UpdateReceipt
from common.tensorfile import TensorFileError, check_finite, check_schema, read_header

log = logging.getLogger("cotune.updates")

_ACCEPTING = (RoundState.open, RoundState.collecting)
# ASCII decimal digits, no sign, no leading zero: what str(int) writes. ("²".isdigit() is True.)
_SAMPLES = re.compile(r"[1-9][0-9]{0,18}")
# Error messages quote what the checks found at most this far: never a body echoed back.
_MAX_MESSAGE = 300


class UpdatesService:
    def __init__(self, state: CoordinatorState, store: BlobStore, runs: RunsService,
                 secagg: SecaggService | None = None) -> None:
        self.state = state
        self.store = store
        self.runs = runs
        self.secagg = secagg

    @telemetry.counts_updates
    def check_can_upload(self, client: ClientRecord, run_id: str, number: int, client_id: str) -> None:
        """The cheap checks, before a byte of the body is read."""
        check_member(client, run_id, "this client is not enrolled in that run")
        if client_id != client.id:
            raise forbidden("a client may only upload its own update", "use the client id your enrollment returned")
        run = self.runs.get(run_id)
        rnd = self.state.get_round(run_id, number)
        self._check_secure(client, run, rnd)
        _check_round_accepts(run, rnd, number)

    def _check_secure(self, client: ClientRecord, run: RunRecord, rnd: RoundRecord | None) -> None:
        """Under secure aggregation, a masked update is taken only in `collecting`, and only from a
        device whose shares are in the round (cloud/services/secagg.py)."""
        if run.spec.get("secure_aggregation") is None or rnd is None or run.state != RunState.running:
            return
        if self.secagg is None:
            raise RuntimeError("a run with secure aggregation needs the coordinator's SecaggService")
        self.secagg.check_masked_upload(client, run, rnd)

    @telemetry.counts_updates
    def accept_update(self, client: ClientRecord, run_id: str, number: int, body: Path) -> UpdateReceipt:
        """Check a spooled upload in full, then record it once; a refused upload changes nothing."""
        run = self.runs.get(run_id)
        rnd = self.state.get_round(run_id, number)
        self._check_secure(client, run, rnd)
        _check_round_accepts(run, rnd, number)
        strategy = self.runs.strategy(run)
        secure = strategy.spec.secure_aggregation is not None
        try:
            header = read_header(body)
            if secure:
                # Masked values are elements of Z_2^64, carried as int64 with the adapter's names and
                # shapes; nothing about them can be checked one by one (that is the point).
                schema = strategy.update_schema(dict(rnd.inputs))
                check_schema(header, {k: (shape, "I64") for k, (shape, _dt) in schema.items()})
            else:
                arrays = strategy.read_update(body, dict(rnd.inputs))  # decoded, under an update encoding
                check_finite(arrays)
                strategy.check_update(arrays, dict(rnd.inputs))
                del arrays  # memory-mapped views of the spooled body
        except TensorFileError as exc:
            raise ApiError(422, exc.code, _bounded(exc.message), exc.hint) from None
        most = strategy.spec.max_samples_per_update
        update = UpdateRecord(run_id=run_id, round=number, client_id=client.id, sha256=file_sha256(body),
                              size=body.stat().st_size, num_samples=_num_samples(header.metadata, most),
                              metrics=_device_metrics(header.metadata, strategy))
        previous = self.state.get_update(run_id, number, client.id)
        if previous is not None:  # answered without touching the store
            same = previous.sha256 == update.sha256
            return _receipt(UpdateOutcome.duplicate if same else UpdateOutcome.conflict, previous)
        sync_file(body)  # the slow part of storing it, done before the insert takes its lock
        # The blob goes into the store inside the insert's transaction, once the round is known to
        # take it: an accepted update always has its blob, and a refused one (the round moved on,
        # another body of this client came first) leaves none behind.
        inserted = self.state.insert_update(update, before_commit=lambda: self.store.put_file(body, update.sha256))
        if inserted.update is None:  # the round moved on while the body was checked
            _check_round_accepts(self.runs.get(run_id), self.state.get_round(run_id, number), number)
            raise _round_closed(number, "closed")
        if inserted.outcome is UpdateOutcome.accepted:
            log.info("run %s round %d: update from %s (%d samples)", run_id, number, client.id, update.num_samples)
        return _receipt(inserted.outcome, inserted.update)

    def record_transfer(self, client: ClientRecord, direction: Direction, nbytes: int) -> None:
        if nbytes < 0:  # a caller's bug, never a device's input: the routes count what they send
            raise ValueError(f"a transfer of {nbytes} bytes")
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
        raise ApiError(409, "update_exists",
                       f"this client already submitted a different update to round {stored.round}",
                       "an accepted update cannot be replaced; wait for the next round")
    return UpdateReceipt(run_id=stored.run_id, round=stored.round, client_id=stored.client_id, sha256=stored.sha256,
                         num_samples=stored.num_samples, duplicate=outcome is UpdateOutcome.duplicate)


def _num_samples(metadata: dict[str, str], most: int) -> int:
    """The update's sample count (its aggregation weight): an integer in [1, most]."""
    raw = metadata.get(META_NUM_SAMPLES)
    if raw is None or not _SAMPLES.fullmatch(raw) or int(raw) > most:
        got = "is missing" if raw is None else "is not one"
        raise ApiError(422, "bad_metadata",
                       f"metadata {META_NUM_SAMPLES!r} must be an integer in [1, {most}] in decimal digits; it {got}",
                       "put the number of local training samples in the safetensors metadata; the run's "
                       "max_samples_per_update bounds it")
    return int(raw)


def _bounded(message: str) -> str:
    return message if len(message) <= _MAX_MESSAGE else message[:_MAX_MESSAGE] + "..."


def _device_metrics(metadata: dict[str, str], strategy: Strategy) -> dict[str, Any]:
    """The device's metrics JSON, bounded and checked against what the run's method expects of
    it; what is stored is the checked report, never the text as sent."""
    raw = metadata.get(META_METRICS)
    if raw is None:
        value: Any = {}
    else:
        try:
            value = json.loads(raw)
        except (json.JSONDecodeError, RecursionError):
            raise ApiError(422, "bad_metadata", f"metadata {META_METRICS!r} is not JSON (or nests too deep)",
                           "send the metrics the run's device handler reports") from None
    if not isinstance(value, dict):
        raise ApiError(422, "bad_metadata", f"metadata {META_METRICS!r} must be a JSON object")
    try:
        return strategy.check_device_metrics(value)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, p.loc)) or '(top level)'}: {p.msg}"
                             for p in (field_problem(e) for e in exc.errors()[:MAX_LISTED_ERRORS]))
        raise ApiError(422, "bad_metadata", _bounded(f"metadata {META_METRICS!r} does not fit this run's method: "
                                                     f"{problems}"),
                       "send the metrics the run's device handler reports") from None
    except (ValueError, RecursionError) as exc:  # a size or depth bound
        raise ApiError(422, "bad_metadata", _bounded(f"metadata {META_METRICS!r} is out of bounds: {exc}"),
                       "send the metrics the run's device handler reports") from None
