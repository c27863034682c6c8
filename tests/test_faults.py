"""Faults through the worker (docs/reliability.md R4, R5, R6, R9, R15): a real redis-server,
real ``celery worker -P prefork -c 1`` subprocesses, SQLite, the tiny model.

- R9: Redis shut down (AOF on) mid-job and started again on the same port 3 s later: the
  running job still succeeds, and a job submitted once Redis is back starts within 10 s.
- R4/R5/R6: the pool process exits (code 137, as a SIGKILL) during a checkpoint write, after a
  checkpoint's rename but before its DB record, and in the middle of the export; the retry
  resumes from the newest complete checkpoint with the same losses and succeeds, no artifact is
  registered for the incomplete export, and every artifact's sha256 equals its file.
- R15: Celery's soft time limit stops the job at a step boundary with a checkpoint and fails it
  ('time_limit', not retried); the hard limit kills the pool process and the reaper retries the
  job up to its attempt cap.

Each test starts its own worker (the fault and the limits are worker settings). Jobs are 20
steps with a checkpoint every 5, no distillation, no GGUF, and sleep ``FAULT_STEP_DELAY_S``
before each step so that they last long enough to be hit.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

import pytest

pytest.importorskip("celery", reason="worker extras not installed (pip install -e .[worker])")

from tiny import save_tiny_corpus, save_tiny_source  # noqa: E402
from worker_util import redis_server, start_stack, tiny_job_config, wait_for  # noqa: E402

from db import repo  # noqa: E402
from efficientllm.training.checkpoint import complete_checkpoints  # noqa: E402

TERMINAL = {"succeeded", "failed", "cancelled"}
STEPS = 20
# a killed attempt's lease must expire before the retry may claim the job: shorter than the
# suite's TTL of 5 s to keep these tests quick, with a heartbeat well inside it
FAST_REQUEUE = dict(lease_ttl_s=3.0, heartbeat_s=0.5)


@pytest.fixture(scope="module")
def job_config(tmp_path_factory: pytest.TempPathFactory) -> dict:
    d = tmp_path_factory.mktemp("fault_assets")
    src = save_tiny_source(d / "src", "llama_gqa_tied")
    docs = save_tiny_corpus(d / "corpus")
    cfg = tiny_job_config(src, docs, total_tokens=32 * 4 * STEPS, eval_tokens=128)
    cfg["distill"]["weight"] = 0.0
    cfg["export"]["gguf"] = "none"
    return cfg


@pytest.fixture(scope="module")
def redis(tmp_path_factory: pytest.TempPathFactory):
    with redis_server(tmp_path_factory.mktemp("redis")) as server:
        yield server


def _assert_artifacts_match(stack, job_id: str) -> None:
    """The export is registered, and every artifact exists with the recorded size and sha256."""
    arts = repo.artifacts(stack.sm, job_id=job_id)
    assert {Path(a.path).name for a in arts} >= {"model.safetensors", "config.json"}
    for a in arts:
        f = stack.settings.data_dir / a.path
        assert f.is_file(), a.path
        assert a.size_bytes == f.stat().st_size, a.path
        assert a.sha256 == hashlib.sha256(f.read_bytes()).hexdigest(), a.path


def _step_losses(stack, job_id: str) -> dict[int, list[float]]:
    """Every loss the job's attempts reported, by step (a resumed attempt repeats steps)."""
    out: dict[int, list[float]] = {}
    for e in repo.events_after(stack.sm, job_id=job_id, limit=100_000):
        if e.type == "step":
            out.setdefault(e.step, []).append(e.payload["loss"])
    return out


def _assert_clean_resume(stack, job_id: str, resumed_from: int) -> None:
    """One row per step; the steps redone after the resume have the very same losses; only
    complete checkpoints are left and no partial write."""
    assert [m.step for m in repo.metrics(stack.sm, job_id=job_id)] == list(range(1, STEPS + 1))
    losses = _step_losses(stack, job_id)
    assert sorted(losses) == list(range(1, STEPS + 1))
    redone = {s: v for s, v in losses.items() if len(v) > 1}
    assert all(s > resumed_from for s in redone), sorted(redone)
    for step, values in redone.items():  # deterministic CPU run: bitwise equal
        assert len(set(values)) == 1, (step, values)
    ckpts = stack.settings.runs_dir / job_id / "checkpoints"
    assert complete_checkpoints(ckpts) == sorted(ckpts.glob("step-*"))
    assert not list(ckpts.glob(".tmp-step-*"))
    run_dir = stack.settings.runs_dir / job_id
    assert not list(run_dir.glob(".export.*")), sorted(p.name for p in run_dir.iterdir())


# ---- R9: Redis restarted mid-job -------------------------------------------------------------
@pytest.mark.slow
def test_redis_restart_mid_job(job_config, tmp_path: Path, record_property) -> None:
    """R9: ``redis-cli shutdown`` while a job runs, the same server (AOF) back 3 s later: the
    running job ends succeeded (its pool process is cancelled on the connection loss, the reaper
    re-queues it, it resumes) and a job submitted after the restart starts within 10 s: the
    worker reconnects and consumes again (celery #8030, #9054, #10205)."""
    with redis_server(tmp_path / "redis") as server:
        stack = start_stack(tmp_path / "r9", redis_url=server.url(0), db_url=None)
        try:
            first = stack.submit(job_config, name="r9-running")
            wait_for(
                lambda: (stack.job(first).last_checkpoint_step or 0) >= 5,
                60,
                "the job's first checkpoint",
                interval=0.05,
            )
            server.shutdown()
            time.sleep(3)
            server.restart()
            t0 = time.monotonic()
            second = stack.submit(job_config, name="r9-after")
            job = stack.wait_started(second, 30, "the job submitted after the restart to start")
            delay = time.monotonic() - t0
            one = stack.wait_status(first, TERMINAL, 60)
            two = stack.wait_status(second, TERMINAL, 60)
            msg = (
                f"R9: the job submitted after the restart started {delay:.2f} s later; the"
                f" running job: {one.status} on attempt {one.attempt}"
                f" (resumed from step {one.resumed_from_step})"
            )
            print(msg)
            record_property("r9_start_after_restart_s", round(delay, 2))
            assert one.status == "succeeded", (one.error_message, stack.log_tail())
            assert two.status == "succeeded", (two.error_message, stack.log_tail())
            assert job.attempt == 1 and two.attempt == 1
            # cancelled on the connection loss (or not): no work lost beyond the checkpoint
            assert one.attempt == 1 or one.resumed_from_step == 5, msg
            assert delay < 10, msg
        finally:
            stack.stop()


# ---- R4, R5, R6: the pool process dies while writing --------------------------------------
def _attempts(stack, job_id: str) -> list[list]:
    """The job's events split per attempt (each attempt begins with a 'started' event)."""
    out: list[list] = []
    for e in repo.events_after(stack.sm, job_id=job_id, limit=100_000):
        if e.type == "started" or not out:
            out.append([])
        out[-1].append(e)
    return out


@pytest.mark.slow
def test_kill_at_each_write_point_then_resume(
    redis, job_config, tmp_path: Path, record_property
) -> None:
    """R4 + R5 + R6 on one job, one crash (exit 137, as a SIGKILL) per attempt:

    1. while checkpoint 10 is half written (model + optimizer only): the partial
       ``.tmp-step-*`` never counts and attempt 2 resumes from 5, the previous complete one;
    2. right after checkpoint 15 (attempt 2's second) is renamed into place, before its DB
       record: the filesystem is authoritative, attempt 3 resumes from 15 although the DB said
       10, and the DB is repaired;
    3. in the middle of the export (weights in the temporary folder; no tokenizer, not
       installed): until the retry succeeds no artifact is registered and the download 404s;
       attempt 4 resumes from 15, exports, removes the partial folder, and succeeds.

    Every step has its metrics although the sink batches events (a checkpoint flushes them
    before it exists: else the steps before checkpoint 15 were lost, as attempt 3 resumes past
    them); steps redone after a resume have bitwise the same losses; only complete checkpoints
    are left; every artifact's sha256 equals its file.
    """
    from app.context import AppContext
    from app.downloads import export_files

    stack = start_stack(
        tmp_path / "r4r5r6", redis_url=redis.url(1), db_url=None, step_delay_s=0.1,
        fault="ckpt_mid_write:2,after_rename:2,export_mid_write", max_attempts=4,
        event_flush_s=2.0,  # step events wait in the sink; the checkpoint must flush them
        **FAST_REQUEUE,
    )  # fmt: skip
    ctx = AppContext(
        sessions=stack.sm, data_dir=stack.settings.data_dir, users=None, max_upload_bytes=1
    )
    run_dir = stack.settings.runs_dir
    t0 = time.monotonic()
    try:
        job_id = stack.submit(job_config, name="r4r5r6")
        job = wait_for(
            lambda: ((j := stack.job(job_id)).attempt >= 4 or j.status in TERMINAL) and j,
            120,
            f"attempt 4 (worker log: {stack.log})",
            interval=0.02,
        )
        # R6: between the crash in the export and the retry's success
        assert job.status == "running", (job.status, job.error_message, stack.log_tail())
        partial = list((run_dir / job_id).glob(".export.tmp-*"))
        assert len(partial) == 1 and (partial[0] / "model.safetensors").is_file()
        assert not list(partial[0].glob("tokenizer*"))  # written after the weights
        assert not (run_dir / job_id / "export").exists()
        assert repo.artifacts(stack.sm, job_id=job_id) == []
        assert export_files(ctx, job_id=job_id, owner="local") == []
        assert stack.job(job_id).status == "running"  # the checks above ran before success
        job = stack.wait_status(job_id, TERMINAL, 60)
        seconds = time.monotonic() - t0
        assert job.status == "succeeded", (job.error_message, stack.log_tail())
        assert job.attempt == 4 and job.resumed_from_step == 15
        log = stack.log.read_text(errors="replace")
        for point in ("ckpt_mid_write:2", "after_rename:2", "export_mid_write"):
            assert log.count(f"FAULT {point}: exiting with 137") == 1, point
        attempts = _attempts(stack, job_id)
        assert [a[0].payload["resumed_from"] for a in attempts] == [None, 5, 15, 15]
        saved = [[e.step for e in a if e.type == "checkpoint"] for a in attempts]
        assert saved[0] == [5]  # R4: checkpoint 10 never completed
        assert saved[1] == [10]  # R5: checkpoint 15 was renamed, never recorded by attempt 2
        assert job.last_checkpoint_step == 15  # ... and the DB was repaired (attempt 3)
        assert saved[2] == [] and saved[3] == []  # resumed from 15, no checkpoint at 20
        assert [e.type for e in attempts[2]].count("exported") == 0
        _assert_clean_resume(stack, job_id, resumed_from=5)
        _assert_artifacts_match(stack, job_id)
        files = export_files(ctx, job_id=job_id, owner="local")
        assert {name for _, name in files} >= {"export/model.safetensors", "export/config.json"}
        print(f"R4+R5+R6: 3 crashes, 4 attempts, succeeded after {seconds:.1f} s")
        record_property("r4_r5_r6_seconds", round(seconds, 1))
    finally:
        stack.stop()


# ---- R15: Celery time limits -------------------------------------------------------------
@pytest.mark.slow
def test_soft_time_limit_checkpoints_and_fails(redis, job_config, tmp_path: Path) -> None:
    """R15 (soft): past EFFICIENTLLM_SOFT_TIME_LIMIT_S the job stops at a step boundary, keeps
    a complete checkpoint of the step it reached, and ends failed('time_limit') on attempt 1;
    it is not retried."""
    soft = 4.0
    stack = start_stack(
        tmp_path / "soft", redis_url=redis.url(4), db_url=None, step_delay_s=0.5,
        soft_time_limit_s=soft, time_limit_s=60.0, **FAST_REQUEUE,
    )  # fmt: skip
    config = {**job_config, "train": {**job_config["train"], "checkpoint_every": 0}}
    try:
        job_id = stack.submit(config, name="soft")  # no periodic checkpoints: only the stop's
        job = stack.wait_status(job_id, TERMINAL, 60)
        log = stack.log.read_text(errors="replace")
        assert job.status == "failed" and job.error_code == "time_limit", (
            job.error_message,
            stack.log_tail(),
        )
        assert f"Soft time limit ({soft}s) exceeded" in log
        assert job.attempt == 1 and job.step < STEPS
        ckpts = complete_checkpoints(stack.settings.runs_dir / job_id / "checkpoints")
        assert [p.name for p in ckpts] == [f"step-{job.step:06d}"]
        assert job.last_checkpoint_step == job.step
        assert f"stopped at step {job.step} with a checkpoint" in job.error_message
        time.sleep(stack.settings.lease_ttl_s + 2 * stack.settings.reaper_s)
        again = stack.job(job_id)
        assert again.status == "failed" and again.attempt == 1  # not retried
        assert "Hard time limit" not in stack.log.read_text(errors="replace")
    finally:
        stack.stop()


@pytest.mark.slow
def test_hard_time_limit_kills_and_retries_to_the_cap(
    redis, job_config, tmp_path: Path, record_property
) -> None:
    """R15 (hard): past EFFICIENTLLM_TIME_LIMIT_S (no soft limit here, as if the soft stop hung)
    Celery kills the pool process; its message is acked, so the DB lease decides: the reaper
    re-queues the job after the TTL, and at the attempt cap (2) it ends failed('max_attempts')."""
    hard = 3.0
    stack = start_stack(
        tmp_path / "hard", redis_url=redis.url(5), db_url=None, step_delay_s=0.5,
        max_attempts=2, time_limit_s=hard, **FAST_REQUEUE,
    )  # fmt: skip
    try:
        t0 = time.monotonic()
        job_id = stack.submit(job_config, name="hard")
        job = stack.wait_status(job_id, TERMINAL, 60)
        seconds = time.monotonic() - t0
        log = stack.log.read_text(errors="replace")
        assert job.status == "failed" and job.error_code == "max_attempts", (
            job.error_message,
            stack.log_tail(),
        )
        assert job.attempt == 2 and job.step < STEPS
        kills = re.findall(rf"Hard time limit \({hard}s\) exceeded", log)
        assert len(kills) == 2, stack.log_tail()
        assert f"reaper: job {job_id} lost its worker" in log
        print(f"R15 hard: 2 attempts killed at {hard:g} s each, failed after {seconds:.1f} s")
        record_property("r15_hard_failed_after_s", round(seconds, 1))
    finally:
        stack.stop()


# ---- fast unit checks --------------------------------------------------------------------------
def test_fault_points_per_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    """``FAULT`` lists one point per attempt; ``point:n`` fires the n-th time it is reached;
    nothing outside APP_ENV=test."""
    import worker.tasks
    from worker.settings import Settings
    from worker.tasks import fault_point, make_fault

    test = Settings(fault="ckpt_mid_write:2,after_rename,,export_mid_write", app_env="test")
    points = [fault_point(test, a) for a in range(1, 6)]
    assert points == ["ckpt_mid_write:2", "after_rename", None, "export_mid_write", None]
    assert make_fault(Settings(fault="export_mid_write"), 1) is None  # production: ignored
    assert make_fault(Settings(fault="always_kill", app_env="test"), 1) is None

    def fake_exit(code: int) -> None:
        raise SystemExit(code)

    monkeypatch.setattr(worker.tasks.os, "_exit", fake_exit)
    hook = make_fault(test, 1)
    hook("ckpt_mid_write")  # the first time: no exit
    hook("after_rename")  # another point: no exit
    with pytest.raises(SystemExit, match="137"):
        hook("ckpt_mid_write")  # the second time


def test_time_limit_settings() -> None:
    from worker.settings import Settings

    s = Settings.from_env(
        {"EFFICIENTLLM_SOFT_TIME_LIMIT_S": "30", "EFFICIENTLLM_TIME_LIMIT_S": "60"}
    )
    assert (s.soft_time_limit_s, s.time_limit_s) == (30.0, 60.0)
    assert Settings.from_env(s.env()).time_limit_s == 60.0
    assert Settings.from_env({}).soft_time_limit_s is None
    with pytest.raises(ValueError, match="must be below"):
        Settings.from_env({"EFFICIENTLLM_SOFT_TIME_LIMIT_S": "9", "EFFICIENTLLM_TIME_LIMIT_S": "9"})
    with pytest.raises(ValueError, match="time limits must be > 0"):
        Settings.from_env({"EFFICIENTLLM_TIME_LIMIT_S": "0"})
    from worker.celery_app import make_app

    app = make_app(Settings(data_dir=Path("/tmp"), soft_time_limit_s=5, time_limit_s=9))
    assert (app.conf.task_soft_time_limit, app.conf.task_time_limit) == (5, 9)
    assert app.conf.broker_connection_max_retries is None


def test_soft_limit_signal_becomes_a_stop_flag() -> None:
    """In a pool child (billiard's SIGUSR1 handler installed) the soft limit only sets the stop
    flag inside ``soft_time_limit_stop``; billiard's handler is back afterwards. Elsewhere the
    handler is left alone."""
    import os
    import signal
    import threading

    from billiard.exceptions import SoftTimeLimitExceeded
    from billiard.pool import soft_timeout_sighandler

    from worker.tasks import soft_time_limit_stop

    class Hb:
        flag = threading.Event()

    original = signal.getsignal(signal.SIGUSR1)
    try:
        with soft_time_limit_stop(Hb()) as expired:  # not a pool child: untouched
            assert signal.getsignal(signal.SIGUSR1) is original
        signal.signal(signal.SIGUSR1, soft_timeout_sighandler)
        hb = Hb()
        with soft_time_limit_stop(hb) as expired:
            os.kill(os.getpid(), signal.SIGUSR1)
            assert expired.wait(5) and hb.flag.is_set()  # no exception was raised
        assert signal.getsignal(signal.SIGUSR1) is soft_timeout_sighandler
        with pytest.raises(SoftTimeLimitExceeded):
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(1)  # the handler runs between bytecodes; bounded
    finally:
        signal.signal(signal.SIGUSR1, original)


def test_checkpoint_flushes_the_sink_first(job_config, tmp_path: Path) -> None:
    """R5's invariant, without a worker: when a checkpoint becomes visible on disk (the
    ``after_rename`` point), every step it covers has been flushed by the sink, so a crash
    right there loses no step that the resumed run will skip."""
    from efficientllm.config import RunConfig
    from efficientllm.presets import resolve_demo
    from efficientllm.training.trainer import Trainer

    class BatchingSink:
        """Holds events until ``flush`` (as the worker's DbSink does between its flushes)."""

        def __init__(self) -> None:
            self.pending: list = []
            self.durable: list = []

        def emit(self, event) -> None:
            self.pending.append(event)

        def flush(self) -> bool:
            self.durable += self.pending
            self.pending = []
            return True

    sink = BatchingSink()
    seen: list[tuple[int, int]] = []  # (checkpoint step, last durable step) at each rename

    def fault(name: str) -> None:
        if name == "after_rename":
            steps = [e.step for e in sink.durable if e.type == "step"]
            seen.append((trainer.step, max(steps, default=0)))

    cfg = resolve_demo(RunConfig.from_dict({**job_config, "out_dir": str(tmp_path / "run")}))
    trainer = Trainer(cfg, sink=sink, fault=fault)
    assert trainer.run().status == "finished"
    assert [c for c, _ in seen] == [5, 10, 15]
    assert all(durable == ckpt for ckpt, durable in seen), seen


# ---- no orphan: a job whose broker send failed ------------------------------------------------
@pytest.mark.slow
def test_job_whose_send_failed_is_resent_by_the_reaper(
    job_config, tmp_path: Path, record_property
) -> None:
    """Issue 12 item 2 through the real worker: a job submitted while Redis is down is created
    (the send fails, ``sent_at`` stays empty, the submit does not raise) and stays queued; once
    Redis is back the worker's reaper sends it after ``EFFICIENTLLM_RESEND_S`` and it succeeds,
    once. The job writes its GGUF file too: registered as a ``gguf`` artifact (sha256 = file)."""
    with redis_server(tmp_path / "redis") as server:
        stack = start_stack(
            tmp_path / "resend", redis_url=server.url(0), db_url=None, start=False, resend_s=1.0
        )
        try:
            server.shutdown()
            cfg = {**job_config, "export": {**job_config["export"], "gguf": "q8_0"}}
            job_id = stack.submit(cfg, name="unsent")  # the doorbell fails; the row stays
            job = stack.job(job_id)
            assert job.status == "queued" and job.sent_at is None
            server.restart()
            stack.start_worker()
            t0 = stack.wait_reaper_started(60)
            started = stack.wait_started(job_id, 30, "the re-sent job to start")
            delay = time.monotonic() - t0
            done = stack.wait_status(job_id, TERMINAL, 90)
            record_property("resend_start_after_reaper_s", round(delay, 2))
            print(f"unsent job started {delay:.2f} s after the reaper started")
            assert started.attempt == 1 and done.status == "succeeded", stack.log_tail()
            assert done.attempt == 1  # sent once more, run once
            assert delay < 10.0
            _assert_artifacts_match(stack, job_id)
            gguf = repo.artifacts(stack.sm, job_id=job_id, kind="gguf")
            assert [Path(a.path).name for a in gguf] == ["model-q8_0.gguf"]
            assert (stack.settings.data_dir / gguf[0].path).read_bytes()[:4] == b"GGUF"
        finally:
            stack.stop()
