"""The doorbell's bookkeeping: when a queued job's broker message was sent, and which queued
jobs have no live message (the reaper sends those again; see :func:`unsent_jobs`)."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, exists, or_, select
from sqlalchemy.orm import aliased

from db.models import Job, utcnow
from db.repo._session import SessionLike, cas_job, scope


def set_celery_task_id(s: SessionLike, *, job_id: str, task_id: str) -> None:
    """Remember the broker's task id (for inspection only; the DB decides what runs)."""
    with scope(s) as session:
        cas_job(session, job_id, Job.id == job_id, celery_task_id=task_id)


def mark_sent(
    s: SessionLike, *, job_id: str, task_id: str | None = None, now: datetime | None = None
) -> bool:
    """Record that a broker message for the queued job was just sent (and its task id)."""
    values: dict[str, Any] = {"sent_at": now or utcnow()}
    if task_id is not None:
        values["celery_task_id"] = task_id
    with scope(s) as session:
        return cas_job(session, job_id, Job.status == "queued", **values)


def unsent_jobs(s: SessionLike, *, grace_s: float, now: datetime | None = None) -> list[str]:
    """Queued jobs that have no live broker message, as far as the DB can tell; oldest first.

    Two cases, each only once ``grace_s`` passed (a submit in progress commits the row, then
    sends): no message was sent since the job (re)entered the queue (the send or the reaper's
    re-send failed); or one was sent more than ``grace_s`` ago while nothing runs on its queue,
    so an idle worker would have taken it had it arrived (lost by the broker, or acked by a
    delivery that failed before its claim). A wrong guess costs a duplicate message, which is
    a no-op; a wrong "live" guess would leave the job queued forever.
    """
    now = now or utcnow()
    before = now - timedelta(seconds=grace_s)
    other = aliased(Job)
    busy = exists().where(
        other.queue == Job.queue, other.status == "running", other.lease_expires_at >= now
    )
    stmt = (
        select(Job.id)
        .where(
            Job.status == "queued",
            Job.cancel_requested_at.is_(None),
            Job.updated_at < before,
            or_(Job.sent_at.is_(None), and_(Job.sent_at < before, ~busy)),
        )
        .order_by(Job.created_at, Job.id)
    )
    with scope(s) as session:
        ids = list(session.scalars(stmt))
        session.rollback()
        return ids
