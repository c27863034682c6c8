"""The job store (db/): status machine, leases, event recording, owner isolation and SQLite
contention, each on SQLite (a temp file) and PostgreSQL (a fresh schema per test; skipped
only when the server cannot be reached)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # db/ is a top-level package next to efficientllm/
    sys.path.insert(0, str(ROOT))

from sqlalchemy import Engine, text  # noqa: E402
from sqlalchemy.exc import OperationalError  # noqa: E402
from sqlalchemy.orm import Session, sessionmaker  # noqa: E402
from worker_util import pg_schema, pg_unreachable  # noqa: E402

from db import repo  # noqa: E402
from db.engine import make_engine, session_factory, upgrade_to_head  # noqa: E402
from db.models import utcnow  # noqa: E402
from efficientllm.shape import LayerShape, ModelShape  # noqa: E402
from efficientllm.training.events import (  # noqa: E402
    CheckpointSaved,
    Evaluated,
    Finished,
    PhaseChanged,
    Pruned,
    RunStarted,
    StepMetrics,
)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty database: a SQLite file, or a throwaway PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'jobs.db'}"
        return
    reason = pg_unreachable()
    if reason:
        pytest.skip(reason)
    with pg_schema() as url:
        yield url


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    eng = make_engine(db_url)
    upgrade_to_head(eng)
    yield eng
    eng.dispose()


@pytest.fixture
def sm(engine: Engine) -> sessionmaker[Session]:
    return session_factory(engine)


def _job(sm: sessionmaker[Session], **kw: Any) -> str:
    kw.setdefault("config", {"model": {"source": "tiny"}, "budget": {"params": 1000}})
    kw.setdefault("owner", "alice")
    kw.setdefault("name", "run")
    return repo.create_job(sm, **kw).id


# ---- status machine --------------------------------------------------------------------------
def test_create_get_list(sm: sessionmaker[Session]) -> None:
    a = _job(sm, name="a")
    b = _job(sm, name="b", owner="bob")
    job = repo.get_job(sm, job_id=a)
    assert job is not None and job.status == "queued" and job.attempt == 0
    assert job.max_attempts == 3 and job.queue == "gpu" and job.config["budget"]["params"] == 1000
    assert len(job.id) == 32 and job.created_at.tzinfo is not None
    assert [j.id for j in repo.list_jobs(sm, owner="alice")] == [a]
    assert {j.id for j in repo.list_jobs(sm)} == {a, b}
    assert repo.get_job(sm, job_id="nope") is None


def test_terminal_states_are_absorbing(sm: sessionmaker[Session]) -> None:
    jid = _job(sm)
    job = repo.claim_job(sm, job_id=jid, worker_id="h:1", ttl_s=30)
    assert job is not None and job.status == "running" and job.attempt == 1
    assert job.lease_owner == "h:1" and job.started_at is not None
    assert repo.finish_job(sm, job_id=jid, worker_id="h:1", status="succeeded")
    assert not repo.finish_job(sm, job_id=jid, worker_id="h:1", status="succeeded")
    assert not repo.finish_job(sm, job_id=jid, worker_id="h:1", status="failed")
    assert repo.request_cancel(sm, job_id=jid) == "succeeded"
    assert not repo.heartbeat(sm, job_id=jid, worker_id="h:1", ttl_s=30)
    assert repo.claim_job(sm, job_id=jid, worker_id="h:2", ttl_s=30) is None
    far = utcnow() + timedelta(days=1)
    assert repo.reap_orphans(sm, now=far) == []
    job = repo.get_job(sm, job_id=jid)
    assert job is not None and job.status == "succeeded" and job.attempt == 1
    assert job.finished_at is not None and not repo.cancel_requested(sm, job_id=jid)
    with pytest.raises(ValueError):
        repo.finish_job(sm, job_id=jid, worker_id="h:1", status="queued")


def test_heartbeat_after_cancel_is_refused(sm: sessionmaker[Session]) -> None:
    jid = _job(sm)
    assert repo.claim_job(sm, job_id=jid, worker_id="w", ttl_s=30)
    assert repo.request_cancel(sm, job_id=jid) == "running"
    assert repo.cancel_requested(sm, job_id=jid)
    assert repo.heartbeat(sm, job_id=jid, worker_id="w", ttl_s=30)  # still ours until it stops
    assert repo.finish_job(sm, job_id=jid, worker_id="w", status="cancelled")
    assert not repo.heartbeat(sm, job_id=jid, worker_id="w", ttl_s=30)
    assert not repo.finish_job(sm, job_id=jid, worker_id="w", status="succeeded")
    assert repo.request_cancel(sm, job_id=jid) == "cancelled"
    assert repo.get_job(sm, job_id=jid).status == "cancelled"  # type: ignore[union-attr]


def test_only_one_of_two_workers_wins(sm: sessionmaker[Session]) -> None:
    jid = _job(sm)
    assert repo.claim_job(sm, job_id=jid, worker_id="a:1", ttl_s=30) is not None
    assert repo.claim_job(sm, job_id=jid, worker_id="b:2", ttl_s=30) is None
    assert repo.claim_job(sm, job_id=jid, worker_id="a:1", ttl_s=30) is None  # duplicate delivery
    assert not repo.heartbeat(sm, job_id=jid, worker_id="b:2", ttl_s=30)
    assert not repo.finish_job(sm, job_id=jid, worker_id="b:2", status="failed")
    job = repo.get_job(sm, job_id=jid)
    assert job is not None and job.lease_owner == "a:1" and job.attempt == 1


def _race_claim(sm: sessionmaker[Session], jid: str, n: int) -> list[str]:
    """``n`` threads, each with its own session, claim ``jid`` at once; returns the winners."""
    barrier = threading.Barrier(n)
    winners: list[str] = []
    errors: list[BaseException] = []

    def claim(worker: str) -> None:
        try:
            with sm() as s:
                barrier.wait(timeout=10)
                if repo.claim_job(s, job_id=jid, worker_id=worker, ttl_s=30) is not None:
                    winners.append(worker)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=claim, args=(f"w:{i}",)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors, errors
    return winners


def test_claim_race_between_threads(sm: sessionmaker[Session]) -> None:
    """8 threads with their own sessions claim the same job at once: exactly one wins."""
    for _ in range(3):
        jid = _job(sm)
        winners = _race_claim(sm, jid, 8)
        assert len(winners) == 1
        job = repo.get_job(sm, job_id=jid)
        assert job is not None and job.lease_owner == winners[0] and job.attempt == 1


def test_lease_expiry_reap_and_reclaim(sm: sessionmaker[Session]) -> None:
    jid = _job(sm)
    t0 = utcnow()
    assert repo.claim_job(sm, job_id=jid, worker_id="a", ttl_s=5, now=t0)
    assert repo.reap_orphans(sm, now=t0 + timedelta(seconds=4)) == []
    assert repo.heartbeat(sm, job_id=jid, worker_id="a", ttl_s=5, now=t0 + timedelta(seconds=4))
    assert repo.reap_orphans(sm, now=t0 + timedelta(seconds=8)) == []  # renewed until t0+9
    assert repo.reap_orphans(sm, now=t0 + timedelta(seconds=10)) == [jid]
    job = repo.get_job(sm, job_id=jid)
    assert job is not None and job.status == "queued" and job.lease_expires_at is None
    assert repo.queue_position(sm, job_id=jid) == 1
    job = repo.claim_job(sm, job_id=jid, worker_id="b", ttl_s=5, now=t0 + timedelta(seconds=11))
    assert job is not None and job.attempt == 2 and job.lease_owner == "b"
    assert job.started_at is not None and job.started_at <= t0 + timedelta(seconds=1)
    assert not repo.heartbeat(sm, job_id=jid, worker_id="a", ttl_s=5)  # the old worker stops
    assert not repo.finish_job(sm, job_id=jid, worker_id="a", status="succeeded")
    assert repo.finish_job(sm, job_id=jid, worker_id="b", status="succeeded")


def test_expired_lease_can_be_claimed_directly(sm: sessionmaker[Session]) -> None:
    """A redelivered task may find its predecessor's lease expired before the reaper runs."""
    jid = _job(sm)
    t0 = utcnow()
    assert repo.claim_job(sm, job_id=jid, worker_id="a", ttl_s=5, now=t0)
    assert (
        repo.claim_job(sm, job_id=jid, worker_id="b", ttl_s=5, now=t0 + timedelta(seconds=3))
        is None
    )
    job = repo.claim_job(sm, job_id=jid, worker_id="b", ttl_s=5, now=t0 + timedelta(seconds=6))
    assert job is not None and job.attempt == 2


def test_max_attempts_then_failed(sm: sessionmaker[Session]) -> None:
    jid = _job(sm, max_attempts=2)
    t = utcnow()
    for attempt in (1, 2):
        job = repo.claim_job(sm, job_id=jid, worker_id=f"w{attempt}", ttl_s=5, now=t)
        assert job is not None and job.attempt == attempt
        t += timedelta(seconds=10)
        expected = [jid] if attempt == 1 else []
        assert repo.reap_orphans(sm, now=t) == expected
    job = repo.get_job(sm, job_id=jid)
    assert job is not None and job.status == "failed" and job.error_code == "max_attempts"
    assert job.attempt == 2 and "\n" not in (job.error_message or "")
    assert repo.claim_job(sm, job_id=jid, worker_id="w3", ttl_s=5, now=t) is None

    # the same limit when the expired job is claimed before the reaper sees it
    jid = _job(sm, max_attempts=1)
    assert repo.claim_job(sm, job_id=jid, worker_id="w", ttl_s=5, now=t)
    later = t + timedelta(seconds=10)
    assert repo.claim_job(sm, job_id=jid, worker_id="v", ttl_s=5, now=later) is None
    job = repo.get_job(sm, job_id=jid)
    assert job is not None and job.status == "failed" and job.error_code == "max_attempts"


def test_cancel_queued_never_starts(sm: sessionmaker[Session]) -> None:
    first, jid = _job(sm), _job(sm)
    assert repo.queue_position(sm, job_id=jid) == 2
    assert repo.request_cancel(sm, job_id=jid, owner="alice") == "cancelled"
    assert repo.request_cancel(sm, job_id=jid) == "cancelled"  # idempotent
    assert repo.claim_job(sm, job_id=jid, worker_id="w", ttl_s=5) is None
    job = repo.get_job(sm, job_id=jid)
    assert job is not None and job.status == "cancelled" and job.started_at is None
    assert job.attempt == 0 and repo.cancel_requested(sm, job_id=jid)
    assert repo.queue_position(sm, job_id=jid) is None
    assert repo.queue_position(sm, job_id=first) == 1


def test_cancel_running_is_cooperative(sm: sessionmaker[Session]) -> None:
    jid = _job(sm)
    t0 = utcnow()
    assert repo.claim_job(sm, job_id=jid, worker_id="w", ttl_s=5, now=t0)
    assert not repo.cancel_requested(sm, job_id=jid)
    assert repo.request_cancel(sm, job_id=jid) == "running"
    assert repo.request_cancel(sm, job_id=jid) == "running"
    assert repo.cancel_requested(sm, job_id=jid)
    # the worker dies instead of stopping: the reaper finishes the cancel, it is not requeued
    assert repo.reap_orphans(sm, now=t0 + timedelta(seconds=10)) == []
    job = repo.get_job(sm, job_id=jid)
    assert job is not None and job.status == "cancelled" and job.attempt == 1


def test_owner_isolation(sm: sessionmaker[Session]) -> None:
    jid = _job(sm, owner="alice")
    assert repo.get_job(sm, job_id=jid, owner="bob") is None
    assert repo.get_job(sm, job_id=jid, owner="alice") is not None
    assert repo.request_cancel(sm, job_id=jid, owner="bob") is None
    assert repo.get_job(sm, job_id=jid).status == "queued"  # type: ignore[union-attr]
    assert repo.list_jobs(sm, owner="bob") == []
    assert repo.request_cancel(sm, job_id="missing") is None


def test_generation_lifecycle(sm: sessionmaker[Session]) -> None:
    """The Playground's rows: queued -> running (once) -> succeeded/failed (absorbing),
    owner-checked like jobs, deleted with their job."""
    jid = _job(sm, owner="alice")
    with pytest.raises(LookupError):
        repo.create_generation(
            sm, job_id=jid, owner="bob", prompt="x", max_new_tokens=4, temperature=0.0
        )
    gen = repo.create_generation(
        sm, job_id=jid, owner="alice", prompt="Once", max_new_tokens=8, temperature=0.7
    )
    assert gen.status == "queued" and gen.output is None and gen.created_at.tzinfo is not None
    assert repo.get_generation(sm, gen_id=gen.id, owner="bob") is None
    assert repo.get_generation(sm, gen_id="missing") is None
    assert repo.finish_generation(sm, gen_id=gen.id, status="succeeded", output="no") is False
    started = repo.start_generation(sm, gen_id=gen.id)
    assert started is not None and started.status == "running" and started.prompt == "Once"
    assert repo.start_generation(sm, gen_id=gen.id) is None  # a duplicate delivery: no-op
    assert repo.finish_generation(sm, gen_id=gen.id, status="succeeded", output=" upon a time")
    assert not repo.finish_generation(sm, gen_id=gen.id, status="failed", error_message="late")
    done = repo.get_generation(sm, gen_id=gen.id, owner="alice")
    assert done is not None and done.status == "succeeded" and done.output == " upon a time"
    assert done.finished_at is not None and done.error_message is None
    assert (done.max_new_tokens, done.temperature) == (8, 0.7)

    bad = repo.create_generation(
        sm, job_id=jid, owner="alice", prompt="x", max_new_tokens=1, temperature=0.0
    )
    msg = "the export is missing\nTraceback (most recent call last):\n  ..."
    assert repo.finish_generation(sm, gen_id=bad.id, status="failed", error_message=msg)
    assert repo.start_generation(sm, gen_id=bad.id) is None  # failed before it started
    row = repo.get_generation(sm, gen_id=bad.id)
    assert row is not None and row.error_message == "the export is missing" and row.output is None
    with pytest.raises(ValueError):
        repo.finish_generation(sm, gen_id=bad.id, status="running")

    with sm() as s:  # ON DELETE CASCADE with the job
        s.execute(text("DELETE FROM jobs WHERE id = :id"), {"id": jid})
        s.commit()
    assert repo.get_generation(sm, gen_id=gen.id) is None


def test_error_message_is_one_line(sm: sessionmaker[Session]) -> None:
    jid = _job(sm)
    assert repo.claim_job(sm, job_id=jid, worker_id="w", ttl_s=5)
    msg = "loss became nan at step 7; lower train.lr\nTraceback (most recent call last):\n  ..."
    assert repo.finish_job(
        sm,
        job_id=jid,
        worker_id="w",
        status="failed",
        error_code="non_finite_loss",
        error_message=msg,
    )
    job = repo.get_job(sm, job_id=jid)
    assert job is not None and job.error_message == "loss became nan at step 7; lower train.lr"
    assert job.error_code == "non_finite_loss"


def test_accepts_session_or_sessionmaker(sm: sessionmaker[Session]) -> None:
    with sm() as s:
        jid = repo.create_job(s, config={}, owner="o", name="n").id
        assert repo.claim_job(s, job_id=jid, worker_id="w", ttl_s=5) is not None
        assert repo.heartbeat(s, job_id=jid, worker_id="w", ttl_s=5)
    job = repo.get_job(sm, job_id=jid)
    assert job is not None and job.status == "running"


# ---- events ----------------------------------------------------------------------------------
def _shape(ffn: list[int]) -> dict[str, Any]:
    layers = tuple(LayerShape(num_heads=4, num_kv_heads=2, intermediate_size=f) for f in ffn)
    return ModelShape(
        family="llama",
        vocab_size=256,
        hidden_size=32,
        head_dim=8,
        layers=layers,
        tie_word_embeddings=True,
    ).to_dict()


def _run_events(
    first: int, last: int, *, resumed_from: int | None = None, loss0: float = 5.0
) -> list[dict[str, Any]]:
    """What a 10-step run emits: started, steps (prune at 5), eval, phase, finished."""
    tps = 128  # tokens per step
    src = _shape([64, 64])
    out: list[Any] = [
        RunStarted(
            step=first - 1,
            tokens=(first - 1) * tps,
            source_params=20000,
            budget=15000,
            total_steps=10,
            prune_end_step=5,
            shape=src,
            config={"seed": 0},
            resumed_from=resumed_from,
        )
    ]
    for step in range(first, last + 1):
        params = 20000 if step < 5 else 15000
        if step == 5:
            out.append(
                Pruned(
                    step=5,
                    tokens=5 * tps,
                    params_before=20000,
                    params_after=15000,
                    target_params=15000,
                    removed={"ffn": 48},
                    saliency={"ffn": 0.4, "heads": 0.7},
                    shape=_shape([40, 40]),
                )
            )
        out.append(
            StepMetrics(
                step=step,
                tokens=step * tps,
                phase="prune" if step <= 5 else "recovery",
                loss=loss0 - 0.1 * step,
                lr=1e-3,
                params=params,
                target_params=15000,
                tokens_per_s=1280.0,
            )
        )
        if step == 5:
            out.append(
                Evaluated(
                    step=5,
                    tokens=5 * tps,
                    phase="prune",
                    label="after_pruning",
                    ppl=40.0,
                    loss=3.7,
                    protocol="heldout",
                )
            )
            out.append(PhaseChanged(step=5, tokens=5 * tps, phase="recovery"))
            out.append(CheckpointSaved(step=5, tokens=5 * tps, path="ckpt/step-5"))
    if last == 10:
        out.append(
            Evaluated(
                step=10,
                tokens=10 * tps,
                phase="recovery",
                label="final",
                ppl=30.0,
                loss=3.4,
                protocol="heldout",
            )
        )
        out.append(Finished(step=10, tokens=10 * tps, params=15000, shape=_shape([40, 40])))
    return [e.to_dict() for e in out]


def test_record_events_derives_rows(sm: sessionmaker[Session]) -> None:
    jid = _job(sm)
    assert repo.claim_job(sm, job_id=jid, worker_id="w", ttl_s=30)
    events = _run_events(1, 7)
    last = repo.record_events(sm, job_id=jid, events=events)
    job = repo.get_job(sm, job_id=jid)
    assert job is not None and job.step == 7 and job.tokens == 7 * 128
    assert job.total_steps == 10 and job.budget == 15000 and job.source_params == 20000
    assert job.params == 15000 and job.phase == "recovery" and job.last_checkpoint_step == 5
    assert job.eta_seconds == pytest.approx(3 * 128 / 1280.0)
    more = _run_events(8, 10)[1:]  # the same run continues (no second 'started')
    last = repo.record_events(sm, job_id=jid, events=more)
    assert last == len(events) + len(more)

    pts = repo.metrics(sm, job_id=jid)
    assert [p.step for p in pts] == list(range(1, 11))
    assert pts[0].loss == pytest.approx(4.9) and pts[-1].loss == pytest.approx(4.0)
    assert pts[4].params == 15000 and pts[3].params == 20000 and pts[-1].phase == "recovery"
    assert pts[0].tokens == 128 and pts[0].tokens_per_s == 1280.0 and pts[0].time is not None

    snaps = repo.snapshots(sm, job_id=jid)
    assert [(s.kind, s.step) for s in snaps] == [("source", 0), ("pruned", 5), ("final", 10)]
    assert [s.seq for s in snaps] == [1, 2, 3]
    assert snaps[0].shape["layers"][0]["intermediate_size"] == 64 and snaps[0].params == 20000
    assert snaps[1].shape["layers"][1] == {
        "num_heads": 4,
        "num_kv_heads": 2,
        "intermediate_size": 40,
    }
    assert snaps[1].removed == {"ffn": 48} and snaps[1].saliency == {"ffn": 0.4, "heads": 0.7}
    assert snaps[2].params == 15000 and snaps[2].shape["hidden_size"] == 32

    evs = [(e.step, e.label, e.ppl) for e in repo.evals(sm, job_id=jid)]
    assert evs == [(5, "after_pruning", 40.0), (10, "final", 30.0)]

    page1 = repo.events_after(sm, job_id=jid, cursor=0, limit=5)
    assert [e.seq for e in page1] == [1, 2, 3, 4, 5] and page1[0].type == "started"
    assert page1[0].payload["shape"]["vocab_size"] == 256
    page2 = repo.events_after(sm, job_id=jid, cursor=page1[-1].seq)
    assert [e.seq for e in page2] == list(range(6, last + 1))
    assert page2[-1].type == "finished" and page2[-1].payload == (events + more)[-1]
    assert repo.events_after(sm, job_id=jid, cursor=last) == []

    job = repo.get_job(sm, job_id=jid)
    assert job is not None and job.step == 10 and job.eta_seconds == 0.0


def test_resumed_attempt_does_not_duplicate(sm: sessionmaker[Session]) -> None:
    jid = _job(sm)
    t0 = utcnow()
    assert repo.claim_job(sm, job_id=jid, worker_id="a", ttl_s=5, now=t0)
    first = _run_events(1, 10)
    repo.record_events(sm, job_id=jid, events=first)
    n_snaps = len(repo.snapshots(sm, job_id=jid))
    # the worker died; attempt 2 resumes from the checkpoint at step 5 and re-reports 6..10
    assert repo.reap_orphans(sm, now=t0 + timedelta(seconds=10)) == [jid]
    assert repo.claim_job(sm, job_id=jid, worker_id="b", ttl_s=5, now=t0 + timedelta(seconds=11))
    again = _run_events(6, 10, resumed_from=5, loss0=6.0)
    last = repo.record_events(sm, job_id=jid, events=again)
    assert last == len(first) + len(again)  # the event log is append-only

    pts = repo.metrics(sm, job_id=jid)
    assert [p.step for p in pts] == list(range(1, 11))
    assert pts[4].loss == pytest.approx(4.5)  # step 5: untouched
    assert pts[5].loss == pytest.approx(5.4)  # step 6: the newest report wins
    assert len(repo.snapshots(sm, job_id=jid)) == n_snaps  # source kept once, final updated
    assert len(repo.evals(sm, job_id=jid)) == 2
    job = repo.get_job(sm, job_id=jid)
    assert job is not None and job.resumed_from_step == 5 and job.attempt == 2

    # re-recording the very same batch (a flush retried after a timeout) adds no metric rows
    repo.record_events(sm, job_id=jid, events=again)
    assert len(repo.metrics(sm, job_id=jid)) == 10


def test_non_finite_values_are_stored_as_null(sm: sessionmaker[Session]) -> None:
    jid = _job(sm)
    ev = StepMetrics(
        step=1,
        tokens=8,
        phase="prune",
        loss=float("nan"),
        lr=float("inf"),
        params=10,
        target_params=10,
        tokens_per_s=0.0,
    ).to_dict()
    repo.record_events(sm, job_id=jid, events=[ev])
    (pt,) = repo.metrics(sm, job_id=jid)
    assert pt.loss is None and pt.lr is None
    (e,) = repo.events_after(sm, job_id=jid, cursor=0)
    assert e.payload["loss"] is None and e.payload["step"] == 1
    with pytest.raises(LookupError):
        repo.record_events(sm, job_id="missing", events=[ev])


def test_artifacts_and_checkpoint(sm: sessionmaker[Session]) -> None:
    jid = _job(sm)
    a = repo.add_artifact(
        sm, job_id=jid, kind="export", path=f"{jid}/export", size_bytes=10, sha256="0" * 64
    )
    b = repo.add_artifact(
        sm, job_id=jid, kind="export", path=f"{jid}/export", size_bytes=12, sha256="1" * 64
    )
    assert a.id == b.id and b.size_bytes == 12 and b.sha256 == "1" * 64
    repo.add_artifact(
        sm, job_id=jid, kind="checkpoint", path=f"{jid}/ckpt/step-5", size_bytes=3, sha256="2" * 64
    )
    assert [x.kind for x in repo.artifacts(sm, job_id=jid)] == ["export", "checkpoint"]
    assert len(repo.artifacts(sm, job_id=jid, kind="export")) == 1
    for bad in ("/etc/passwd", "../x", f"{jid}/../../x", "", "."):
        with pytest.raises(ValueError):
            repo.add_artifact(
                sm, job_id=jid, kind="export", path=bad, size_bytes=1, sha256="0" * 64
            )
    repo.set_checkpoint(sm, job_id=jid, step=15)
    assert repo.get_job(sm, job_id=jid).last_checkpoint_step == 15  # type: ignore[union-attr]


# ---- SQLite contention -----------------------------------------------------------------------
def test_sqlite_contention(tmp_path: Path) -> None:
    """A worker (heartbeat + events at ~20 Hz), a poller (~50 Hz) and a reaper (~5 Hz), each
    with its own engine, for 3 s: no 'database is locked', bounded write latency."""
    url = f"sqlite:///{tmp_path / 'busy.db'}"
    upgrade_to_head(url)
    engines = [make_engine(url) for _ in range(3)]
    w_sm, r_sm, g_sm = (session_factory(e) for e in engines)
    jid = _job(w_sm)
    assert repo.claim_job(w_sm, job_id=jid, worker_id="w", ttl_s=60)
    stop = time.monotonic() + 3.0
    errors: list[str] = []
    write_ms: list[float] = []
    reads = [0]

    def guarded(fn: Any) -> Any:
        def run() -> None:
            try:
                fn()
            except OperationalError as exc:
                errors.append(str(exc.orig))
            except Exception as exc:
                errors.append(repr(exc))

        return run

    @guarded
    def worker() -> None:
        step = 0
        while time.monotonic() < stop:
            step += 1
            t = time.perf_counter()
            assert repo.heartbeat(w_sm, job_id=jid, worker_id="w", ttl_s=60)
            repo.record_events(
                w_sm,
                job_id=jid,
                events=[
                    StepMetrics(
                        step=step,
                        tokens=step,
                        phase="prune",
                        loss=1.0,
                        lr=1e-3,
                        params=1,
                        target_params=1,
                        tokens_per_s=1.0,
                    ).to_dict()
                ],
            )
            write_ms.append((time.perf_counter() - t) * 1000)
            time.sleep(0.05)

    @guarded
    def poller() -> None:
        cursor = 0
        while time.monotonic() < stop:
            repo.get_job(r_sm, job_id=jid)
            batch = repo.events_after(r_sm, job_id=jid, cursor=cursor)
            cursor = batch[-1].seq if batch else cursor
            repo.list_jobs(r_sm, owner="alice")
            reads[0] += 1
            time.sleep(0.02)

    @guarded
    def reaper() -> None:
        while time.monotonic() < stop:
            repo.reap_orphans(g_sm)
            time.sleep(0.2)

    threads = [threading.Thread(target=f) for f in (worker, poller, reaper)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    for e in engines:
        e.dispose()
    assert errors == []
    assert len(write_ms) >= 30 and reads[0] >= 60
    write_ms.sort()
    p99 = write_ms[int(0.99 * (len(write_ms) - 1))]
    assert p99 < 1000, f"p99 write latency {p99:.1f} ms"
