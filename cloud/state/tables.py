"""The coordinator's tables (SQLAlchemy 2): runs, rounds, round events, clients, updates,
secure-aggregation messages, artifacts, builds and transfers. Only cloud/state/sql.py uses them (ARCHITECTURE.md,
"State interface"); everything else sees the records of records.py.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class Run(Base):
    __tablename__ = "runs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(128), unique=True)
    algorithm: Mapped[str] = mapped_column(String(32))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    state: Mapped[str] = mapped_column(String(16), default="running")
    current_round: Mapped[int] = mapped_column(Integer, default=1)
    enroll_token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # name -> digest of what the run holds after its last closed round (all roles).
    artifacts: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Round(Base):
    __tablename__ = "rounds"
    __table_args__ = (UniqueConstraint("run_id", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    number: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(String(16), default="open")
    # name -> digest of what clients (and the server) start this round from.
    inputs: Mapped[dict[str, Any]] = mapped_column(JSON)
    aggregate_digest: Mapped[str | None] = mapped_column(String(64), nullable=True)
    # name -> digest produced by the server step: the next round's inputs.
    outputs: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    opened_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    collecting_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    deadline_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    closed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    # Which coordinator replica is doing this round's slow step, and until when it may.
    lease_owner: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class RoundEvent(Base):
    """An audit line per slow step started: which replica aggregated or ran a server step."""

    __tablename__ = "round_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    step: Mapped[str] = mapped_column(String(16))
    instance: Mapped[str] = mapped_column(String(128))
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Client(Base):
    __tablename__ = "clients"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    name: Mapped[str] = mapped_column(String(128))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    profile: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # When the device last called the coordinator, written at most every LAST_SEEN_EVERY_S.
    last_seen: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Update(Base):
    __tablename__ = "updates"
    __table_args__ = (UniqueConstraint("round_id", "client_id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("clients.id"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(BigInteger)
    num_samples: Mapped[int] = mapped_column(Integer)
    metrics: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SecaggMessageRow(Base):
    """A device's message in one phase of a secure-aggregation round (keys, shares, reveal)."""

    __tablename__ = "secagg_messages"
    __table_args__ = (UniqueConstraint("round_id", "client_id", "phase"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("clients.id"), index=True)
    phase: Mapped[str] = mapped_column(String(16))
    body: Mapped[dict[str, Any]] = mapped_column(JSON)
    digest: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class SecaggShareRow(Base):
    """An encrypted share in transit from one device to a neighbour."""

    __tablename__ = "secagg_shares"
    __table_args__ = (UniqueConstraint("round_id", "sender", "recipient"),
                      Index("ix_secagg_shares_recipient", "round_id", "recipient"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"))
    sender: Mapped[str] = mapped_column(ForeignKey("clients.id"))
    recipient: Mapped[str] = mapped_column(ForeignKey("clients.id"))
    ciphertext: Mapped[str] = mapped_column(Text)
    seed_commitment: Mapped[str] = mapped_column(String(64))
    key_commitment: Mapped[str] = mapped_column(String(64))


class SecaggKeyRow(Base):
    """Every public key ever advertised, so a key (and any message made with it) cannot be
    replayed into another round."""

    __tablename__ = "secagg_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    public_key: Mapped[str] = mapped_column(String(64), unique=True)
    round_id: Mapped[int] = mapped_column(ForeignKey("rounds.id"), index=True)


class Artifact(Base):
    """A blob a run refers to; `client_visible` decides who may download it."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("run_id", "sha256"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    client_visible: Mapped[bool] = mapped_column(Boolean, default=False)


class Build(Base):
    """An edge build (GGUF / ONNX), its files stored as artifacts. `client_id` is set for a
    build a device made of its own SLM, which only that device and the admin see."""

    __tablename__ = "builds"
    __table_args__ = (
        UniqueConstraint("run_id", "round", "name", "client_id"),
        # NULLs are distinct in a unique constraint, so the server's own builds need their own index.
        Index("uq_builds_server", "run_id", "round", "name", unique=True,
              sqlite_where=text("client_id IS NULL"), postgresql_where=text("client_id IS NULL")),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    round: Mapped[int] = mapped_column(Integer)
    name: Mapped[str] = mapped_column(String(64))
    manifest: Mapped[dict[str, Any]] = mapped_column(JSON)
    client_id: Mapped[str | None] = mapped_column(ForeignKey("clients.id"), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Transfer(Base):
    """Bytes a client moved, per round, for the bytes-per-round accounting."""

    __tablename__ = "transfers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.id"), index=True)
    client_id: Mapped[str] = mapped_column(ForeignKey("clients.id"), index=True)
    # None once the run is over (the final model and its edge builds): outside any round.
    round: Mapped[int | None] = mapped_column(Integer, nullable=True)
    direction: Mapped[str] = mapped_column(String(4))  # "up" | "down"
    bytes: Mapped[int] = mapped_column(BigInteger)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
