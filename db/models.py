"""Typed SQLAlchemy 2.0 models: jobs and what a run reports (metrics, evals, shapes, events,
artifacts), and the Playground's generations from a finished job's export. Timestamps are
timezone-aware UTC on every backend (see :class:`UTCDateTime`)."""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Dialect,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import DateTime, TypeDecorator

from db import snapshot

JOB_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled"})
ACTIVE_STATUSES = frozenset({"queued", "running"})
SNAPSHOT_KINDS = snapshot.SNAPSHOT_KINDS  # one definition, beside the event -> snapshot rule
ARTIFACT_KINDS = ("export", "checkpoint", "events", "gguf")
GENERATION_STATUSES = ("queued", "running", "succeeded", "failed")

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(timezone.utc)


def new_id() -> str:
    """A new job id: 32 lowercase hex characters."""
    return uuid.uuid4().hex


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class UTCDateTime(TypeDecorator[datetime]):
    """``timestamptz`` on PostgreSQL; naive UTC text on SQLite. Always aware UTC in Python."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            value = value.replace(tzinfo=timezone.utc)
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON()}


class Job(Base):
    """One pruning-aware pretraining run and its lease. Terminal statuses are absorbing."""

    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint(_in("status", JOB_STATUSES), name="status"),
        Index(None, "owner", "created_at"),
        Index(None, "status", "queue", "created_at"),
        Index(None, "status", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    owner: Mapped[str] = mapped_column(String(128), default="local")
    name: Mapped[str] = mapped_column(String(256), default="")
    status: Mapped[str] = mapped_column(String(16), default="queued")
    phase: Mapped[str | None] = mapped_column(String(32))
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    """The full run config dict."""
    queue: Mapped[str] = mapped_column(String(64), default="gpu")
    celery_task_id: Mapped[str | None] = mapped_column(String(64))
    sent_at: Mapped[datetime | None]
    """When the broker message of the current queued spell was sent; NULL: none was sent since
    the job (re)entered the queue (the send failed or has not happened yet). The reaper
    re-sends such jobs after a grace period (``db.repo.unsent_jobs``)."""

    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    attempt: Mapped[int] = mapped_column(Integer, default=0)
    """Starts taken so far (0 before the first claim). With ``lease_owner`` it is the fencing
    token: every write of a running attempt names both, and a stale one is refused."""
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(256))
    """``host:pid`` of the worker that holds (or last held) the lease."""
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    cancel_requested_at: Mapped[datetime | None]
    error_code: Mapped[str | None] = mapped_column(String(64))
    error_message: Mapped[str | None] = mapped_column(Text)
    """One line for the user; never a traceback."""
    last_checkpoint_step: Mapped[int | None] = mapped_column(Integer)
    resumed_from_step: Mapped[int | None] = mapped_column(Integer)

    # progress for the job list
    step: Mapped[int] = mapped_column(Integer, default=0)
    total_steps: Mapped[int | None] = mapped_column(Integer)
    params: Mapped[int | None] = mapped_column(BigInteger)
    budget: Mapped[int | None] = mapped_column(BigInteger)
    source_params: Mapped[int | None] = mapped_column(BigInteger)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    eta_seconds: Mapped[float | None] = mapped_column(Float)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL_STATUSES

    def __repr__(self) -> str:
        return f"Job(id={self.id!r}, status={self.status!r}, attempt={self.attempt})"


def _job_fk() -> Mapped[str]:
    return mapped_column(String(32), ForeignKey("jobs.id", ondelete="CASCADE"))


class MetricPoint(Base):
    """One training step; a resumed attempt re-reporting a step overwrites it."""

    __tablename__ = "metric_points"
    __table_args__ = (UniqueConstraint("job_id", "step"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = _job_fk()
    step: Mapped[int] = mapped_column(Integer)
    phase: Mapped[str | None] = mapped_column(String(32))
    loss: Mapped[float | None] = mapped_column(Float)
    lr: Mapped[float | None] = mapped_column(Float)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    tokens_per_s: Mapped[float | None] = mapped_column(Float)
    params: Mapped[int | None] = mapped_column(BigInteger)
    target_params: Mapped[int | None] = mapped_column(BigInteger)
    time: Mapped[float | None] = mapped_column(Float)
    """Unix time the step finished (from the event)."""


class EvalPoint(Base):
    """A held-out evaluation; unique per (job, step, label, protocol)."""

    __tablename__ = "eval_points"
    __table_args__ = (UniqueConstraint("job_id", "step", "label", "protocol"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = _job_fk()
    step: Mapped[int] = mapped_column(Integer)
    label: Mapped[str] = mapped_column(String(32))
    ppl: Mapped[float | None] = mapped_column(Float)
    loss: Mapped[float | None] = mapped_column(Float)
    protocol: Mapped[str] = mapped_column(String(64), default="")
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)


class ArchSnapshot(Base):
    """The per-layer shape at one moment: the source, after a pruning event, or final."""

    __tablename__ = "arch_snapshots"
    __table_args__ = (
        CheckConstraint(_in("kind", SNAPSHOT_KINDS), name="kind"),
        UniqueConstraint("job_id", "seq"),
        UniqueConstraint("job_id", "kind", "step"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = _job_fk()
    seq: Mapped[int] = mapped_column(Integer)
    step: Mapped[int] = mapped_column(Integer)
    tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    params: Mapped[int | None] = mapped_column(BigInteger)
    kind: Mapped[str] = mapped_column(String(16))
    shape: Mapped[dict[str, Any]] = mapped_column(JSON)
    """ModelShape.to_dict(): hidden_size, head_dim, vocab_size, layers[...]."""
    removed: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    saliency: Mapped[dict[str, Any] | None] = mapped_column(JSON)


class Event(Base):
    """The raw event log; the UI polls it with ``seq > cursor``."""

    __tablename__ = "events"
    __table_args__ = (UniqueConstraint("job_id", "seq"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = _job_fk()
    seq: Mapped[int] = mapped_column(Integer)
    type: Mapped[str] = mapped_column(String(32))
    step: Mapped[int] = mapped_column(Integer, default=0)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)


class Artifact(Base):
    """A file a job produced; ``path`` is relative to the server's artifacts root."""

    __tablename__ = "artifacts"
    __table_args__ = (
        CheckConstraint(_in("kind", ARTIFACT_KINDS), name="kind"),
        UniqueConstraint("job_id", "kind", "path"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = _job_fk()
    kind: Mapped[str] = mapped_column(String(16))
    path: Mapped[str] = mapped_column(String(1024))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Generation(Base):
    """One Playground request: text generated on the worker from a succeeded job's export."""

    __tablename__ = "generations"
    __table_args__ = (
        CheckConstraint(_in("status", GENERATION_STATUSES), name="status"),
        Index(None, "owner", "created_at"),
        Index(None, "status", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    job_id: Mapped[str] = _job_fk()
    owner: Mapped[str] = mapped_column(String(128), default="local")
    prompt: Mapped[str] = mapped_column(Text)
    max_new_tokens: Mapped[int] = mapped_column(Integer)
    temperature: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16), default="queued")
    output: Mapped[str | None] = mapped_column(Text)
    """The decoded continuation (the prompt not included)."""
    error_message: Mapped[str | None] = mapped_column(Text)
    """One line for the user; never a traceback."""
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    updated_at: Mapped[datetime | None] = mapped_column(default=utcnow, onupdate=utcnow)

    # the same lease as a job's (a worker that dies mid-generation is reaped, not left running)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(256))
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None]
    sent_at: Mapped[datetime | None]
    """As ``Job.sent_at``: NULL while no broker message was sent for the current queued spell."""

    @property
    def terminal(self) -> bool:
        return self.status in ("succeeded", "failed")

    def __repr__(self) -> str:
        return f"Generation(id={self.id!r}, job_id={self.job_id!r}, status={self.status!r})"
