"""DB sessions per process, the heartbeat thread that keeps a job's lease, and the reaper loop.

The lease lives in the database (``db.repo``): a worker may only run a job while it holds it.
The heartbeat renews it every ``heartbeat_s``; when renewal is refused (the lease expired and
someone else took the job, or the job became terminal) or a cancel was requested, it sets the
stop flag that the trainer polls between steps.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Literal

from sqlalchemy.orm import Session, sessionmaker

from db import repo
from db.engine import make_engine, session_factory

log = logging.getLogger(__name__)

_SESSIONS: dict[tuple[int, str], sessionmaker[Session]] = {}
_SESSIONS_LOCK = threading.Lock()
_INHERITED: list[sessionmaker[Session]] = []


def _after_fork_in_child() -> None:
    # A thread of the parent (the reaper) may hold the lock at fork time. The parent's engines
    # are kept referenced but never used here: closing their inherited sockets from the child
    # (e.g. by garbage collection) would break the parent's connections.
    global _SESSIONS_LOCK
    _SESSIONS_LOCK = threading.Lock()
    _INHERITED.extend(_SESSIONS.values())
    _SESSIONS.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)


def sessions(url: str) -> sessionmaker[Session]:
    """A session factory for ``url`` owned by this process (never shared across a fork)."""
    key = (os.getpid(), url)
    with _SESSIONS_LOCK:
        sm = _SESSIONS.get(key)
        if sm is None:
            sm = session_factory(make_engine(url))
            _SESSIONS[key] = sm
        return sm


def worker_id() -> str:
    """``host:pid`` of this process: the lease owner name (the tests find the PID there)."""
    return f"{socket.gethostname()}:{os.getpid()}"


StopReason = Literal["cancel", "lease_lost"]


class Heartbeat:
    """Renews the lease of ``job_id`` in a daemon thread until :meth:`stop`.

    ``flag`` is set (and ``reason`` recorded) when a cancel is requested or the lease is lost.
    A DB error is logged and retried next interval; once the lease has expired meanwhile,
    renewal is refused and the job stops (another worker may own it by then).
    """

    def __init__(
        self,
        sm: sessionmaker[Session],
        *,
        job_id: str,
        owner: str,
        ttl_s: float,
        interval_s: float,
    ) -> None:
        self.sm, self.job_id, self.owner = sm, job_id, owner
        self.ttl_s, self.interval_s = ttl_s, interval_s
        self.flag = threading.Event()
        self.reason: StopReason | None = None
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"heartbeat-{job_id}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s + 5)

    def _trip(self, reason: StopReason) -> None:
        if self.reason is None:
            self.reason = reason
            log.warning("job %s: stopping (%s)", self.job_id, reason)
        self.flag.set()

    def beat(self) -> None:
        """One renewal + cancel check (also called once before training starts)."""
        ok = repo.heartbeat(self.sm, job_id=self.job_id, worker_id=self.owner, ttl_s=self.ttl_s)
        if repo.cancel_requested(self.sm, job_id=self.job_id):
            self._trip("cancel")
        elif not ok:
            self._trip("lease_lost")

    def _loop(self) -> None:
        while not self._done.wait(self.interval_s):
            try:
                self.beat()
            except Exception:  # DB hiccup: keep trying; the TTL bounds how long we may run
                log.exception("job %s: heartbeat failed", self.job_id)


class Reaper:
    """Every ``period_s``, re-queues jobs whose lease expired and hands their ids to ``requeue``.

    Each worker runs one in a small companion process (see ``worker.celery_app``): a thread in
    the prefork parent could hold a lock while the pool forks a child, deadlocking it. The
    compare-and-set in ``db.repo.reap_orphans`` lets exactly one reaper win per job.
    """

    def __init__(
        self, url: str, *, period_s: float, requeue: Callable[[sessionmaker[Session], str], None]
    ) -> None:
        self.url, self.period_s, self.requeue = url, period_s, requeue

    def reap_once(self) -> list[str]:
        sm = sessions(self.url)
        ids = repo.reap_orphans(sm)
        for job_id in ids:
            log.warning("reaper: job %s lost its worker; re-enqueueing", job_id)
            try:
                self.requeue(sm, job_id)
            except Exception:  # the next period cannot see it again (queued): log loudly
                log.exception("reaper: could not re-enqueue job %s", job_id)
        return ids

    def run(self, *, parent_pid: int | None = None, max_passes: int | None = None) -> None:
        """Reap until the parent process is gone (or ``max_passes`` passes, for tests)."""
        passes = 0
        while parent_pid is None or os.getppid() == parent_pid:
            try:
                self.reap_once()
            except Exception:
                log.exception("reaper pass failed")
            passes += 1
            if max_passes is not None and passes >= max_passes:
                return
            time.sleep(self.period_s)
