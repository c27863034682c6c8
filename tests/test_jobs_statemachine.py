"""A Hypothesis state machine over the job store (docs/reliability.md R13; issue 12 item 4).

Rules: submit, claim by worker A or B (or A again: the same ``host:pid``), heartbeat, cancel,
reap, finish and record events, each with any token ever issued (stale ones included), on a
clock the machine moves. Every rule predicts its outcome from the row as it was (the machine is
single-threaded) and checks the store agrees; the invariants hold after every step: at most one
issued token is live, attempts only grow (up to ``max_attempts``), terminal statuses are
absorbing, a lease is held exactly while running, and no write from a stale token was accepted.
SQLite always; PostgreSQL as well when the server is reachable.
"""

from __future__ import annotations

import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # db/ is a top-level package next to efficientllm/
    sys.path.insert(0, str(ROOT))

hypothesis = pytest.importorskip("hypothesis")

import test_db  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.stateful import (  # noqa: E402
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import func, select  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402

from db import repo  # noqa: E402
from db.models import JOB_STATUSES, TERMINAL_STATUSES, Event, Job, utcnow  # noqa: E402

# the SQLite / PostgreSQL fixtures of test_db.py
db_url, engine, sm = test_db.db_url, test_db.engine, test_db.sm
TTL_S = 5.0
# A (twice as likely: A claiming again is a second attempt in the same process) and B
WORKERS = ("host:1", "host:1", "host:2")
EXAMPLES = {"sqlite": 60, "postgresql": 15}


def _event(step: int) -> dict[str, Any]:
    return {"type": "step", "step": step, "tokens": step, "phase": "prune", "loss": 1.0}


class JobStore(RuleBasedStateMachine):
    """The job store under any interleaving of its operations (one session factory)."""

    def __init__(self, sm: sessionmaker[Session]) -> None:
        super().__init__()
        self.sm = sm
        self.now: datetime = utcnow()
        self.seen: dict[str, Job] = {}  # the last observed row of each job
        self.terminal: dict[str, tuple[str, Any]] = {}  # (status, finished_at) once terminal
        self.issued: dict[str, list[repo.Lease]] = {}
        self.accepted: dict[str, int] = {}  # event rows we expect per job
        self.jobs: list[str] = []
        self.tokens: list[tuple[str, repo.Lease]] = []  # every token ever issued, stale or not

    # ---- helpers ----------------------------------------------------------------------------
    def row(self, job_id: str) -> Job:
        job = repo.get_job(self.sm, job_id=job_id)
        assert job is not None
        return job

    def live(self, job: Job, lease: repo.Lease) -> bool:
        return job.status == "running" and (job.lease_owner, job.attempt) == (
            lease.owner,
            lease.attempt,
        )

    def token(self, data: st.DataObject) -> tuple[str, repo.Lease]:
        return data.draw(st.sampled_from(self.tokens), label="token")

    # ---- rules ------------------------------------------------------------------------------
    @initialize(max_attempts=st.integers(1, 3))
    def submit(self, max_attempts: int) -> None:
        for n in (4, max_attempts):  # two jobs: the reaper and the clock act on both at once
            job = repo.create_job(self.sm, config={}, owner="o", max_attempts=n)
            self.jobs.append(job.id)
            self.issued[job.id] = []
            self.accepted[job.id] = 0

    @rule(dt=st.sampled_from([1.0, 3.0, 6.0]))  # 6 > TTL_S: a lease expires unless renewed
    def tick(self, dt: float) -> None:
        self.now += timedelta(seconds=dt)

    @rule(j=st.integers(0, 1), worker=st.sampled_from(WORKERS))
    def claim(self, j: int, worker: str) -> None:
        job_id = self.jobs[j]
        before = self.row(job_id)
        expired = before.lease_expires_at is not None and before.lease_expires_at < self.now
        claimable = before.status == "queued" or (before.status == "running" and expired)
        wins = (
            claimable
            and before.cancel_requested_at is None
            and before.attempt < before.max_attempts
        )
        job = repo.claim_job(self.sm, job_id=job_id, worker_id=worker, ttl_s=TTL_S, now=self.now)
        assert (job is not None) == wins, (before, job)
        after = self.row(job_id)
        if claimable and not wins:  # cancel pending -> cancelled; attempts spent -> failed
            expected = "cancelled" if before.cancel_requested_at is not None else "failed"
            assert after.status == expected and after.attempt == before.attempt
        if job is None:
            return
        assert job.attempt == before.attempt + 1 and job.lease_owner == worker
        lease = repo.Lease.of(job)
        assert lease not in self.issued[job_id]  # a token is never issued twice
        self.issued[job_id].append(lease)
        self.tokens.append((job_id, lease))

    @precondition(lambda self: self.tokens)
    @rule(data=st.data())
    def heartbeat(self, data: st.DataObject) -> None:
        job_id, lease = self.token(data)
        live = self.live(self.row(job_id), lease)
        ok = repo.heartbeat(
            self.sm,
            job_id=job_id,
            worker_id=lease.owner,
            attempt=lease.attempt,
            ttl_s=TTL_S,
            now=self.now,
        )
        assert ok == live
        if ok:
            assert self.row(job_id).lease_expires_at == self.now + timedelta(seconds=TTL_S)

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), status=st.sampled_from(sorted(TERMINAL_STATUSES)))
    def finish(self, data: st.DataObject, status: str) -> None:
        job_id, lease = self.token(data)
        live = self.live(self.row(job_id), lease)
        ok = repo.finish_job(
            self.sm, job_id=job_id, worker_id=lease.owner, attempt=lease.attempt, status=status
        )
        assert ok == live
        if ok:
            assert self.row(job_id).status == status

    @precondition(lambda self: self.tokens)
    @rule(data=st.data(), n=st.integers(1, 3))
    def record_events(self, data: st.DataObject, n: int) -> None:
        job_id, lease = self.token(data)
        live = self.live(self.row(job_id), lease)
        first = self.accepted[job_id] + 1
        try:
            repo.record_events(
                self.sm,
                job_id=job_id,
                events=[_event(first + i) for i in range(n)],
                first_seq=first,
                lease=lease,
            )
        except repo.LeaseLost:
            assert not live, "a live token was refused"
            return
        assert live, f"a stale token wrote: {lease} on {self.row(job_id)!r}"
        self.accepted[job_id] += n

    @rule()
    def cancel(self) -> None:
        job_id = self.jobs[1]  # the first job is never cancelled: its attempts play out longer
        before = self.row(job_id)
        status = repo.request_cancel(self.sm, job_id=job_id)
        if before.terminal:
            assert status == before.status
        elif before.status == "queued":
            assert status == "cancelled"
        else:
            assert status == "running" and repo.cancel_requested(self.sm, job_id=job_id)

    @rule()
    def reap(self) -> None:
        before = {j: self.row(j) for j in self.issued}
        requeued = set(repo.reap_orphans(self.sm, now=self.now))
        for job_id, job in before.items():
            expired = (
                job.status == "running"
                and job.lease_expires_at is not None
                and job.lease_expires_at < self.now
            )
            back = expired and job.cancel_requested_at is None and job.attempt < job.max_attempts
            assert (job_id in requeued) == back, (job, requeued)
            if expired and not back:
                assert self.row(job_id).status in TERMINAL_STATUSES

    # ---- invariants -------------------------------------------------------------------------
    @invariant()
    def store_is_consistent(self) -> None:
        for job_id, leases in self.issued.items():
            job = self.row(job_id)
            assert job.status in JOB_STATUSES
            live = [t for t in leases if self.live(job, t)]
            assert len(live) <= 1, live  # at most one live lease
            if job.status == "running":
                assert len(live) == 1 and job.lease_expires_at is not None
            else:
                assert job.lease_expires_at is None
            prev = self.seen.get(job_id)
            if prev is not None:
                assert job.attempt >= prev.attempt  # attempts only grow
            assert 0 <= job.attempt <= job.max_attempts
            assert job.attempt == len(leases)  # one attempt per issued token
            if job_id in self.terminal:  # terminal is absorbing
                assert (job.status, job.finished_at) == self.terminal[job_id]
            elif job.status in TERMINAL_STATUSES:
                assert job.finished_at is not None
                self.terminal[job_id] = (job.status, job.finished_at)
            if job.status == "cancelled" and job.attempt == 0:
                assert job.started_at is None  # cancelled while queued: never started
            self.seen[job_id] = job
            with self.sm() as s:
                rows = s.scalar(
                    select(func.count()).select_from(Event).where(Event.job_id == job_id)
                )
                distinct = s.scalar(
                    select(func.count(func.distinct(Event.seq))).where(Event.job_id == job_id)
                )
            assert rows == distinct == self.accepted[job_id]  # only accepted writes, once


@pytest.mark.timeout(120)
def test_job_store_state_machine(sm: sessionmaker[Session], db_url: str) -> None:
    """Hypothesis explores interleavings; any counterexample is shrunk and printed."""
    backend = "sqlite" if db_url.startswith("sqlite") else "postgresql"
    run_state_machine_as_test(
        lambda: JobStore(sm),
        settings=settings(
            max_examples=EXAMPLES[backend],
            stateful_step_count=30,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
            database=None,
            derandomize=True,
        ),
    )
