"""The coordinator's state behind one interface (ARCHITECTURE.md, "State interface").

Everything the coordinator remembers goes through `CoordinatorState`: the services and the
round driver never see a database. Methods take and return the plain records of
records.py. Each method is one transaction; the ones the round state machine relies on
(ARCHITECTURE.md, "Round state machine") are compare-and-set, so replicas sharing one
database, or a coordinator restarted after a crash, never apply a step twice.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

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
from common.protocol import RoundState, RunState


class StateError(Exception):
    """Base of the errors a state backend raises on purpose."""


class RunExists(StateError):
    """A run with that name or enroll token is already stored (maybe by another replica)."""


class RunFull(StateError):
    """The run already has as many active clients as it allows (`RunSpec.max_devices`)."""


class StateUnavailable(StateError):
    """The store could not be reached or was busy; the same call may succeed later."""


class CoordinatorState(ABC):
    # -- runs ------------------------------------------------------------------------------

    @abstractmethod
    def create_run(self, run: NewRun, inputs: dict[str, str], artifacts: Sequence[ArtifactRecord]) -> RunRecord:
        """Store a running run, its round 1 (open, from `inputs`) and their artifacts, all or
        nothing. Raise RunExists if the name or enroll token is taken."""

    @abstractmethod
    def get_run(self, run_id: str) -> RunRecord | None: ...

    @abstractmethod
    def run_by_name(self, name: str) -> RunRecord | None: ...

    @abstractmethod
    def run_by_enroll_token_hash(self, token_hash: str) -> RunRecord | None: ...

    @abstractmethod
    def list_runs(self, state: RunState | None = None) -> list[RunRecord]:
        """Runs (only those in `state` if given), oldest first."""

    @abstractmethod
    def set_run_metrics(self, run_id: str, values: dict[str, Any]) -> None:
        """Merge `values` into the run's metrics (top-level keys replace)."""

    @abstractmethod
    def fail_run(self, run_id: str, number: int, message: str) -> None:
        """Mark round `number` and its run failed, with what went wrong."""

    @abstractmethod
    def stop_run(self, run_id: str) -> bool:
        """Compare-and-set running -> stopped (the admin ended it); False (nothing changed) if the
        run is not running. A stopped run's rounds never close: `close_round` refuses them."""

    # -- rounds ----------------------------------------------------------------------------

    @abstractmethod
    def get_round(self, run_id: str, number: int) -> RoundRecord | None: ...

    @abstractmethod
    def current_round(self, run_id: str) -> RoundRecord | None:
        """The run's current round: the last one, once the run is over."""

    @abstractmethod
    def list_rounds(self, run_id: str) -> list[RoundRecord]: ...

    @abstractmethod
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
        """Compare-and-set: move the round from `old` to `new` and store the given fields and
        artifacts, in one transaction; False (and nothing changed) if it was not in `old`, or
        if `lease_holder` is given and does not hold the round's lease. Clears the lease."""

    @abstractmethod
    def claim_lease(self, run_id: str, number: int, state: RoundState, instance: str, until: datetime,
                    now: datetime | None = None) -> bool:
        """Take or renew the lease on the round's slow step while it is in `state`, and log an
        audit event; False while another instance holds an unexpired lease."""

    @abstractmethod
    def round_events(self, run_id: str, number: int) -> list[RoundEventRecord]:
        """The audit events of a round, oldest first."""

    @abstractmethod
    def close_round(self, run_id: str, number: int, last: bool) -> bool:
        """Compare-and-set publishing -> closed. Then, in the same transaction, open the next
        round from this one's outputs, or (if `last`) finish the run holding those outputs.
        False if the round was not publishing."""

    # -- clients ---------------------------------------------------------------------------

    @abstractmethod
    def enroll_client(self, client: ClientRecord, max_clients: int | None = None) -> ClientRecord:
        """Store a client. With `max_clients`, only while its run has fewer active (unrevoked)
        clients, counted in the same transaction as the insert, so concurrent enrollments
        cannot overshoot it; RunFull (and nothing stored) otherwise."""

    @abstractmethod
    def get_client(self, client_id: str) -> ClientRecord | None: ...

    @abstractmethod
    def client_by_token_hash(self, token_hash: str) -> ClientRecord | None: ...

    @abstractmethod
    def revoke_client(self, client_id: str) -> bool:
        """Revoke the client's token; False if there is no such client."""

    @abstractmethod
    def count_active_clients(self, run_id: str) -> int:
        """Enrolled, not revoked."""

    @abstractmethod
    def list_clients(self, run_id: str) -> list[ClientListing]:
        """Every client of the run (revoked ones too), in enrollment order, with its accepted
        updates counted."""

    @abstractmethod
    def touch_client(self, client_id: str, now: datetime, every_s: float) -> bool:
        """Set the client's last_seen to `now` unless it was set less than `every_s` before
        (another replica may just have); True if it was written."""

    # -- updates ---------------------------------------------------------------------------

    @abstractmethod
    def insert_update(self, update: UpdateRecord, before_commit: Callable[[], object] | None = None) -> UpdateInsert:
        """Accept a client's update into an open or collecting round of a running run, once.

        With it, in the same transaction: its upload in the transfer totals and its blob as a
        run artifact no client may download. Sending the same bytes again is `duplicate`,
        other bytes `conflict`, a round that stopped taking updates `closed`; none of those
        changes anything. The round's state is checked and the update inserted under one lock,
        so an update never lands in a round that has left collecting.

        `before_commit` runs only when the update is accepted, after its rows are written and
        before they commit (the service stores the blob there); if it raises, nothing commits."""

    @abstractmethod
    def get_update(self, run_id: str, number: int, client_id: str) -> UpdateRecord | None: ...

    @abstractmethod
    def list_updates(self, run_id: str, number: int) -> list[UpdateRecord]:
        """In the order they were accepted (aggregation order is part of the result's bits)."""

    @abstractmethod
    def count_updates(self, run_id: str, number: int) -> int: ...

    # -- secure aggregation ----------------------------------------------------------------

    @abstractmethod
    def put_secagg_message(self, message: SecaggMessage, phase_state: RoundState,
                           shares: Sequence[SecaggShare] = (), public_keys: Sequence[str] = ()) -> UpdateOutcome:
        """Keep a device's message for one phase of a secure-aggregation round, once, while the
        round is in `phase_state` and its run is running; with it, in the same transaction, the
        shares it deals and the public keys it advertises.

        The round's state is checked under the same lock as `insert_update`, so once the round
        has left the phase its set of senders is final. The same body again is `duplicate`,
        another body `conflict`, a public key seen before in any round `reused`, a round that
        left the phase `closed`; none of those changes anything."""

    @abstractmethod
    def list_secagg_messages(self, run_id: str, number: int, phase: str) -> list[SecaggMessage]:
        """The round's messages of one phase, in the order they were kept."""

    @abstractmethod
    def secagg_shares_for(self, run_id: str, number: int, recipient: str) -> list[SecaggShare]:
        """The shares dealt to `recipient` in the round, by sender."""

    # -- artifacts -------------------------------------------------------------------------

    @abstractmethod
    def add_artifacts(self, run_id: str, artifacts: Sequence[ArtifactRecord]) -> None:
        """Record blobs of a run. Visibility only widens: a digest once visible to clients
        stays so, and becomes so when it is added again as visible."""

    @abstractmethod
    def artifact_visible(self, run_id: str, digest: str) -> bool:
        """Whether the run's clients may download this digest."""

    # -- builds ----------------------------------------------------------------------------

    @abstractmethod
    def upsert_builds(self, builds: Sequence[BuildRecord], artifacts: Sequence[ArtifactRecord] = ()) -> None:
        """Store builds (replacing one of the same run, round, name and owner) with their files'
        artifacts, in one transaction."""

    @abstractmethod
    def list_builds(self, run_id: str, client_id: str | None = None) -> list[BuildRecord]:
        """By round then name. With `client_id`: the server's builds and that client's own
        only; without: every build of the run."""

    # -- transfers -------------------------------------------------------------------------

    @abstractmethod
    def record_transfer(self, run_id: str, client_id: str, direction: Direction, nbytes: int) -> None:
        """Count bytes against the run's current round (against no round once it is over)."""

    @abstractmethod
    def transfer_totals(self, run_id: str, number: int) -> list[TransferTotal]:
        """Bytes per client and direction in round `number`."""

    # -- operations ------------------------------------------------------------------------

    @abstractmethod
    def counts(self) -> StateCounts: ...

    def close(self) -> None:
        """Release connections; the state is not used afterwards."""
        return None
