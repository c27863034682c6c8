"""DB sessions per process, the heartbeat thread that keeps a job's lease, and the reaper loop.

The lease lives in the database (``db.repo``): a worker may only run a job while it holds it.
The heartbeat renews it every ``heartbeat_s``; when renewal is refused (the lease expired and
someone else took the job, or the job became terminal) or a cancel was requested, it sets the
stop flag that the trainer polls between steps. :meth:`Heartbeat.renew` is also the trainer's
``may_write``: a fresh renewal right before a checkpoint or the export is written. Generations
hold the same kind of lease (``kind="generation"``, no cancel).
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


StopReason = Literal["cancel", "lease_lost", "budget"]


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
        attempt: int | None = None,
        kind: Literal["job", "generation"] = "job",
    ) -> None:
        if kind == "generation" and attempt is None:
            raise ValueError("a generation's heartbeat needs its attempt")
        self.sm, self.job_id, self.owner = sm, job_id, owner
        self.ttl_s, self.interval_s = ttl_s, interval_s
        self.attempt, self.kind = attempt, kind
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

    def trip(self, reason: StopReason) -> None:
        """Set the stop flag (the first reason given is kept)."""
        if self.reason is None:
            self.reason = reason
            log.warning("%s %s: stopping (%s)", self.kind, self.job_id, reason)
        self.flag.set()

    _trip = trip

    def _renew_once(self) -> bool:
        if self.kind == "generation":
            assert self.attempt is not None
            lease = repo.Lease(self.owner, self.attempt)
            return repo.heartbeat_generation(
                self.sm, gen_id=self.job_id, lease=lease, ttl_s=self.ttl_s
            )
        return repo.heartbeat(
            self.sm,
            job_id=self.job_id,
            worker_id=self.owner,
            attempt=self.attempt,
            ttl_s=self.ttl_s,
        )

    def renew(self) -> bool:
        """Renew the lease now; True if it is still ours (for another ``ttl_s``). A refusal, or
        a DB error (we cannot prove we hold it), trips the stop flag / answers False."""
        if self.reason == "lease_lost":
            return False
        try:
            ok = self._renew_once()
        except Exception:
            log.exception("%s %s: lease check failed", self.kind, self.job_id)
            return False
        if not ok:
            self.trip("lease_lost")
        return ok

    def beat(self) -> None:
        """One renewal + cancel check (also called once before training starts)."""
        ok = self._renew_once()
        if self.kind == "job" and repo.cancel_requested(self.sm, job_id=self.job_id):
            self.trip("cancel")
        elif not ok:
            self.trip("lease_lost")

    def _loop(self) -> None:
        while not self._done.wait(self.interval_s):
            try:
                self.beat()
            except Exception:  # DB hiccup: keep trying; the TTL bounds how long we may run
                log.exception("job %s: heartbeat failed", self.job_id)


Send = Callable[[sessionmaker[Session], str], None]


class Reaper:
    """Every ``period_s``: re-queues jobs and generations whose lease expired, and (re-)sends
    queued ones that have no live broker message after ``resend_s`` (``db.repo.unsent_jobs``).

    ``requeue(sm, job_id)`` / ``send_generation(sm, gen_id)`` send the message and record it.
    Each worker runs one in a small companion process (see ``worker.celery_app``): a thread in
    the prefork parent could hold a lock while the pool forks a child, deadlocking it. The
    compare-and-set in ``db.repo.reap_orphans`` lets exactly one reaper win per job; a failed
    send leaves the row queued and unsent, so a later pass sends it again.
    """

    def __init__(
        self,
        url: str,
        *,
        period_s: float,
        requeue: Send,
        send_generation: Send | None = None,
        resend_s: float | None = None,
    ) -> None:
        self.url, self.period_s, self.requeue = url, period_s, requeue
        self.send_generation, self.resend_s = send_generation, resend_s

    def _send(self, sm: sessionmaker[Session], send: Send, kind: str, row_id: str) -> None:
        try:
            send(sm, row_id)
        except Exception:  # still queued and unsent: the next pass after resend_s tries again
            log.exception("reaper: could not send %s %s; retrying later", kind, row_id)

    def reap_once(self) -> list[str]:
        """One pass; returns the job ids re-queued because their worker was lost."""
        sm = sessions(self.url)
        ids = repo.reap_orphans(sm)
        for job_id in ids:
            log.warning("reaper: job %s lost its worker; re-enqueueing", job_id)
            self._send(sm, self.requeue, "job", job_id)
        if self.send_generation is not None:
            for gen_id in repo.reap_generations(sm):
                log.warning("reaper: generation %s lost its worker; re-sending", gen_id)
                self._send(sm, self.send_generation, "generation", gen_id)
        if self.resend_s is not None:
            for job_id in repo.unsent_jobs(sm, grace_s=self.resend_s):
                log.warning("reaper: job %s is queued with no live message; sending", job_id)
                self._send(sm, self.requeue, "job", job_id)
            if self.send_generation is not None:
                for gen_id in repo.unsent_generations(sm, grace_s=self.resend_s):
                    log.warning("reaper: generation %s has no live message; sending", gen_id)
                    self._send(sm, self.send_generation, "generation", gen_id)
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
