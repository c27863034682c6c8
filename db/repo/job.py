"""Jobs: create, list, claim (lease), heartbeat, finish, cancel and reap.

Every function is keyword-only after the first argument, a ``Session`` or a ``sessionmaker``.
Functions that change state commit before they return, so each is one atomic unit; pass a
dedicated session, not one holding other pending work. State transitions are conditional
UPDATEs (compare-and-set), so two workers, the reaper and a cancel can race without a lock
manager: exactly one wins, and terminal statuses (succeeded, failed, cancelled) never change.
A worker's own writes are fenced by its lease (owner + attempt, see ``_session.Lease``).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, or_, select

from db.models import ACTIVE_STATUSES, TERMINAL_STATUSES, Job, utcnow
from db.repo._session import (
    Lease,
    SessionLike,
    cas_job,
    claim_values,
    holds,
    load_job,
    one_line,
    scope,
)


def _ours(worker_id: str, attempt: int | None) -> ColumnElement[bool]:
    """Running under ``worker_id`` (and that very ``attempt`` when given: the fencing token)."""
    if attempt is None:
        return and_(Job.status == "running", Job.lease_owner == worker_id)
    return holds(Job, Lease(worker_id, attempt))


class ActiveLimit(RuntimeError):
    """The owner already has ``active`` queued + running jobs, at most ``limit`` allowed."""

    def __init__(self, active: int, limit: int) -> None:
        super().__init__(f"{active} active jobs, at most {limit}")
        self.active, self.limit = active, limit


def active_jobs(s: SessionLike, *, owner: str) -> int:
    """How many of ``owner``'s jobs are queued or running."""
    stmt = (
        select(func.count())
        .select_from(Job)
        .where(Job.owner == owner, Job.status.in_(sorted(ACTIVE_STATUSES)))
    )
    with scope(s) as session:
        return int(session.scalar(stmt) or 0)


def create_job(
    s: SessionLike,
    *,
    config: dict[str, Any],
    owner: str = "local",
    name: str = "",
    queue: str = "gpu",
    max_attempts: int = 3,
    job_id: str | None = None,
    max_active: int | None = None,
) -> Job:
    """Insert a queued job and commit it (before anything is enqueued on the broker).

    ``max_active``: count ``owner``'s queued + running jobs and insert in one transaction,
    serialised per owner (SQLite: every write transaction is ``BEGIN IMMEDIATE``; PostgreSQL: a
    transaction-scoped advisory lock on the owner), so concurrent submissions cannot both pass
    the cap; ``ActiveLimit`` (nothing inserted) when the owner is at it.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    with scope(s) as session:
        if max_active:
            if session.get_bind().dialect.name == "postgresql":
                session.execute(select(func.pg_advisory_xact_lock(func.hashtext(owner))))
            active = active_jobs(session, owner=owner)
            if active >= max_active:
                session.rollback()
                raise ActiveLimit(active, max_active)
        job = Job(config=config, owner=owner, name=name, queue=queue, max_attempts=max_attempts)
        if job_id is not None:
            job.id = job_id
        session.add(job)
        session.commit()
        return job


def get_job(s: SessionLike, *, job_id: str, owner: str | None = None) -> Job | None:
    """The job, or None if it does not exist or belongs to another owner (when given)."""
    with scope(s) as session:
        job = load_job(session, job_id)
        if job is None or (owner is not None and job.owner != owner):
            return None
        return job


def list_jobs(
    s: SessionLike, *, owner: str | None = None, status: str | None = None, limit: int = 100
) -> list[Job]:
    """Newest first, optionally for one owner and/or status."""
    stmt = select(Job).order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    if owner is not None:
        stmt = stmt.where(Job.owner == owner)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    with scope(s) as session:
        return list(session.scalars(stmt.execution_options(populate_existing=True)))


def queue_position(s: SessionLike, *, job_id: str) -> int | None:
    """1-based position among queued jobs of the same queue (oldest first); None if not queued."""
    with scope(s) as session:
        job = load_job(session, job_id)
        if job is None or job.status != "queued":
            return None
        ahead = session.scalar(
            select(func.count())
            .select_from(Job)
            .where(
                Job.status == "queued",
                Job.queue == job.queue,
                or_(
                    Job.created_at < job.created_at,
                    and_(Job.created_at == job.created_at, Job.id < job.id),
                ),
            )
        )
        return int(ahead or 0) + 1


def claim_job(
    s: SessionLike, *, job_id: str, worker_id: str, ttl_s: float, now: datetime | None = None
) -> Job | None:
    """Take the lease and start an attempt, or return None.

    Claimable: queued, or running with an expired lease (its worker died). Not claimable: a
    live lease held by anyone, a terminal job, a job whose cancel was requested (it becomes
    cancelled), or one whose attempts are used up (it becomes failed/'max_attempts').
    """
    now = now or utcnow()
    claimable = or_(
        Job.status == "queued", and_(Job.status == "running", Job.lease_expires_at < now)
    )
    with scope(s) as session:
        job = load_job(session, job_id)
        if job is None or job.terminal:
            return None
        if job.status == "running" and job.lease_expires_at and job.lease_expires_at >= now:
            return None
        seen = and_(claimable, Job.attempt == job.attempt)
        if job.cancel_requested_at is not None:
            cas_job(
                session, job_id, seen, status="cancelled", finished_at=now, lease_expires_at=None
            )
            return None
        if job.attempt >= job.max_attempts:
            cas_job(
                session,
                job_id,
                seen,
                status="failed",
                finished_at=now,
                lease_expires_at=None,
                error_code="max_attempts",
                error_message=f"gave up after {job.attempt} attempts",
            )
            return None
        won = cas_job(
            session,
            job_id,
            and_(seen, Job.cancel_requested_at.is_(None)),
            **claim_values(Job, job, worker_id=worker_id, ttl_s=ttl_s, now=now),
        )
        return load_job(session, job_id) if won else None


def heartbeat(
    s: SessionLike,
    *,
    job_id: str,
    worker_id: str,
    ttl_s: float,
    attempt: int | None = None,
    now: datetime | None = None,
) -> bool:
    """Extend our lease. False means the lease is no longer ours: the worker must stop.

    A worker passes its ``attempt`` (a later attempt of the same ``host:pid`` is not ours);
    ``None`` checks the owner only. Renewing a lease that expired but was not taken over yet
    is allowed: a takeover changes status or attempt in one compare-and-set, so either the
    renewal or the takeover wins, never both.
    """
    now = now or utcnow()
    with scope(s) as session:
        return cas_job(
            session,
            job_id,
            _ours(worker_id, attempt),
            lease_expires_at=now + timedelta(seconds=ttl_s),
            heartbeat_at=now,
        )


def finish_job(
    s: SessionLike,
    *,
    job_id: str,
    worker_id: str,
    status: str,
    attempt: int | None = None,
    error_code: str | None = None,
    error_message: str | None = None,
) -> bool:
    """Move a running job we hold the lease of (``attempt`` too, when given: a worker always
    gives it) to a terminal status. False if refused: the lease is stale."""
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"finish_job needs a terminal status, got {status!r}")
    now = utcnow()
    with scope(s) as session:
        return cas_job(
            session,
            job_id,
            _ours(worker_id, attempt),
            status=status,
            finished_at=now,
            lease_expires_at=None,
            eta_seconds=0.0 if status == "succeeded" else None,
            error_code=error_code,
            error_message=one_line(error_message),
        )


def request_cancel(s: SessionLike, *, job_id: str, owner: str | None = None) -> str | None:
    """Cancel a job; returns its resulting status, or None if not found / not owned.

    queued -> cancelled at once; running -> cancel_requested_at is set and the worker stops
    cooperatively (see :func:`cancel_requested`); terminal -> unchanged.
    """
    with scope(s) as session:
        for _ in range(3):  # a lost race re-reads the new status; bounded
            job = load_job(session, job_id)
            if job is None or (owner is not None and job.owner != owner):
                session.rollback()
                return None
            if job.terminal:
                session.rollback()
                return job.status
            now = utcnow()
            if job.status == "queued":
                if cas_job(
                    session,
                    job_id,
                    Job.status == "queued",
                    status="cancelled",
                    cancel_requested_at=now,
                    finished_at=now,
                ):
                    return "cancelled"
            elif job.cancel_requested_at is not None or cas_job(
                session, job_id, Job.status == "running", cancel_requested_at=now
            ):
                session.rollback()
                return "running"
        job = load_job(session, job_id)
        session.rollback()
        return job.status if job else None


def cancel_requested(s: SessionLike, *, job_id: str) -> bool:
    """True once a cancel was requested (or the job is already cancelled)."""
    with scope(s) as session:
        row = session.execute(
            select(Job.status, Job.cancel_requested_at).where(Job.id == job_id)
        ).one_or_none()
        session.rollback()
        return row is not None and (
            row.status == "cancelled" or row.cancel_requested_at is not None
        )


def reap_orphans(s: SessionLike, *, now: datetime | None = None) -> list[str]:
    """Recover running jobs whose lease expired; returns the ids put back in the queue.

    A job with a pending cancel becomes cancelled; one that used all attempts becomes
    failed('max_attempts'); the others return to queued for re-enqueueing.
    """
    now = now or utcnow()
    expired = and_(Job.status == "running", Job.lease_expires_at < now)
    requeued: list[str] = []
    with scope(s) as session:
        stale = session.execute(
            select(Job.id, Job.attempt, Job.max_attempts, Job.cancel_requested_at).where(expired)
        ).all()
        session.rollback()
        for row in stale:
            seen = and_(expired, Job.attempt == row.attempt)
            if row.cancel_requested_at is not None:
                cas_job(
                    session,
                    row.id,
                    seen,
                    status="cancelled",
                    finished_at=now,
                    lease_expires_at=None,
                )
            elif row.attempt >= row.max_attempts:
                cas_job(
                    session,
                    row.id,
                    seen,
                    status="failed",
                    finished_at=now,
                    lease_expires_at=None,
                    error_code="max_attempts",
                    error_message=f"worker lost {row.attempt} times; gave up",
                )
            elif cas_job(
                session, row.id, seen, status="queued", lease_expires_at=None, sent_at=None
            ):
                requeued.append(row.id)
    return requeued


def set_checkpoint(s: SessionLike, *, job_id: str, step: int, lease: Lease | None = None) -> bool:
    """Record the latest complete checkpoint step (the filesystem stays authoritative).

    With ``lease`` (a worker's write) only while that attempt runs; False if refused.
    """
    where = Job.id == job_id if lease is None else holds(Job, lease)
    with scope(s) as session:
        return cas_job(session, job_id, where, last_checkpoint_step=step)
