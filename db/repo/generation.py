"""Generations (the Playground): queued -> running -> succeeded / failed, one row per request."""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from db.models import Generation, utcnow
from db.repo._session import SessionLike, cas_row, load_job, one_line, scope


def create_generation(
    s: SessionLike,
    *,
    job_id: str,
    owner: str,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
) -> Generation:
    """Insert a queued generation for ``job_id`` and commit it (before the task is sent).

    Raises LookupError if the job does not exist or belongs to another owner; the input
    limits are checked by ``worker.submit.submit_generation``.
    """
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
    return cas_row(s, Generation, gen_id, where, **values)


def start_generation(s: SessionLike, *, gen_id: str) -> Generation | None:
    """queued -> running; the generation, or None (a duplicate delivery, or already done)."""
    with scope(s) as session:
        if not _cas_generation(session, gen_id, Generation.status == "queued", status="running"):
            return None
        return _load_generation(session, gen_id)


def finish_generation(
    s: SessionLike,
    *,
    gen_id: str,
    status: str,
    output: str | None = None,
    error_message: str | None = None,
) -> bool:
    """running -> succeeded (with ``output``) or failed (with a one-line ``error_message``);
    also queued -> failed (a generation refused before it started). False if refused."""
    if status not in ("succeeded", "failed"):
        raise ValueError(f"finish_generation needs succeeded or failed, got {status!r}")
    allowed = ("running",) if status == "succeeded" else ("queued", "running")
    with scope(s) as session:
        return _cas_generation(
            session,
            gen_id,
            Generation.status.in_(allowed),
            status=status,
            output=output if status == "succeeded" else None,
            error_message=one_line(error_message) if status == "failed" else None,
            finished_at=utcnow(),
        )
