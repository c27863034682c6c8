"""Repository functions: the only way the app and the worker touch job state.

Every function is keyword-only after the first argument, a ``Session`` or a ``sessionmaker``
(then a session is opened and closed for the call). Functions that change state commit before
they return, so each is one atomic unit; pass a dedicated session, not one holding other
pending work. State transitions are conditional UPDATEs (compare-and-set), so two workers,
the reaper and a cancel can race without a lock manager: exactly one wins, and terminal
statuses (succeeded, failed, cancelled) never change again.
"""

from __future__ import annotations

import math
import posixpath
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, and_, func, literal, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from db.models import (
    TERMINAL_STATUSES,
    ArchSnapshot,
    Artifact,
    EvalPoint,
    Event,
    Generation,
    Job,
    MetricPoint,
    UTCDateTime,
    utcnow,
)

SessionLike = Session | sessionmaker[Session]
MAX_ERROR_MESSAGE = 500


@contextmanager
def _session(s: SessionLike) -> Iterator[Session]:
    if isinstance(s, Session):
        yield s
        return
    with s() as session:
        yield session


def _cas_row(
    s: Session, model: Any, row_id: str, where: ColumnElement[bool], **values: Any
) -> bool:
    """Compare-and-set on one row of ``model``; commits on success, rolls back otherwise."""
    result = s.execute(
        update(model)
        .where(model.id == row_id, where)
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    if result.rowcount == 1:
        s.commit()
        return True
    s.rollback()
    return False


def _cas(s: Session, job_id: str, where: ColumnElement[bool], **values: Any) -> bool:
    """Compare-and-set on one job row (stamps ``updated_at``)."""
    values.setdefault("updated_at", utcnow())
    return _cas_row(s, Job, job_id, where, **values)


def _load(s: Session, job_id: str) -> Job | None:
    return s.execute(
        select(Job).where(Job.id == job_id).execution_options(populate_existing=True)
    ).scalar_one_or_none()


def _one_line(message: str | None) -> str | None:
    if message is None:
        return None
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    text = lines[0] if lines else ""
    return text[:MAX_ERROR_MESSAGE]


# ---- jobs ------------------------------------------------------------------------------------
def create_job(
    s: SessionLike,
    *,
    config: dict[str, Any],
    owner: str = "local",
    name: str = "",
    queue: str = "gpu",
    max_attempts: int = 3,
    job_id: str | None = None,
) -> Job:
    """Insert a queued job and commit it (before anything is enqueued on the broker)."""
    if max_attempts < 1:
        raise ValueError("max_attempts must be >= 1")
    with _session(s) as session:
        job = Job(config=config, owner=owner, name=name, queue=queue, max_attempts=max_attempts)
        if job_id is not None:
            job.id = job_id
        session.add(job)
        session.commit()
        return job


def get_job(s: SessionLike, *, job_id: str, owner: str | None = None) -> Job | None:
    """The job, or None if it does not exist or belongs to another owner (when given)."""
    with _session(s) as session:
        job = _load(session, job_id)
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
    with _session(s) as session:
        return list(session.scalars(stmt.execution_options(populate_existing=True)))


def queue_position(s: SessionLike, *, job_id: str) -> int | None:
    """1-based position among queued jobs of the same queue (oldest first); None if not queued."""
    with _session(s) as session:
        job = _load(session, job_id)
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
    with _session(s) as session:
        job = _load(session, job_id)
        if job is None or job.terminal:
            return None
        if job.status == "running" and job.lease_expires_at and job.lease_expires_at >= now:
            return None
        seen = and_(claimable, Job.attempt == job.attempt)
        if job.cancel_requested_at is not None:
            _cas(session, job_id, seen, status="cancelled", finished_at=now, lease_expires_at=None)
            return None
        if job.attempt >= job.max_attempts:
            _cas(
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
        won = _cas(
            session,
            job_id,
            and_(seen, Job.cancel_requested_at.is_(None)),
            status="running",
            attempt=job.attempt + 1,
            lease_owner=worker_id,
            lease_expires_at=now + timedelta(seconds=ttl_s),
            heartbeat_at=now,
            started_at=func.coalesce(Job.started_at, literal(now, UTCDateTime())),
        )
        return _load(session, job_id) if won else None


def heartbeat(
    s: SessionLike, *, job_id: str, worker_id: str, ttl_s: float, now: datetime | None = None
) -> bool:
    """Extend our lease. False means the lease is no longer ours: the worker must stop."""
    now = now or utcnow()
    with _session(s) as session:
        return _cas(
            session,
            job_id,
            and_(Job.status == "running", Job.lease_owner == worker_id),
            lease_expires_at=now + timedelta(seconds=ttl_s),
            heartbeat_at=now,
        )


def finish_job(
    s: SessionLike,
    *,
    job_id: str,
    worker_id: str,
    status: str,
    error_code: str | None = None,
    error_message: str | None = None,
) -> bool:
    """Move a running job we hold the lease of to a terminal status. False if refused."""
    if status not in TERMINAL_STATUSES:
        raise ValueError(f"finish_job needs a terminal status, got {status!r}")
    now = utcnow()
    with _session(s) as session:
        return _cas(
            session,
            job_id,
            and_(Job.status == "running", Job.lease_owner == worker_id),
            status=status,
            finished_at=now,
            lease_expires_at=None,
            eta_seconds=0.0 if status == "succeeded" else None,
            error_code=error_code,
            error_message=_one_line(error_message),
        )


def request_cancel(s: SessionLike, *, job_id: str, owner: str | None = None) -> str | None:
    """Cancel a job; returns its resulting status, or None if not found / not owned.

    queued -> cancelled at once; running -> cancel_requested_at is set and the worker stops
    cooperatively (see :func:`cancel_requested`); terminal -> unchanged.
    """
    with _session(s) as session:
        for _ in range(3):  # a lost race re-reads the new status; bounded
            job = _load(session, job_id)
            if job is None or (owner is not None and job.owner != owner):
                session.rollback()
                return None
            if job.terminal:
                session.rollback()
                return job.status
            now = utcnow()
            if job.status == "queued":
                if _cas(
                    session,
                    job_id,
                    Job.status == "queued",
                    status="cancelled",
                    cancel_requested_at=now,
                    finished_at=now,
                ):
                    return "cancelled"
            elif job.cancel_requested_at is not None or _cas(
                session, job_id, Job.status == "running", cancel_requested_at=now
            ):
                session.rollback()
                return "running"
        job = _load(session, job_id)
        session.rollback()
        return job.status if job else None


def cancel_requested(s: SessionLike, *, job_id: str) -> bool:
    """True once a cancel was requested (or the job is already cancelled)."""
    with _session(s) as session:
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
    with _session(s) as session:
        stale = session.execute(
            select(Job.id, Job.attempt, Job.max_attempts, Job.cancel_requested_at).where(expired)
        ).all()
        session.rollback()
        for row in stale:
            seen = and_(expired, Job.attempt == row.attempt)
            if row.cancel_requested_at is not None:
                _cas(
                    session,
                    row.id,
                    seen,
                    status="cancelled",
                    finished_at=now,
                    lease_expires_at=None,
                )
            elif row.attempt >= row.max_attempts:
                _cas(
                    session,
                    row.id,
                    seen,
                    status="failed",
                    finished_at=now,
                    lease_expires_at=None,
                    error_code="max_attempts",
                    error_message=f"worker lost {row.attempt} times; gave up",
                )
            elif _cas(session, row.id, seen, status="queued", lease_expires_at=None):
                requeued.append(row.id)
    return requeued


def set_celery_task_id(s: SessionLike, *, job_id: str, task_id: str) -> None:
    """Remember the broker's task id (for inspection only; the DB decides what runs)."""
    with _session(s) as session:
        _cas(session, job_id, Job.id == job_id, celery_task_id=task_id)


def set_checkpoint(s: SessionLike, *, job_id: str, step: int) -> None:
    """Record the latest complete checkpoint step (the filesystem stays authoritative)."""
    with _session(s) as session:
        _cas(session, job_id, Job.id == job_id, last_checkpoint_step=step)


# ---- generations (the Playground) -------------------------------------------------------------
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
    with _session(s) as session:
        job = _load(session, job_id)
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
    with _session(s) as session:
        gen = _load_generation(session, gen_id)
        if gen is None or (owner is not None and gen.owner != owner):
            return None
        return gen


def _cas_generation(s: Session, gen_id: str, where: ColumnElement[bool], **values: Any) -> bool:
    return _cas_row(s, Generation, gen_id, where, **values)


def start_generation(s: SessionLike, *, gen_id: str) -> Generation | None:
    """queued -> running; the generation, or None (a duplicate delivery, or already done)."""
    with _session(s) as session:
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
    with _session(s) as session:
        return _cas_generation(
            session,
            gen_id,
            Generation.status.in_(allowed),
            status=status,
            output=output if status == "succeeded" else None,
            error_message=_one_line(error_message) if status == "failed" else None,
            finished_at=utcnow(),
        )


# ---- artifacts -------------------------------------------------------------------------------
def _check_relative(path: str) -> str:
    norm = posixpath.normpath(path.replace("\\", "/"))
    if not path or norm.startswith(("/", "../")) or norm in ("..", ".") or "\x00" in path:
        raise ValueError(f"artifact path must be relative inside the artifacts root: {path!r}")
    return norm


def add_artifact(
    s: SessionLike, *, job_id: str, kind: str, path: str, size_bytes: int, sha256: str
) -> Artifact:
    """Record a produced file; idempotent on (job_id, kind, path) (the newest size/hash win)."""
    path = _check_relative(path)
    with _session(s) as session:
        upsert(
            session,
            Artifact,
            {
                "job_id": job_id,
                "kind": kind,
                "path": path,
                "size_bytes": size_bytes,
                "sha256": sha256,
                "created_at": utcnow(),
            },
            keys=("job_id", "kind", "path"),
        )
        session.commit()
        return session.execute(
            select(Artifact)
            .where(Artifact.job_id == job_id, Artifact.kind == kind, Artifact.path == path)
            .execution_options(populate_existing=True)
        ).scalar_one()


def artifacts(s: SessionLike, *, job_id: str, kind: str | None = None) -> list[Artifact]:
    """A job's artifacts, oldest first."""
    stmt = select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.id)
    if kind is not None:
        stmt = stmt.where(Artifact.kind == kind)
    with _session(s) as session:
        return list(session.scalars(stmt))


# ---- portable upsert -------------------------------------------------------------------------
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


# ---- run events ------------------------------------------------------------------------------
def _json_safe(x: Any) -> Any:
    """Replace non-finite floats (which PostgreSQL's JSON rejects) by None, recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _next_seq(s: Session, model: type[Any], job_id: str) -> int:
    return (
        int(
            s.scalar(select(func.coalesce(func.max(model.seq), 0)).where(model.job_id == job_id))
            or 0
        )
        + 1
    )


def _snapshot(s: Session, job_id: str, seq: int, e: dict[str, Any], kind: str, params: Any) -> bool:
    """Upsert the snapshot of ``kind`` at e['step']; True if a new row (a new seq) was used."""
    step = int(e.get("step", 0))
    existing = s.scalar(
        select(ArchSnapshot).where(
            ArchSnapshot.job_id == job_id, ArchSnapshot.kind == kind, ArchSnapshot.step == step
        )
    )
    if kind == "source" and existing is None:
        existing = s.scalar(
            select(ArchSnapshot).where(ArchSnapshot.job_id == job_id, ArchSnapshot.kind == "source")
        )
        if existing is not None:  # a resumed attempt re-announces the same source shape
            return False
    snap = existing or ArchSnapshot(job_id=job_id, seq=seq, kind=kind, step=step)
    snap.tokens = int(e.get("tokens", 0))
    snap.params = params
    snap.shape = _json_safe(e.get("shape") or {})
    snap.removed = _json_safe(e.get("removed"))
    snap.saliency = _json_safe(e.get("saliency"))
    if existing is None:
        s.add(snap)
        s.flush()
    return existing is None


def _progress(job: Job, e: dict[str, Any]) -> None:
    """Fold one event into the job's list-view progress fields."""
    kind = e.get("type")
    if "step" in e and kind in ("started", "step", "pruned", "finished", "stopped"):
        job.step = int(e["step"])
        job.tokens = int(e.get("tokens", job.tokens or 0))
    if kind == "started":
        job.total_steps = e.get("total_steps", job.total_steps)
        job.budget = e.get("budget", job.budget)
        job.source_params = e.get("source_params", job.source_params)
        job.params = job.params or job.source_params
        if e.get("resumed_from") is not None:
            job.resumed_from_step = int(e["resumed_from"])
    elif kind == "step":
        job.params = e.get("params", job.params)
        job.phase = e.get("phase", job.phase)
        rate = finite(e.get("tokens_per_s"))
        step, total = int(e.get("step", 0)), job.total_steps
        if rate and rate > 0 and total and step > 0 and job.tokens:
            job.eta_seconds = max(total - step, 0) * (job.tokens / step) / rate
    elif kind == "phase":
        job.phase = e.get("phase", job.phase)
    elif kind == "pruned":
        job.params = e.get("params_after", job.params)
    elif kind == "checkpoint":
        job.last_checkpoint_step = int(e.get("step", 0))
    elif kind == "finished":
        job.params = e.get("params", job.params)
        job.eta_seconds = 0.0


def record_events(s: SessionLike, *, job_id: str, events: list[dict[str, Any]]) -> int:
    """Append a batch of event dicts (``Event.to_dict()``) and derive the queryable rows.

    Events get per-job seqs continuing the log. 'step' upserts a MetricPoint on (job, step) so
    a resumed attempt does not duplicate; 'eval' upserts an EvalPoint; 'started' / 'pruned' /
    'finished' store source / pruned / final ArchSnapshots; the job's progress fields follow.
    Returns the last event seq. One transaction; the job row is locked (FOR UPDATE on
    PostgreSQL, the write lock on SQLite) so concurrent writers cannot reuse a seq.
    """
    with _session(s) as session:
        job = session.execute(
            select(Job)
            .where(Job.id == job_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).scalar_one_or_none()
        if job is None:
            session.rollback()
            raise LookupError(f"no job {job_id!r}")
        seq = _next_seq(session, Event, job_id) - 1
        snap_seq = _next_seq(session, ArchSnapshot, job_id)
        metrics_by_step: dict[int, dict[str, Any]] = {}
        evals: dict[tuple[int, str, str], dict[str, Any]] = {}
        for raw in events:
            e = _json_safe(dict(raw))
            kind = str(e.get("type", "event"))
            step = int(e.get("step", 0))
            seq += 1
            session.add(Event(job_id=job_id, seq=seq, type=kind, step=step, payload=e))
            if kind == "step":
                metrics_by_step[step] = {
                    "job_id": job_id,
                    "step": step,
                    "phase": e.get("phase"),
                    "loss": finite(e.get("loss")),
                    "lr": finite(e.get("lr")),
                    "tokens": int(e.get("tokens", 0)),
                    "tokens_per_s": finite(e.get("tokens_per_s")),
                    "params": e.get("params"),
                    "target_params": e.get("target_params"),
                    "time": finite(e.get("time")),
                }
            elif kind == "eval":
                key = (step, str(e.get("label", "")), str(e.get("protocol", "")))
                evals[key] = {
                    "job_id": job_id,
                    "step": step,
                    "label": key[1],
                    "protocol": key[2],
                    "ppl": finite(e.get("ppl")),
                    "loss": finite(e.get("loss")),
                    "tokens": int(e.get("tokens", 0)),
                }
            elif kind in ("started", "pruned", "finished") and isinstance(e.get("shape"), dict):
                snap_kind = {"started": "source", "pruned": "pruned", "finished": "final"}[kind]
                params = {
                    "started": e.get("source_params"),
                    "pruned": e.get("params_after"),
                    "finished": e.get("params"),
                }[kind]
                if _snapshot(session, job_id, snap_seq, e, snap_kind, params):
                    snap_seq += 1
            _progress(job, e)
        upsert(session, MetricPoint, list(metrics_by_step.values()), keys=("job_id", "step"))
        upsert(
            session, EvalPoint, list(evals.values()), keys=("job_id", "step", "label", "protocol")
        )
        job.updated_at = utcnow()
        session.commit()
        return seq


def events_after(s: SessionLike, *, job_id: str, cursor: int = 0, limit: int = 500) -> list[Event]:
    """Events with seq > cursor, oldest first; the next cursor is the last row's seq."""
    stmt = (
        select(Event)
        .where(Event.job_id == job_id, Event.seq > cursor)
        .order_by(Event.seq)
        .limit(limit)
    )
    with _session(s) as session:
        return list(session.scalars(stmt))


def metrics(s: SessionLike, *, job_id: str) -> list[MetricPoint]:
    """One MetricPoint per step, by step."""
    stmt = select(MetricPoint).where(MetricPoint.job_id == job_id).order_by(MetricPoint.step)
    with _session(s) as session:
        return list(session.scalars(stmt.execution_options(populate_existing=True)))


def evals(s: SessionLike, *, job_id: str) -> list[EvalPoint]:
    """Evaluations by step."""
    stmt = (
        select(EvalPoint).where(EvalPoint.job_id == job_id).order_by(EvalPoint.step, EvalPoint.id)
    )
    with _session(s) as session:
        return list(session.scalars(stmt.execution_options(populate_existing=True)))


def snapshots(s: SessionLike, *, job_id: str, kind: str | None = None) -> list[ArchSnapshot]:
    """Architecture snapshots in the order they were first recorded."""
    stmt = select(ArchSnapshot).where(ArchSnapshot.job_id == job_id).order_by(ArchSnapshot.seq)
    if kind is not None:
        stmt = stmt.where(ArchSnapshot.kind == kind)
    with _session(s) as session:
        return list(session.scalars(stmt.execution_options(populate_existing=True)))
