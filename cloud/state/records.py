"""Plain records the state interface takes and returns (ARCHITECTURE.md, "State interface").

They are frozen: a record is what the state held when it was read, never a live row, so no
caller can change the state except through `CoordinatorState`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from common.protocol import RoundState, RunState


@dataclass(frozen=True)
class NewRun:
    """What creating a run needs; the state adds round 1 and the timestamps."""

    id: str
    name: str
    algorithm: str
    spec: dict[str, Any]
    enroll_token_hash: str


@dataclass(frozen=True)
class RunRecord:
    id: str
    name: str
    algorithm: str
    spec: dict[str, Any]
    state: RunState
    current_round: int
    enroll_token_hash: str
    # name -> digest of what the run holds after its last round (set when it finishes).
    artifacts: dict[str, str]
    metrics: dict[str, Any]
    error: str | None
    created_at: datetime


@dataclass(frozen=True)
class RoundRecord:
    run_id: str
    number: int
    state: RoundState
    # name -> digest of what clients (and the server) start this round from.
    inputs: dict[str, str]
    aggregate_digest: str | None
    # name -> digest the server step produced: the next round's inputs.
    outputs: dict[str, str] | None
    metrics: dict[str, Any]
    error: str | None
    opened_at: datetime | None
    collecting_at: datetime | None
    deadline_at: datetime | None
    closed_at: datetime | None
    lease_owner: str | None
    lease_until: datetime | None


@dataclass(frozen=True)
class RoundEventRecord:
    """An audit line: which coordinator instance started a round's slow step, and when."""

    step: str
    instance: str
    at: datetime


@dataclass(frozen=True)
class ClientRecord:
    id: str
    run_id: str
    name: str
    token_hash: str
    profile: dict[str, Any] = field(default_factory=dict)
    revoked: bool = False
    # Set by the state when read: when the client enrolled and last called (to within 30 s).
    # Not part of equality: the same client read twice is the same client.
    enrolled_at: datetime | None = field(default=None, compare=False)
    last_seen: datetime | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ClientListing:
    """A client of a run with how many updates it has had accepted, for the admin's device list."""

    client: ClientRecord
    updates_sent: int


@dataclass(frozen=True)
class UpdateRecord:
    run_id: str
    round: int
    client_id: str
    sha256: str
    size: int
    num_samples: int
    metrics: dict[str, Any] = field(default_factory=dict)


class UpdateOutcome(str, enum.Enum):
    accepted = "accepted"
    # The same bytes from the same client were accepted before: nothing changed.
    duplicate = "duplicate"
    # Other bytes from this client are already in the round: refused.
    conflict = "conflict"
    # The round (or the run) stopped taking updates before this one committed.
    closed = "closed"
    # Secure aggregation: a public key that was advertised before (in any round): refused.
    reused = "reused"


@dataclass(frozen=True)
class UpdateInsert:
    outcome: UpdateOutcome
    # The update now in the round for this client (the earlier one unless accepted); None if closed.
    update: UpdateRecord | None


@dataclass(frozen=True)
class SecaggMessage:
    """A device's message in one phase of a secure-aggregation round (ARCHITECTURE.md, "Secure
    aggregation"): its checked body as JSON, and that body's digest (a resend of the same body is
    a duplicate, another body a conflict)."""

    run_id: str
    round: int
    client_id: str
    phase: str  # "keys" | "shares" | "reveal"
    body: dict[str, Any]
    digest: str


@dataclass(frozen=True)
class SecaggShare:
    """One encrypted share a device dealt to a neighbour, routed by the coordinator, with the
    commitments a revealed share is checked against."""

    sender: str
    recipient: str
    ciphertext: str  # base64
    seed_commitment: str
    key_commitment: str


@dataclass(frozen=True)
class ArtifactRecord:
    """A blob a run refers to; `client_visible` decides whether its devices may download it."""

    sha256: str
    size: int
    client_visible: bool


@dataclass(frozen=True)
class BuildRecord:
    """An edge build: the server's (client_id None) or one a device made of its own SLM."""

    run_id: str
    round: int
    name: str
    manifest: dict[str, Any]
    client_id: str | None = None


class Direction(str, enum.Enum):
    up = "up"
    down = "down"


@dataclass(frozen=True)
class TransferTotal:
    """Bytes one client moved in one direction during one round."""

    client_id: str
    direction: Direction
    bytes: int


@dataclass(frozen=True)
class StateCounts:
    """What /metrics reports."""

    runs_by_state: dict[str, int]
    clients: int
    updates: int
