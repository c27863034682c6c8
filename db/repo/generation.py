"""Generations (the Playground): queued -> running -> succeeded / failed, one row per request.

A generation is leased like a job (``db.repo.job``): the worker that starts it holds a lease it
renews; if it dies, the lease expires and the reaper puts the generation back in the queue, or
fails it once ``max_attempts`` starts were taken. Its final write is fenced by the lease.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, exists, func, or_, select
from sqlalchemy.orm import Session, aliased

from db.models import Generation, Job, utcnow
from db.repo._session import (
    Lease,
    SessionLike,
    cas_row,
    claim_values,
    holds,
    load_job,
    one_line,
    scope,
)

DEFAULT_TTL_S = 600.0  # a lease for callers that do not say (a generation takes seconds)


def create_generation(
    s: SessionLike,
    *,
    job_id: str,
    owner: str,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    max_attempts: int = 3,
) -> Generation:
    """Insert a queued generation for ``job_id`` and commit it (before the task is sent).

    Raises LookupError if the job does not exist or belongs to another owner; the input
    limits are checked by ``worker.submit.submit_generation``.
    """
    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    with scope(s) as session:
        job = load_job(session, job_id)
        if job is None or job.owner != owner:
            session.rollback()
            raise LookupError(f"no job {job_id!r}")
        gen = Generation(
            job_id=job_id,
            owner=owner,
            prompt=prompt,
            max_new_tokens=int(max_new_tokens),
            temperature=float(temperature),
            max_attempts=max_attempts,
        )
        session.add(gen)
        session.commit()
        return gen


def _load_generation(s: Session, gen_id: str) -> Generation | None:
    return s.execute(
        select(Generation).where(Generation.id == gen_id).execution_options(populate_existing=True)
    ).scalar_one_or_none()


def get_generation(s: SessionLike, *, gen_id: str, owner: str | None = None) -> Generation | None:
    """The generation, or None if it does not exist or belongs to another owner (when given)."""
    with scope(s) as session:
        gen = _load_generation(session, gen_id)
        if gen is None or (owner is not None and gen.owner != owner):
            return None
        return gen


def _cas_generation(s: Session, gen_id: str, where: ColumnElement[bool], **values: Any) -> bool:
    values.setdefault("updated_at", utcnow())
    return cas_row(s, Generation, gen_id, where, **values)


def _give_up(gen: Generation, now: datetime) -> dict[str, Any]:
    return {
        "status": "failed",
        "finished_at": now,
        "lease_expires_at": None,
        "error_message": f"the worker was lost {gen.attempt} times; gave up",
    }


def start_generation(
    s: SessionLike,
    *,
    gen_id: str,
    worker_id: str = "local",
    ttl_s: float = DEFAULT_TTL_S,
    now: datetime | None = None,
) -> Generation | None:
    """Take the lease and start an attempt: the generation, or None (a duplicate delivery while
    a live lease holds it, already done, or out of attempts: then it becomes failed).

    Claimable: queued, or running with an expired lease (its worker died).
    """
    now = now or utcnow()
    claimable = or_(
        Generation.status == "queued",
        and_(Generation.status == "running", Generation.lease_expires_at < now),
    )
    with scope(s) as session:
        gen = _load_generation(session, gen_id)
        if gen is None or gen.terminal:
            return None
        seen = and_(claimable, Generation.attempt == gen.attempt)
        if gen.attempt >= gen.max_attempts:
            _cas_generation(session, gen_id, seen, **_give_up(gen, now))
            return None
        won = _cas_generation(
            session,
            gen_id,
            seen,
            **claim_values(Generation, gen, worker_id=worker_id, ttl_s=ttl_s, now=now),
        )
        return _load_generation(session, gen_id) if won else None


def heartbeat_generation(
    s: SessionLike, *, gen_id: str, lease: Lease, ttl_s: float, now: datetime | None = None
) -> bool:
    """Extend the lease of a running generation; False: it is no longer ours, stop."""
    now = now or utcnow()
    with scope(s) as session:
        return _cas_generation(
            session,
            gen_id,
            holds(Generation, lease),
            lease_expires_at=now + timedelta(seconds=ttl_s),
            heartbeat_at=now,
        )


def finish_generation(
    s: SessionLike,
    *,
    gen_id: str,
    status: str,
    output: str | None = None,
    error_message: str | None = None,
    lease: Lease | None = None,
) -> bool:
    """running -> succeeded (with ``output``) or failed (with a one-line ``error_message``);
    also queued -> failed (a generation refused before it started). False if refused.

    ``lease``: the worker's fencing token; then only that running attempt may finish it.
    """
    if status not in ("succeeded", "failed"):
        raise ValueError(f"finish_generation needs succeeded or failed, got {status!r}")
    allowed = ("running",) if status == "succeeded" else ("queued", "running")
    where = Generation.status.in_(allowed) if lease is None else holds(Generation, lease)
    with scope(s) as session:
        return _cas_generation(
            session,
            gen_id,
            where,
            status=status,
            output=output if status == "succeeded" else None,
            error_message=one_line(error_message) if status == "failed" else None,
            finished_at=utcnow(),
            lease_expires_at=None,
        )


def reap_generations(s: SessionLike, *, now: datetime | None = None) -> list[str]:
    """Running generations whose lease expired: back to queued (returned, to be re-sent), or
    failed once their attempts are used up."""
    now = now or utcnow()
    expired = and_(Generation.status == "running", Generation.lease_expires_at < now)
    requeued: list[str] = []
    with scope(s) as session:
        stale = list(
            session.scalars(
                select(Generation).where(expired).execution_options(populate_existing=True)
            )
        )
        session.rollback()
        for gen in stale:
            seen = and_(expired, Generation.attempt == gen.attempt)
            if gen.attempt >= gen.max_attempts:
                _cas_generation(session, gen.id, seen, **_give_up(gen, now))
            elif _cas_generation(
                session, gen.id, seen, status="queued", lease_expires_at=None, sent_at=None
            ):
                requeued.append(gen.id)
    return requeued


def mark_generation_sent(s: SessionLike, *, gen_id: str, now: datetime | None = None) -> bool:
    """Record that a broker message for the queued generation was just sent."""
    with scope(s) as session:
        return _cas_generation(
            session, gen_id, Generation.status == "queued", sent_at=now or utcnow()
        )


def unsent_generations(s: SessionLike, *, grace_s: float, now: datetime | None = None) -> list[str]:
    """Queued generations with no live broker message as far as the DB can tell, for longer
    than ``grace_s`` (the rule of ``db.repo.job.unsent_jobs``; "nothing runs" is checked over
    all jobs and generations, since a generation's queue is its job's)."""
    now = now or utcnow()
    before = now - timedelta(seconds=grace_s)
    other = aliased(Generation)
    busy = or_(
        exists().where(Job.status == "running", Job.lease_expires_at >= now),
        exists().where(other.status == "running", other.lease_expires_at >= now),
    )
    stmt = (
        select(Generation.id)
        .where(
            Generation.status == "queued",
            func.coalesce(Generation.updated_at, Generation.created_at) < before,
            or_(Generation.sent_at.is_(None), and_(Generation.sent_at < before, ~busy)),
        )
        .order_by(Generation.created_at, Generation.id)
    )
    with scope(s) as session:
        ids = list(session.scalars(stmt))
        session.rollback()
        return ids
