"""Run events: the append-only event log and the queryable rows derived from it.

:func:`record_events` appends a batch of ``Event.to_dict()`` payloads and derives metric points,
evaluations, architecture snapshots (through :func:`db.snapshot.merge_snapshot`, the rule the
Monitor's live view uses too) and the job's progress fields, in one transaction.

A worker numbers its events itself (``first_seq``) and names its lease: a batch retried after a
failure whose outcome it could not see (the commit went through, the answer was lost) inserts
nothing twice, and a worker that lost its lease cannot write at all.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from db.models import ArchSnapshot, EvalPoint, Event, Job, MetricPoint, utcnow
from db.repo._session import (
    Lease,
    SessionLike,
    finite,
    lock_leased_job,
    next_seq,
    scope,
    upsert,
)
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
            # the checkpoint on disk is authoritative: a crash after its rename left the DB
            # behind (R5), a corrupt newer one was skipped (R21)
            job.last_checkpoint_step = int(e["resumed_from"])
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


def _insert_absent(s: Session, rows: list[dict[str, Any]]) -> None:
    """INSERT the event rows, skipping any (job, seq) already there (SQLite and PostgreSQL)."""
    if not rows:
        return
    dialect = s.get_bind().dialect.name
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    s.execute(insert(Event).values(rows).on_conflict_do_nothing(index_elements=["job_id", "seq"]))


def last_event_seq(s: SessionLike, *, job_id: str) -> int:
    """The seq of the job's newest event (0 if none): a sink numbers its events after it."""
    with scope(s) as session:
        last = session.scalar(
            select(func.coalesce(func.max(Event.seq), 0)).where(Event.job_id == job_id)
        )
        session.rollback()
        return int(last or 0)


def record_events(
    s: SessionLike,
    *,
    job_id: str,
    events: list[dict[str, Any]],
    first_seq: int | None = None,
    lease: Lease | None = None,
) -> int:
    """Append a batch of event dicts (``Event.to_dict()``) and derive the queryable rows.

    Seqs: ``first_seq``, ``first_seq + 1``, ... when given (the writer numbers its events; an
    event whose (job, seq) is already stored is skipped with everything derived from it, so a
    retried batch changes nothing twice); else the next ones after the log's end. 'step'
    upserts a MetricPoint on (job, step) so a resumed attempt does not duplicate; 'eval'
    upserts an EvalPoint; 'started' / 'pruned' / 'finished' store source / pruned / final
    ArchSnapshots (:mod:`db.snapshot`); the job's progress fields follow. Returns the last event
    seq of the batch. One transaction; the job row is locked (FOR UPDATE on PostgreSQL, the
    write lock on SQLite) so concurrent writers cannot reuse a seq.

    ``lease``: the writer's fencing token; LeaseLost (nothing written) unless that attempt is
    the job's running one. ``None`` writes unconditionally (tools and tests).
    """
    with scope(s) as session:
        job = lock_leased_job(session, job_id, lease)
        if first_seq is None:
            first_seq = next_seq(session, Event, job_id)
        last = first_seq + len(events) - 1
        stored = set(
            session.scalars(
                select(Event.seq).where(
                    Event.job_id == job_id, Event.seq >= first_seq, Event.seq <= last
                )
            )
        )
        metrics_by_step: dict[int, dict[str, Any]] = {}
        evals_by_key: dict[tuple[int, str, str], dict[str, Any]] = {}
        snaps: list[Snapshot] = []
        new_rows: list[dict[str, Any]] = []
        for seq, raw in enumerate(events, start=first_seq):
            if seq in stored:  # written by an earlier try of this very batch
                continue
            e = json_safe(dict(raw))
            kind = str(e.get("type", "event"))
            new_rows.append(
                {
                    "job_id": job_id,
                    "seq": seq,
                    "type": kind,
                    "step": int(e.get("step", 0)),
                    "payload": e,
                }
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
        _insert_absent(session, new_rows)
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
        return last


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
