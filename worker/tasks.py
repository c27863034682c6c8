"""The training task ``efficientllm.run_job(job_id)``, idempotent per id (the Playground's
``efficientllm.generate`` is in :mod:`worker.generation`).

claim the lease in the DB (else it is a duplicate, cancelled or finished delivery: no-op) ->
heartbeat thread -> ``Trainer`` with out_dir ``<data>/runs/<job_id>`` (a later attempt resumes
from the newest complete checkpoint there) -> register the export's files (and the GGUF file)
as artifacts -> ``finish_job``; every write carries the attempt's lease token. The training
imports happen here, in the pool process, never touching CUDA in the worker's parent.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from worker.budget import JobBudget
from worker.celery_app import TASK_NAME, app
from worker.lease import Heartbeat, sessions, worker_id
from worker.settings import Settings, get_settings
from worker.sinks import DbSink

log = logging.getLogger(__name__)

EXIT_CODE = 137  # what a SIGKILLed process reports; fault hooks imitate it


def error_code(err: BaseException) -> str:
    """``NonFiniteLossError`` -> ``non_finite_loss_error`` (the class name in snake case)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(err).__name__).lower()


def fault_point(settings: Settings, attempt: int) -> str | None:
    """The fault point of this attempt (APP_ENV=test only): ``FAULT`` lists one per attempt,
    comma-separated, so one job can crash at several points in turn; attempts past the list run
    clean, so that the last retry shows the recovery."""
    fault = settings.fault_hook
    if fault is None or fault == "always_kill":
        return None
    points = [p.strip() for p in fault.split(",")]
    if attempt > len(points):
        return None
    return points[attempt - 1] or None


def make_fault(settings: Settings, attempt: int):
    """The trainer's fault hook: exits the process (code 137) at this attempt's fault point.

    ``<point>:<n>`` fires the n-th time the point is reached (e.g. ``ckpt_mid_write:2``: while
    the second checkpoint is written, so that a complete one precedes it).
    """
    fault = fault_point(settings, attempt)
    if fault is None:
        return None
    point, _, nth = fault.partition(":")
    left = [int(nth) if nth else 1]

    def hook(name: str) -> None:
        if name != point:
            return
        left[0] -= 1
        if left[0] == 0:
            log.warning("FAULT %s: exiting with %d", fault, EXIT_CODE)
            os._exit(EXIT_CODE)

    return hook


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def register_export(
    sm: sessionmaker[Session],
    *,
    job_id: str,
    export_dir: Path,
    root: Path,
    kind: str = "export",
    lease: repo.Lease | None = None,
) -> int:
    """Record every file of a complete export folder (size + sha256) as artifacts of ``kind``;
    returns how many. ``lease``: the attempt's fencing token (``repo.LeaseLost`` if stale)."""
    n = 0
    root = root.resolve()
    for path in sorted(p for p in export_dir.resolve().rglob("*") if p.is_file()):
        repo.add_artifact(
            sm,
            job_id=job_id,
            kind=kind,
            path=path.relative_to(root).as_posix(),
            size_bytes=path.stat().st_size,
            sha256=file_sha256(path),
            lease=lease,
        )
        n += 1
    return n


def _stop_flag(stop_requested: Callable[[], bool], settings: Settings) -> Callable[[], bool]:
    delay = settings.step_delay_s if settings.testing else 0.0

    def should_stop() -> bool:
        if delay:
            time.sleep(delay)
        return stop_requested()

    return should_stop


@contextlib.contextmanager
def soft_time_limit_stop(hb: Heartbeat) -> Iterator[threading.Event]:
    """Turn Celery's soft time limit into a cooperative stop while the job runs.

    In a prefork pool child the soft limit arrives as SIGUSR1, whose handler (billiard's)
    raises ``SoftTimeLimitExceeded`` wherever the main thread happens to be: inside
    ``optimizer.step()`` or a checkpoint write, leaving nothing consistent to save. Here it
    only sets the returned event and the heartbeat's stop flag; the trainer sees the flag at
    the next step boundary, writes a checkpoint and returns 'stopped', and the job ends
    ``failed('time_limit')``. Anywhere else (not a pool child, not the main thread) nothing
    changes. The hard limit stays the backstop for a stop that never comes.
    """
    expired = threading.Event()
    sig = getattr(signal, "SIGUSR1", None)
    previous = signal.getsignal(sig) if sig is not None else None
    in_pool_child = getattr(previous, "__name__", "") == "soft_timeout_sighandler"
    if not in_pool_child or threading.current_thread() is not threading.main_thread():
        yield expired
        return

    def on_soft_limit(signum: int, frame: Any) -> None:
        expired.set()
        hb.flag.set()  # no logging here: a signal handler must not take locks

    signal.signal(sig, on_soft_limit)  # type: ignore[arg-type]
    try:
        yield expired
    finally:
        signal.signal(sig, previous)  # type: ignore[arg-type]


def _run_parallel(
    cfg: Any, settings: Settings, sink: DbSink, stop_requested: Callable[[], bool], attempt: int
) -> Any:
    """The job on ``settings.gpus_per_job`` rank subprocesses; this process keeps the lease,
    the heartbeat, the DB sink and the cancel. A killed rank takes this process down too (exit
    137, as if it had been killed itself), so the job is retried from its checkpoint."""
    from worker.parallel import RankCrashed, run_parallel

    fault = fault_point(settings, attempt)  # (the ranks take no ':<n>' suffix)
    try:
        return run_parallel(
            cfg,
            nprocs=settings.gpus_per_job,
            sink=sink,
            should_stop=stop_requested,
            step_delay_s=settings.step_delay_s if settings.testing else 0.0,
            fault=fault,
        )
    except RankCrashed as err:
        log.warning("%s: exiting with %d", err, EXIT_CODE)
        sink.close()
        os._exit(EXIT_CODE)


def run(job_id: str, settings: Settings | None = None) -> str:
    """Run (or resume) one job; returns the outcome ('noop', a terminal status or 'lost')."""
    from efficientllm.config import RunConfig
    from efficientllm.errors import EfficientLLMError
    from efficientllm.presets import resolve_demo
    from efficientllm.training.result import GGUF_DIR
    from efficientllm.training.trainer import Trainer

    settings = settings or get_settings()
    sm = sessions(settings.db_url)
    me = worker_id()
    job = repo.claim_job(sm, job_id=job_id, worker_id=me, ttl_s=settings.lease_ttl_s)
    if job is None:
        log.info("job %s: not claimable (duplicate, cancelled or finished); skipping", job_id)
        return "noop"
    log.info("job %s: attempt %d/%d on %s", job_id, job.attempt, job.max_attempts, me)
    lease = repo.Lease(me, job.attempt)  # every write below names it (fencing)
    if settings.fault_hook == "always_kill":
        log.warning("FAULT always_kill: exiting with %d", EXIT_CODE)
        os._exit(EXIT_CODE)

    def finish(status: str, code: str | None = None, message: str | None = None) -> str:
        ok = repo.finish_job(
            sm,
            job_id=job_id,
            worker_id=me,
            attempt=job.attempt,
            status=status,
            error_code=code,
            error_message=message,
        )
        if not ok:
            log.warning("job %s: could not record %s (lease lost)", job_id, status)
            return "lost"
        sink.publish_status(status)
        return status

    out_dir = settings.runs_dir / job_id
    hb = Heartbeat(
        sm,
        job_id=job_id,
        owner=me,
        attempt=job.attempt,
        ttl_s=settings.lease_ttl_s,
        interval_s=settings.heartbeat_s,
    )
    sink = DbSink(
        sm,
        job_id=job_id,
        flush_s=settings.event_flush_s,
        redis_url=settings.redis_url,
        lease=lease,
        on_lease_lost=lambda: hb.trip("lease_lost"),
    )
    budget = JobBudget(settings.max_job_steps, settings.max_job_wall_s, job.started_at)
    resumed_at = job.last_checkpoint_step or 0
    over: list[str] = []  # why the job went over its budget

    def stop_requested() -> bool:  # before each step: a cancel, a lost lease or the budget
        if not hb.flag.is_set() and budget.limited:
            why = budget.exceeded(max(sink.last_step, resumed_at))
            if why is not None:
                over.append(why)
                hb.trip("budget")
        return hb.flag.is_set()

    with hb, soft_time_limit_stop(hb) as time_up:
        try:
            try:
                cfg = resolve_demo(RunConfig.from_dict({**job.config, "out_dir": str(out_dir)}))
                if settings.gpus_per_job > 1:
                    result = _run_parallel(cfg, settings, sink, stop_requested, job.attempt)
                else:
                    trainer = Trainer(
                        cfg,
                        sink=sink,
                        should_stop=_stop_flag(stop_requested, settings),
                        fault=make_fault(settings, job.attempt),
                        may_write=hb.renew,  # no checkpoint/export once the lease is lost
                    )
                    result = trainer.run()
            finally:
                sink.close()
            if result.status == "stopped":
                if hb.reason == "cancel":
                    return finish("cancelled")
                if time_up.is_set():
                    log.warning("job %s: soft time limit; stopped at step %d", job_id, result.step)
                    limit = f"{settings.soft_time_limit_s:g} s"
                    return finish(
                        "failed",
                        "time_limit",
                        f"the job ran past its time limit ({limit}); stopped at step"
                        f" {result.step} with a checkpoint",
                    )
                if hb.reason == "budget":
                    log.warning("job %s: over its budget; stopped at step %d", job_id, result.step)
                    return finish(
                        "failed",
                        "budget_exceeded",
                        f"the job is over its budget: {over[0]}. It stopped at step"
                        f" {result.step} with a checkpoint.",
                    )
                log.warning("job %s: lease lost; leaving it to its new owner", job_id)
                return "lost"
            if result.export_path is None:
                return finish("failed", "internal", "the run finished without an export")
            register_export(
                sm,
                job_id=job_id,
                export_dir=result.export_path,
                root=settings.data_dir,
                lease=lease,
            )
            gguf_dir = result.export_path.parent / GGUF_DIR
            if gguf_dir.is_dir():  # the run's GGUF file (export.gguf), a download of its own
                register_export(
                    sm,
                    job_id=job_id,
                    export_dir=gguf_dir,
                    root=settings.data_dir,
                    kind="gguf",
                    lease=lease,
                )
            return finish("succeeded")
        except repo.LeaseLost as err:  # a write was fenced off: the job has a new owner
            log.warning("job %s: %s; leaving it to its new owner", job_id, err)
            return "lost"
        except EfficientLLMError as err:
            log.warning("job %s failed: %s: %s", job_id, type(err).__name__, err)
            return finish("failed", error_code(err), str(err) or type(err).__name__)
        except SoftTimeLimitExceeded:  # raised outside the trainer (see soft_time_limit_stop)
            log.warning("job %s: soft time limit", job_id)
            return finish("failed", "time_limit", "the job ran past its time limit")
        except Exception as err:
            log.exception("job %s: internal error", job_id)
            return finish("failed", "internal", f"internal error ({type(err).__name__})")


@app.task(name=TASK_NAME, ignore_result=True, acks_late=True, reject_on_worker_lost=True)
def run_job(job_id: str) -> str:
    """Celery entry point: see :func:`run`."""
    return run(str(job_id))


def _preload(**_: Any) -> None:
    """Import the training stack once in the worker's parent (no CUDA use), so pool children
    forked later start jobs at once."""
    import efficientllm.export  # noqa: F401  the model classes + export: seconds to import
    import efficientllm.training.trainer  # noqa: F401


def _connect_preload() -> None:
    from celery import signals

    signals.worker_init.connect(_preload, weak=False)


_connect_preload()
