"""Fencing, idempotent event writes and no orphaned rows (issue 12, items 1-3).

A running attempt is named by its lease (owner + attempt). Every write it makes names it and is
refused once the job moved on: two workers on one job leave one writer. Event batches are keyed
by (job, seq), so a retried batch stores nothing twice. Queued jobs and generations whose broker
message was never sent (or got lost) are sent again by the reaper; a generation's worker that
dies is reaped like a job's. SQLite and PostgreSQL (the ``db_url`` fixture of test_db.py).
"""

from __future__ import annotations

import sys
import threading
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # db/ is a top-level package next to efficientllm/
    sys.path.insert(0, str(ROOT))

import test_db  # noqa: E402
from sqlalchemy import func, select, text, update  # noqa: E402
from sqlalchemy.exc import OperationalError  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402
from test_db import _job, _run_events  # noqa: E402

from db import repo  # noqa: E402
from db.models import Event, Generation, Job, utcnow  # noqa: E402
from efficientllm.training.events import CheckpointSaved, StepMetrics  # noqa: E402

# the SQLite / PostgreSQL fixtures of test_db.py
db_url, engine, sm = test_db.db_url, test_db.engine, test_db.sm


def _event_seqs(sm: sessionmaker[Session], job_id: str) -> tuple[int, int, list[int]]:
    """(rows, distinct seqs, the seqs in order) of a job's event log."""
    with sm() as s:
        rows = s.scalar(select(func.count()).select_from(Event).where(Event.job_id == job_id))
        seqs = list(s.scalars(select(Event.seq).where(Event.job_id == job_id).order_by(Event.seq)))
    return int(rows or 0), len(set(seqs)), seqs


def _step(step: int) -> StepMetrics:
    return StepMetrics(
        step=step, phase="prune", loss=1.0, lr=0.1, params=1, target_params=1, tokens_per_s=1.0
    )


# ---- 1. fencing at the DB layer -----------------------------------------------------------------
def test_stale_lease_writes_are_refused(sm: sessionmaker[Session]) -> None:
    """Attempt 1 of ``h:1`` paused past its TTL; attempt 2 was claimed by the same ``host:pid``
    (a redelivery to the same process). Every write naming attempt 1 is refused and changes
    nothing; the same writes naming attempt 2 go through."""
    jid = _job(sm)
    t0 = utcnow()
    first = repo.claim_job(sm, job_id=jid, worker_id="h:1", ttl_s=5, now=t0)
    assert first is not None
    stale = repo.Lease.of(first)
    repo.record_events(sm, job_id=jid, events=_run_events(1, 3), lease=stale)  # still ours
    second = repo.claim_job(sm, job_id=jid, worker_id="h:1", ttl_s=5, now=t0 + timedelta(seconds=6))
    assert second is not None and second.attempt == 2
    live = repo.Lease.of(second)
    assert stale == repo.Lease("h:1", 1) and live == repo.Lease("h:1", 2)
    rows_before = _event_seqs(sm, jid)[0]
    n_metrics = len(repo.metrics(sm, job_id=jid))

    with pytest.raises(repo.LeaseLost):
        repo.record_events(sm, job_id=jid, events=_run_events(4, 10)[1:], lease=stale)

    def add_weights(lease: repo.Lease) -> None:
        repo.add_artifact(
            sm,
            job_id=jid,
            kind="export",
            path=f"{jid}/export/model.safetensors",
            size_bytes=1,
            sha256="0" * 64,
            lease=lease,
        )

    with pytest.raises(repo.LeaseLost):
        add_weights(stale)
    assert not repo.set_checkpoint(sm, job_id=jid, step=10, lease=stale)
    assert not repo.heartbeat(sm, job_id=jid, worker_id="h:1", attempt=1, ttl_s=5)
    assert not repo.finish_job(sm, job_id=jid, worker_id="h:1", attempt=1, status="succeeded")
    assert _event_seqs(sm, jid)[0] == rows_before
    assert len(repo.metrics(sm, job_id=jid)) == n_metrics and repo.artifacts(sm, job_id=jid) == []
    job = repo.get_job(sm, job_id=jid)
    assert job is not None and job.status == "running" and job.attempt == 2
    assert job.last_checkpoint_step is None and job.step == 3

    # the live attempt writes all of it
    repo.record_events(sm, job_id=jid, events=_run_events(4, 10)[1:], lease=live)
    add_weights(live)
    assert repo.set_checkpoint(sm, job_id=jid, step=10, lease=live)
    assert repo.heartbeat(sm, job_id=jid, worker_id="h:1", attempt=2, ttl_s=5)
    assert repo.finish_job(sm, job_id=jid, worker_id="h:1", attempt=2, status="succeeded")
    # and once the job is terminal, nobody writes
    with pytest.raises(repo.LeaseLost):
        repo.record_events(sm, job_id=jid, events=[_step(11).to_dict()], lease=live)
    assert not repo.set_checkpoint(sm, job_id=jid, step=11, lease=live)
    assert [p.step for p in repo.metrics(sm, job_id=jid)] == list(range(1, 11))
    with pytest.raises(LookupError):
        repo.record_events(sm, job_id="missing", events=[], lease=live)


# ---- 3. idempotent event batches --------------------------------------------------------------
def test_record_events_is_idempotent_by_seq(sm: sessionmaker[Session]) -> None:
    """A batch written twice (a retry after an unknown outcome), or a retry that overlaps a
    stored prefix, leaves exactly one row per seq and derives nothing twice."""
    jid = _job(sm)
    events = _run_events(1, 10)
    assert repo.record_events(sm, job_id=jid, events=events[:8], first_seq=1) == 8
    assert repo.record_events(sm, job_id=jid, events=events[:8], first_seq=1) == 8
    assert repo.record_events(sm, job_id=jid, events=events[5:], first_seq=6) == len(events)
    rows, distinct, seqs = _event_seqs(sm, jid)
    assert rows == distinct == len(events) and seqs == list(range(1, len(events) + 1))
    stored = [e.payload for e in repo.events_after(sm, job_id=jid, cursor=0)]
    assert [e["type"] for e in stored] == [e["type"] for e in events]
    assert [p.step for p in repo.metrics(sm, job_id=jid)] == list(range(1, 11))
    assert [(s.kind, s.step) for s in repo.snapshots(sm, job_id=jid)] == [
        ("source", 0),
        ("pruned", 5),
        ("final", 10),
    ]
    assert len(repo.evals(sm, job_id=jid)) == 2
    assert repo.last_event_seq(sm, job_id=jid) == len(events)
    # no first_seq: appended after the end, as before
    assert repo.record_events(sm, job_id=jid, events=[_step(11).to_dict()]) == len(events) + 1


@pytest.mark.parametrize("where", ["after_commit", "mid_transaction"])
def test_sink_retry_after_a_half_failed_batch(
    sm: sessionmaker[Session],
    monkeypatch: pytest.MonkeyPatch,
    where: str,
) -> None:
    """The sink's batch fails once: after its commit went through (the answer was lost), or
    half way through the transaction (rolled back). The retried batch leaves exactly one row
    per seq, no gap, and every metric once. (The old sink, which let the DB number a retried
    batch again, stored the committed half twice.)"""
    from worker.sinks import DbSink

    jid = _job(sm)
    failures = [0]
    real_record = repo.record_events
    if where == "after_commit":

        def flaky(*args: Any, **kw: Any) -> int:
            last = real_record(*args, **kw)
            if not failures[0]:
                failures[0] += 1
                raise OperationalError("COMMIT", {}, Exception("connection reset"))
            return last

        monkeypatch.setattr(repo, "record_events", flaky)
    else:
        import db.repo.event as event_mod

        real_store = event_mod._store_snapshots

        def broken_store(*args: Any, **kw: Any) -> None:
            real_store(*args, **kw)  # the events are already inserted in this transaction
            if not failures[0]:
                failures[0] += 1
                raise OperationalError("INSERT", {}, Exception("disk I/O error"))

        monkeypatch.setattr(event_mod, "_store_snapshots", broken_store)

    sink = DbSink(sm, job_id=jid, flush_s=60)
    try:
        for step in range(1, 11):
            sink.emit(_step(step))
        sink.emit(CheckpointSaved(step=10, path="x"))  # important: flushes -> fails once
        assert failures[0] == 1 and sink.written == 0
        for step in range(11, 16):
            sink.emit(_step(step))
        assert sink.flush()
    finally:
        sink.close()
    rows, distinct, seqs = _event_seqs(sm, jid)
    assert rows == distinct == 16 and seqs == list(range(1, 17))
    assert [p.step for p in repo.metrics(sm, job_id=jid)] == list(range(1, 16))
    job = repo.get_job(sm, job_id=jid)
    assert job is not None and job.last_checkpoint_step == 10 and sink.written == 16


def test_sink_stops_writing_once_its_lease_is_lost(sm: sessionmaker[Session]) -> None:
    from worker.sinks import DbSink

    jid = _job(sm)
    t0 = utcnow()
    job = repo.claim_job(sm, job_id=jid, worker_id="a", ttl_s=5, now=t0)
    assert job is not None
    lost: list[bool] = []
    sink = DbSink(
        sm,
        job_id=jid,
        flush_s=60,
        lease=repo.Lease.of(job),
        on_lease_lost=lambda: lost.append(True),
    )
    try:
        sink.emit(_step(1))
        assert sink.flush() and sink.written == 1
        assert repo.claim_job(sm, job_id=jid, worker_id="b", ttl_s=5, now=t0 + timedelta(seconds=6))
        sink.emit(_step(2))
        assert not sink.flush() and sink.lost and lost == [True]
        sink.emit(CheckpointSaved(step=2, path="x"))  # dropped: nothing is buffered any more
    finally:
        sink.close()
    assert _event_seqs(sm, jid)[0] == 1 and sink.written == 1
    assert repo.get_job(sm, job_id=jid).last_checkpoint_step is None  # type: ignore[union-attr]


# ---- 1. two workers on one job: one writer ----------------------------------------------------
@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tiny import save_tiny_corpus, save_tiny_source
    from worker_util import tiny_job_config

    d = tmp_path_factory.mktemp("fencing_assets")
    return tiny_job_config(save_tiny_source(d / "src", "llama_gqa_tied"), save_tiny_corpus(d / "c"))


def test_two_workers_one_writer(
    tiny_config: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Worker A's heartbeat thread stalls (a GC pause, a partition) and its lease expires
    mid-run; worker B (another ``run()`` in this process: the same ``host:pid``) claims attempt
    2 and runs the job to the end while A is still training. A's later event batches, its
    checkpoints, its export and its final status are all refused; B's are the only ones."""
    pytest.importorskip("celery")
    from db.engine import make_engine, session_factory, upgrade_to_head
    from efficientllm.training import outputs
    from efficientllm.training.state import TrainState
    from worker import lease as lease_mod
    from worker import tasks
    from worker.settings import Settings
    from worker.submit import validate_config

    settings = Settings(
        data_dir=tmp_path,
        app_env="test",
        step_delay_s=0.08,
        lease_ttl_s=2.0,
        heartbeat_s=0.2,
        event_flush_s=0.1,
    )
    upgrade_to_head(settings.db_url)
    sm = session_factory(make_engine(settings.db_url))
    jid = repo.create_job(sm, config=validate_config(tiny_config)).id

    writes: list[tuple[str, str, int]] = []  # (thread, what, the job's attempt in the DB then)
    refused: list[tuple[str, int]] = []

    def attempt_now() -> int:
        return repo.get_job(sm, job_id=jid).attempt  # type: ignore[union-attr]

    real_beat, real_save, real_export = (
        lease_mod.Heartbeat.beat,
        TrainState.save,
        outputs.export_run,
    )
    real_record = repo.record_events

    def stalled_beat(self: Any) -> None:
        if self.attempt != 1:  # only A's heartbeat thread stalls
            real_beat(self)

    def spy_save(self: Any, *args: Any, **kw: Any) -> Any:
        writes.append((threading.current_thread().name, "checkpoint", attempt_now()))
        return real_save(self, *args, **kw)

    def spy_export(*args: Any, **kw: Any) -> Any:
        writes.append((threading.current_thread().name, "export", attempt_now()))
        return real_export(*args, **kw)

    def spy_record(*args: Any, **kw: Any) -> int:
        try:
            return real_record(*args, **kw)
        except repo.LeaseLost:
            refused.append((threading.current_thread().name, kw["lease"].attempt))
            raise

    monkeypatch.setattr(lease_mod.Heartbeat, "beat", stalled_beat)
    monkeypatch.setattr(TrainState, "save", spy_save)
    monkeypatch.setattr(outputs, "export_run", spy_export)
    monkeypatch.setattr(repo, "record_events", spy_record)

    outcome: dict[str, str] = {}
    a = threading.Thread(target=lambda: outcome.update(A=tasks.run(jid, settings)), name="A")
    t0 = time.monotonic()
    a.start()
    deadline = time.monotonic() + 60
    while (repo.get_job(sm, job_id=jid).last_checkpoint_step or 0) < 5:  # type: ignore[union-attr]
        assert time.monotonic() < deadline and a.is_alive(), "A never checkpointed"
        time.sleep(0.05)
    # A's lease expires (its heartbeat is stalled); B's delivery claims attempt 2. A may renew
    # right before a checkpoint meanwhile (it is alive): then B's claim is a no-op; try again.
    for _ in range(20):
        with sm() as s:
            s.execute(update(Job).where(Job.id == jid).values(lease_expires_at=utcnow()))
            s.commit()
        time.sleep(0.01)
        threading.current_thread().name = "B"
        try:
            outcome["B"] = tasks.run(jid, settings)
        finally:
            threading.current_thread().name = "MainThread"
        if outcome["B"] != "noop":
            break
    a.join(timeout=60)
    assert not a.is_alive()
    elapsed = time.monotonic() - t0

    assert outcome == {"A": "lost", "B": "succeeded"}, outcome
    job = repo.get_job(sm, job_id=jid)
    assert job is not None and job.status == "succeeded" and job.attempt == 2
    assert 1 in {att for _, att in refused}  # A kept training and tried to write: refused
    assert all(attempt == 1 for who, _, attempt in writes if who == "A"), writes
    assert [w for w in writes if w[:2] == ("A", "export")] == []
    assert [w[1] for w in writes if w[0] == "B"][-1] == "export"
    rows, distinct, seqs = _event_seqs(sm, jid)
    assert rows == distinct and seqs == list(range(1, rows + 1))
    with sm() as s:
        finished = s.scalar(
            select(func.count())
            .select_from(Event)
            .where(Event.job_id == jid, Event.type == "finished")
        )
    assert finished == 1
    assert [p.step for p in repo.metrics(sm, job_id=jid)] == list(range(1, 41))
    arts = repo.artifacts(sm, job_id=jid, kind="export")
    assert arts and all(tasks.file_sha256(settings.data_dir / x.path) == x.sha256 for x in arts)
    print(f"two workers, one writer: {elapsed:.1f} s, A refused {len(refused)} batch(es)")
    sm.kw["bind"].dispose()


# ---- 2. no orphan -------------------------------------------------------------------------------
def test_unsent_jobs_rule(sm: sessionmaker[Session]) -> None:
    """Queued and never sent: due after the grace period. Sent: due again only once the grace
    period passed while nothing runs on its queue. Cancelled or running: never."""
    jid = _job(sm)
    now = utcnow()
    assert repo.unsent_jobs(sm, grace_s=60, now=now) == []  # a submit may still be sending it
    assert repo.unsent_jobs(sm, grace_s=60, now=now + timedelta(seconds=61)) == [jid]
    assert repo.mark_sent(sm, job_id=jid, task_id="t1")
    assert repo.get_job(sm, job_id=jid).celery_task_id == "t1"  # type: ignore[union-attr]
    assert repo.unsent_jobs(sm, grace_s=60, now=now + timedelta(seconds=30)) == []
    later = utcnow() + timedelta(seconds=61)
    assert repo.unsent_jobs(sm, grace_s=60, now=later) == [jid]  # idle queue: message lost
    busy = _job(sm)
    assert repo.claim_job(sm, job_id=busy, worker_id="w", ttl_s=3600)
    assert repo.unsent_jobs(sm, grace_s=60, now=later) == []  # a worker is busy: it waits
    other_queue = _job(sm, queue="cpu")
    assert repo.unsent_jobs(sm, grace_s=60, now=later) == [other_queue]
    assert repo.request_cancel(sm, job_id=other_queue) == "cancelled"
    assert repo.unsent_jobs(sm, grace_s=60, now=later) == []
    assert not repo.mark_sent(sm, job_id=busy)  # running: nothing to record


def test_reaper_sends_what_was_never_sent(sm: sessionmaker[Session], db_url: str) -> None:
    """A job whose submit-time send failed, and one whose re-queue send failed, are sent by a
    later reaper pass once the grace period is over; a successful send is not repeated."""
    from worker.lease import Reaper

    sent: list[str] = []
    broker_up = [False]

    def send(session: Any, job_id: str) -> None:
        if not broker_up[0]:
            raise ConnectionError("broker down")
        sent.append(job_id)
        repo.mark_sent(session, job_id=job_id)

    grace = 60.0  # far longer than any pass takes: rows are aged explicitly below, no sleeps
    reaper = Reaper(db_url, period_s=0.1, requeue=send, resend_s=grace)
    never_sent = _job(sm)
    orphan = _job(sm)
    t0 = utcnow()
    assert repo.claim_job(sm, job_id=orphan, worker_id="dead", ttl_s=0.1, now=t0)
    time.sleep(0.2)
    assert reaper.reap_once() == [orphan]  # re-queued; its send failed
    job = repo.get_job(sm, job_id=orphan)
    assert job is not None and job.status == "queued" and job.sent_at is None
    assert sent == []
    broker_up[0] = True
    reaper.reap_once()
    assert sent == []  # within the grace period: a submit may still be sending them

    def age(seconds: float) -> None:  # as if `seconds` passed since the rows last changed
        with sm() as s:
            ago = utcnow() - timedelta(seconds=seconds)
            s.execute(update(Job).where(Job.id.in_([never_sent, orphan])).values(updated_at=ago))
            s.commit()

    age(grace / 2)
    reaper.reap_once()
    assert sent == []  # the orphan's grace period runs from its re-queue, not its creation
    age(grace + 1)
    reaper.reap_once()
    assert sorted(sent) == sorted([never_sent, orphan])
    reaper.reap_once()
    assert len(sent) == 2  # sent now: not again within the grace period


def test_generation_lease_reap_and_fencing(sm: sessionmaker[Session]) -> None:
    """A generation whose worker dies is re-queued after its lease expires (and re-sent), then
    failed once its attempts are used up; a stale worker cannot finish it."""
    jid = _job(sm, owner="alice")
    gen = repo.create_generation(
        sm,
        job_id=jid,
        owner="alice",
        prompt="Hi",
        max_new_tokens=4,
        temperature=0.0,
        max_attempts=2,
    )
    t0 = utcnow()
    a = repo.start_generation(sm, gen_id=gen.id, worker_id="a", ttl_s=5, now=t0)
    assert a is not None and a.status == "running" and a.attempt == 1 and a.lease_owner == "a"
    assert repo.start_generation(sm, gen_id=gen.id, worker_id="b", ttl_s=5, now=t0) is None
    lease_a = repo.Lease.of(a)
    assert repo.heartbeat_generation(
        sm, gen_id=gen.id, lease=lease_a, ttl_s=5, now=t0 + timedelta(seconds=4)
    )
    assert repo.reap_generations(sm, now=t0 + timedelta(seconds=8)) == []  # renewed to t0+9
    assert repo.reap_generations(sm, now=t0 + timedelta(seconds=10)) == [gen.id]
    row = repo.get_generation(sm, gen_id=gen.id)
    assert row is not None and row.status == "queued" and row.sent_at is None
    later = utcnow() + timedelta(seconds=61)
    assert repo.unsent_generations(sm, grace_s=60, now=later) == [gen.id]
    assert repo.mark_generation_sent(sm, gen_id=gen.id)
    assert repo.unsent_generations(sm, grace_s=60, now=utcnow()) == []
    b = repo.start_generation(
        sm, gen_id=gen.id, worker_id="a", ttl_s=5, now=t0 + timedelta(seconds=11)
    )
    assert b is not None and b.attempt == 2
    assert not repo.finish_generation(
        sm, gen_id=gen.id, status="succeeded", output="x", lease=lease_a
    )
    assert not repo.heartbeat_generation(sm, gen_id=gen.id, lease=lease_a, ttl_s=5)
    # attempt 2 dies too: out of attempts -> failed, not re-queued
    assert repo.reap_generations(sm, now=t0 + timedelta(seconds=30)) == []
    row = repo.get_generation(sm, gen_id=gen.id)
    assert row is not None and row.status == "failed" and row.attempt == 2
    assert row.output is None and "gave up" in (row.error_message or "")
    assert not repo.finish_generation(
        sm, gen_id=gen.id, status="succeeded", output="late", lease=repo.Lease.of(b)
    )

    ok = repo.create_generation(
        sm, job_id=jid, owner="alice", prompt="Hi", max_new_tokens=4, temperature=0.0
    )
    c = repo.start_generation(sm, gen_id=ok.id, worker_id="c", ttl_s=5)
    assert c is not None
    assert repo.finish_generation(
        sm, gen_id=ok.id, status="succeeded", output=" there", lease=repo.Lease.of(c)
    )
    done = repo.get_generation(sm, gen_id=ok.id)
    assert done is not None and done.output == " there" and done.lease_expires_at is None
    with sm() as s:
        assert s.scalar(text("SELECT count(*) FROM generations")) == 2
        assert s.scalar(select(func.max(Generation.attempt))) == 2
