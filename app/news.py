"""Has a job anything new for a Monitor tab? A per-job mark shared by every tab of the process.

The Monitor ticks every ``app.monitor.TICK_S`` so that a pruning event shows within a second;
a full read per tick and tab would multiply the DB's load by the number of open tabs. Instead
each job has one :class:`Mark` (its status and the seq of its newest event that is not a step),
refreshed at most every :data:`TTL_S` by whichever tab asks first: one primary-key lookup with an
indexed ``max(seq)``, plus a range scan of only the events added since the last refresh. A tab
then compares the mark with its own state in memory.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from sqlalchemy import func, select

from app.context import AppContext
from db.models import Event, Job

TTL_S = 0.2
"""A mark is reused this long (below the tick, so one tab alone refreshes it every tick)."""
MAX_MARKS = 10_000


@dataclass(frozen=True)
class Mark:
    """What a tab compares with its state: the job's status and its newest non-step event."""

    at: float
    """``time.monotonic()`` of the refresh."""
    owner: str
    status: str
    last_seq: int
    """The newest event seq (any type) when refreshed."""
    news_seq: int
    """The newest seq of an event other than a step (a conservative upper bound: at the first
    refresh it is ``last_seq``, so a tab whose cursor is behind reads once more)."""


_marks: dict[tuple[int, str], Mark] = {}
_lock = threading.Lock()


def _refresh(ctx: AppContext, job_id: str, old: Mark | None, now: float) -> Mark | None:
    newest = select(func.max(Event.seq)).where(Event.job_id == job_id).scalar_subquery()
    with ctx.session() as s:
        row = s.execute(select(Job.owner, Job.status, newest).where(Job.id == job_id)).one_or_none()
        if row is None:
            return None
        last = int(row[2] or 0)
        if old is None:
            news = last
        elif last > old.last_seq:
            found = s.scalar(
                select(func.max(Event.seq)).where(
                    Event.job_id == job_id, Event.seq > old.last_seq, Event.type != "step"
                )
            )
            news = old.news_seq if found is None else int(found)
        else:
            news = old.news_seq
    return Mark(at=now, owner=row[0], status=row[1], last_seq=last, news_seq=news)


def mark(ctx: AppContext, job_id: str, now: float, *, after: float) -> Mark | None:
    """The job's mark, refreshed unless younger than :data:`TTL_S` and taken after ``after``
    (the asking tab's last full read, so no tab trusts a mark older than what it has read);
    None if the job is gone."""
    key = (id(ctx.sessions), job_id)
    with _lock:
        old = _marks.get(key)
    if old is not None and after < old.at and now - old.at < TTL_S:
        return old
    new = _refresh(ctx, job_id, old, now)
    with _lock:
        if len(_marks) >= MAX_MARKS:
            _marks.clear()
        if new is None:
            _marks.pop(key, None)
        else:
            _marks[key] = new
    return new


def has_news(
    ctx: AppContext,
    *,
    job_id: str,
    owner: str,
    status: str,
    cursor: int,
    read_at: float,
    now: float,
) -> bool:
    """True if a tab at ``cursor`` showing ``status`` (as read at ``read_at``) should read the
    job again: the status changed, an event other than a step follows the cursor, or the job
    is gone / not owned."""
    m = mark(ctx, job_id, now, after=read_at)
    return m is None or m.owner != owner or m.status != status or m.news_seq > cursor
