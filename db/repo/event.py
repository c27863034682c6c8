"""Run events: the append-only event log and the queryable rows derived from it.

:func:`record_events` appends a batch of ``Event.to_dict()`` payloads and derives metric points,
evaluations, architecture snapshots (through :func:`db.snapshot.merge_snapshot`, the rule the
Monitor's live view uses too) and the job's progress fields, in one transaction.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from db.models import ArchSnapshot, EvalPoint, Event, Job, MetricPoint, utcnow
from db.repo._session import SessionLike, finite, next_seq, scope, upsert
from db.snapshot import Snapshot, json_safe, merge_snapshot, snapshot_from_row, snapshot_of


def _store_snapshots(s: Session, job_id: str, new: list[Snapshot]) -> None:
    """Merge ``new`` into the job's stored snapshots: a new row (next seq) or an update."""
    if not new:
        return
    steps = sorted({x["step"] for x in new})
    rows = list(  # every row a merge can match: the source, and any at one of these steps
        s.scalars(
            select(ArchSnapshot)
            .where(
                ArchSnapshot.job_id == job_id,
                or_(ArchSnapshot.kind == "source", ArchSnapshot.step.in_(steps)),
            )
            .order_by(ArchSnapshot.seq)
        )
    )
    known = [snapshot_from_row(r) for r in rows]
    seq = next_seq(s, ArchSnapshot, job_id)
    for snap in new:
        i = merge_snapshot(known, snap)
        if i is None:
            continue
        if i == len(rows):
            rows.append(ArchSnapshot(job_id=job_id, seq=seq, kind=snap["kind"], step=snap["step"]))
            s.add(rows[i])
            seq += 1
        row = rows[i]
        row.tokens, row.params, row.shape = snap["tokens"], snap["params"], snap["shape"]
        row.removed, row.saliency = snap["removed"], snap["saliency"]
    s.flush()


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


def _metric_row(job_id: str, e: dict[str, Any]) -> dict[str, Any]:
    """The MetricPoint values of a 'step' event."""
    return {
        "job_id": job_id,
        "step": int(e.get("step", 0)),
        "phase": e.get("phase"),
        "loss": finite(e.get("loss")),
        "lr": finite(e.get("lr")),
        "tokens": int(e.get("tokens", 0)),
        "tokens_per_s": finite(e.get("tokens_per_s")),
        "params": e.get("params"),
        "target_params": e.get("target_params"),
        "time": finite(e.get("time")),
    }


def _eval_row(job_id: str, e: dict[str, Any]) -> dict[str, Any]:
    """The EvalPoint values of an 'eval' event."""
    return {
        "job_id": job_id,
        "step": int(e.get("step", 0)),
        "label": str(e.get("label", "")),
        "protocol": str(e.get("protocol", "")),
        "ppl": finite(e.get("ppl")),
        "loss": finite(e.get("loss")),
        "tokens": int(e.get("tokens", 0)),
    }


def record_events(s: SessionLike, *, job_id: str, events: list[dict[str, Any]]) -> int:
    """Append a batch of event dicts (``Event.to_dict()``) and derive the queryable rows.

    Events get per-job seqs continuing the log. 'step' upserts a MetricPoint on (job, step) so
    a resumed attempt does not duplicate; 'eval' upserts an EvalPoint; 'started' / 'pruned' /
    'finished' store source / pruned / final ArchSnapshots (:mod:`db.snapshot`); the job's
    progress fields follow. Returns the last event seq. One transaction; the job row is locked
    (FOR UPDATE on PostgreSQL, the write lock on SQLite) so concurrent writers cannot reuse a seq.
    """
    with scope(s) as session:
        job = session.execute(
            select(Job)
            .where(Job.id == job_id)
            .with_for_update()
            .execution_options(populate_existing=True)
        ).scalar_one_or_none()
        if job is None:
            session.rollback()
            raise LookupError(f"no job {job_id!r}")
        seq = next_seq(session, Event, job_id) - 1
        metrics_by_step: dict[int, dict[str, Any]] = {}
        evals_by_key: dict[tuple[int, str, str], dict[str, Any]] = {}
        snaps: list[Snapshot] = []
        for raw in events:
            e = json_safe(dict(raw))
            kind = str(e.get("type", "event"))
            seq += 1
            session.add(
                Event(job_id=job_id, seq=seq, type=kind, step=int(e.get("step", 0)), payload=e)
            )
            if kind == "step":
                row = _metric_row(job_id, e)
                metrics_by_step[row["step"]] = row
            elif kind == "eval":
                row = _eval_row(job_id, e)
                evals_by_key[(row["step"], row["label"], row["protocol"])] = row
            elif (snap := snapshot_of(e)) is not None:
                snaps.append(snap)
            _progress(job, e)
        _store_snapshots(session, job_id, snaps)
        upsert(session, MetricPoint, list(metrics_by_step.values()), keys=("job_id", "step"))
        upsert(
            session,
            EvalPoint,
            list(evals_by_key.values()),
            keys=("job_id", "step", "label", "protocol"),
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
    with scope(s) as session:
        return list(session.scalars(stmt))


def metrics(s: SessionLike, *, job_id: str) -> list[MetricPoint]:
    """One MetricPoint per step, by step."""
    stmt = select(MetricPoint).where(MetricPoint.job_id == job_id).order_by(MetricPoint.step)
    with scope(s) as session:
        return list(session.scalars(stmt.execution_options(populate_existing=True)))


def evals(s: SessionLike, *, job_id: str) -> list[EvalPoint]:
    """Evaluations by step."""
    stmt = (
        select(EvalPoint).where(EvalPoint.job_id == job_id).order_by(EvalPoint.step, EvalPoint.id)
    )
    with scope(s) as session:
        return list(session.scalars(stmt.execution_options(populate_existing=True)))


def snapshots(s: SessionLike, *, job_id: str, kind: str | None = None) -> list[ArchSnapshot]:
    """Architecture snapshots in the order they were first recorded."""
    stmt = select(ArchSnapshot).where(ArchSnapshot.job_id == job_id).order_by(ArchSnapshot.seq)
    if kind is not None:
        stmt = stmt.where(ArchSnapshot.kind == kind)
    with scope(s) as session:
        return list(session.scalars(stmt.execution_options(populate_existing=True)))
