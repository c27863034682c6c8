"""What every repository function shares: session handling, compare-and-set, the portable upsert.

A repository function takes a ``Session`` or a ``sessionmaker`` (:data:`SessionLike`);
:func:`scope` opens and closes a session for the call in the second case. State transitions are
conditional UPDATEs (:func:`cas_row`): exactly one of several racing writers wins.

Fencing: a running attempt is named by its :class:`Lease` (owner + attempt number). Every write a
worker makes for its job names it, and the write happens only while the job is still running
that very attempt (:func:`holds`, :func:`lock_leased_job`); a worker that was paused past its TTL
and replaced gets :class:`LeaseLost` instead. The owner alone would not do: two attempts can
run in one process (the same ``host:pid``), and the attempt number only ever grows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import ColumnElement, CursorResult, and_, func, literal, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from db.models import Job, UTCDateTime, utcnow

SessionLike = Session | sessionmaker[Session]
MAX_ERROR_MESSAGE = 500


@dataclass(frozen=True)
class Lease:
    """The fencing token of one running attempt: who runs it, and which attempt it is."""

    owner: str
    attempt: int

    @classmethod
    def of(cls, row: Any) -> Lease:
        """The lease a freshly claimed row (a ``Job`` or ``Generation``) grants."""
        return cls(str(row.lease_owner), int(row.attempt))


class LeaseLost(RuntimeError):
    """A write named a lease that is no longer current (the job moved on without this worker)."""


def holds(model: Any, lease: Lease) -> ColumnElement[bool]:
    """The row is running the attempt ``lease`` names (the fencing condition of every write)."""
    return and_(
        model.status == "running",
        model.lease_owner == lease.owner,
        model.attempt == lease.attempt,
    )


def claim_values(
    model: Any, row: Any, *, worker_id: str, ttl_s: float, now: datetime
) -> dict[str, Any]:
    """The column values that make ``worker_id`` the holder of ``row``'s next attempt (a ``Job``
    or ``Generation``): running, attempt + 1, a lease of ``ttl_s``, started once."""
    return {
        "status": "running",
        "attempt": row.attempt + 1,
        "lease_owner": worker_id,
        "lease_expires_at": now + timedelta(seconds=ttl_s),
        "heartbeat_at": now,
        "started_at": func.coalesce(model.started_at, literal(now, UTCDateTime())),
    }


def lock_leased_job(s: Session, job_id: str, lease: Lease | None) -> Job:
    """The job row, locked for this transaction (FOR UPDATE on PostgreSQL; SQLite's write lock
    is already held by ``BEGIN IMMEDIATE``), after checking ``lease`` when one is given.

    Raises LookupError if there is no such job, LeaseLost if ``lease`` is stale; both roll back.
    """
    job = s.execute(
        select(Job)
        .where(Job.id == job_id)
        .with_for_update()
        .execution_options(populate_existing=True)
    ).scalar_one_or_none()
    if job is None:
        s.rollback()
        raise LookupError(f"no job {job_id!r}")
    if lease is not None and not (
        job.status == "running" and job.lease_owner == lease.owner and job.attempt == lease.attempt
    ):
        state = f"{job.status}, attempt {job.attempt} of {job.lease_owner}"
        s.rollback()
        raise LeaseLost(f"job {job_id}: {lease} is stale ({state})")
    return job


@contextmanager
def scope(s: SessionLike) -> Iterator[Session]:
    """``s`` itself if it is a session, else a fresh session of the factory for this call."""
    if isinstance(s, Session):
        yield s
        return
    with s() as session:
        yield session


def cas_row(s: Session, model: Any, row_id: str, where: ColumnElement[bool], **values: Any) -> bool:
    """Compare-and-set on one row of ``model``; commits on success, rolls back otherwise."""
    result = cast(
        CursorResult[Any],
        s.execute(
            update(model)
            .where(model.id == row_id, where)
            .values(**values)
            .execution_options(synchronize_session=False)
        ),
    )
    if result.rowcount == 1:
        s.commit()
        return True
    s.rollback()
    return False


def cas_job(s: Session, job_id: str, where: ColumnElement[bool], **values: Any) -> bool:
    """Compare-and-set on one job row (stamps ``updated_at``)."""
    values.setdefault("updated_at", utcnow())
    return cas_row(s, Job, job_id, where, **values)


def load_job(s: Session, job_id: str) -> Job | None:
    """The job row as it is in the database now (not a stale identity-map copy)."""
    return s.execute(
        select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    ).scalar_one_or_none()


def next_seq(s: Session, model: type[Any], job_id: str) -> int:
    """The next per-job ``seq`` of ``model`` (1 for the first row)."""
    last = s.scalar(select(func.coalesce(func.max(model.seq), 0)).where(model.job_id == job_id))
    return int(last or 0) + 1


def one_line(message: str | None) -> str | None:
    """The first non-empty line of ``message``, at most :data:`MAX_ERROR_MESSAGE` characters."""
    if message is None:
        return None
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return text[:MAX_ERROR_MESSAGE]


def upsert(
    s: Session,
    model: type[Any],
    rows: dict[str, Any] | list[dict[str, Any]],
    *,
    keys: tuple[str, ...],
) -> None:
    """INSERT ... ON CONFLICT (keys) DO UPDATE on SQLite and PostgreSQL; the new row wins."""
    rows = [rows] if isinstance(rows, dict) else rows
    if not rows:
        return
    dialect = s.get_bind().dialect.name
    stmt: Any
    if dialect == "postgresql":
        stmt = postgresql.insert(model).values(rows)
    elif dialect == "sqlite":
        stmt = sqlite.insert(model).values(rows)
    else:  # pragma: no cover - only SQLite and PostgreSQL are supported
        raise NotImplementedError(f"upsert is not implemented for {dialect}")
    cols = [c for c in rows[0] if c not in keys]
    stmt = stmt.on_conflict_do_update(
        index_elements=list(keys), set_={c: stmt.excluded[c] for c in cols}
    )
    s.execute(stmt)


def finite(x: Any) -> float | None:
    """A float, or None for None/NaN/inf (portable across SQLite REAL and JSON)."""
    if x is None:
        return None
    x = float(x)
    return x if math.isfinite(x) else None
