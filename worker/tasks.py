"""The one task: ``efficientllm.run_job(job_id)``, idempotent per job id.

claim the lease in the DB (else it is a duplicate, cancelled or finished delivery: no-op) ->
heartbeat thread -> ``Trainer`` with out_dir ``<data>/runs/<job_id>`` (a later attempt resumes
from the newest complete checkpoint there) -> register the export's files as artifacts ->
``finish_job``. The training imports happen here, in the pool process, never touching CUDA in
the worker's parent.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db import repo
from worker.celery_app import TASK_NAME, app
from worker.lease import Heartbeat, sessions, worker_id
from worker.settings import Settings, get_settings
from worker.sinks import DbSink

log = logging.getLogger(__name__)

EXIT_CODE = 137  # what a SIGKILLed process reports; fault hooks imitate it


def error_code(err: BaseException) -> str:
    """``NonFiniteLossError`` -> ``non_finite_loss_error`` (the class name in snake case)."""
    return re.sub(r"(?<!^)(?=[A-Z])", "_", type(err).__name__).lower()


def make_fault(settings: Settings, attempt: int):
    """The trainer's fault hook: exits the process at the configured point (APP_ENV=test only).

    Point faults fire on the first attempt only, so that the retry can show the recovery.
    """
    fault = settings.fault_hook
    if fault is None or fault == "always_kill" or attempt > 1:
        return None

    def hook(name: str) -> None:
        if name == fault:
            log.warning("FAULT %s: exiting with %d", name, EXIT_CODE)
            os._exit(EXIT_CODE)

    return hook


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def register_export(sm: sessionmaker[Session], *, job_id: str, export_dir: Path, root: Path) -> int:
    """Record every file of a complete export folder (size + sha256); returns how many."""
    n = 0
    root = root.resolve()
    for path in sorted(p for p in export_dir.resolve().rglob("*") if p.is_file()):
        repo.add_artifact(
            sm,
            job_id=job_id,
            kind="export",
            path=path.relative_to(root).as_posix(),
            size_bytes=path.stat().st_size,
            sha256=file_sha256(path),
        )
        n += 1
    return n


def _stop_flag(hb: Heartbeat, settings: Settings):
    delay = settings.step_delay_s if settings.testing else 0.0

    def should_stop() -> bool:
        if delay:
            time.sleep(delay)
        return hb.flag.is_set()

    return should_stop


def run(job_id: str, settings: Settings | None = None) -> str:
    """Run (or resume) one job; returns the outcome ('noop', a terminal status or 'lost')."""
    from efficientllm.config import RunConfig
    from efficientllm.errors import EfficientLLMError
    from efficientllm.presets import resolve_demo
    from efficientllm.trainer import Trainer

    settings = settings or get_settings()
    sm = sessions(settings.db_url)
    me = worker_id()
    job = repo.claim_job(sm, job_id=job_id, worker_id=me, ttl_s=settings.lease_ttl_s)
    if job is None:
        log.info("job %s: not claimable (duplicate, cancelled or finished); skipping", job_id)
        return "noop"
    log.info("job %s: attempt %d/%d on %s", job_id, job.attempt, job.max_attempts, me)
    if settings.fault_hook == "always_kill":
        log.warning("FAULT always_kill: exiting with %d", EXIT_CODE)
        os._exit(EXIT_CODE)

    def finish(status: str, code: str | None = None, message: str | None = None) -> str:
        ok = repo.finish_job(
            sm, job_id=job_id, worker_id=me, status=status, error_code=code, error_message=message
        )
        if not ok:
            log.warning("job %s: could not record %s (lease lost)", job_id, status)
            return "lost"
        sink.publish_status(status)
        return status

    out_dir = settings.runs_dir / job_id
    sink = DbSink(sm, job_id=job_id, flush_s=settings.event_flush_s, redis_url=settings.redis_url)
    hb = Heartbeat(
        sm, job_id=job_id, owner=me, ttl_s=settings.lease_ttl_s, interval_s=settings.heartbeat_s
    )
    with hb:
        try:
            try:
                cfg = resolve_demo(RunConfig.from_dict({**job.config, "out_dir": str(out_dir)}))
                trainer = Trainer(
                    cfg,
                    sink=sink,
                    should_stop=_stop_flag(hb, settings),
                    fault=make_fault(settings, job.attempt),
                )
                result = trainer.run()
            finally:
                sink.close()
            if result.status == "stopped":
                if hb.reason == "cancel":
                    return finish("cancelled")
                log.warning("job %s: lease lost; leaving it to its new owner", job_id)
                return "lost"
            if result.export_path is None:
                return finish("failed", "internal", "the run finished without an export")
            register_export(
                sm, job_id=job_id, export_dir=result.export_path, root=settings.data_dir
            )
            return finish("succeeded")
        except EfficientLLMError as err:
            log.warning("job %s failed: %s: %s", job_id, type(err).__name__, err)
            return finish("failed", error_code(err), str(err) or type(err).__name__)
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
    import efficientllm.trainer  # noqa: F401


def _connect_preload() -> None:
    from celery import signals

    signals.worker_init.connect(_preload, weak=False)


_connect_preload()
