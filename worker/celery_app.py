"""The Celery app, built from :mod:`worker.settings`.

The broker is only a doorbell: the DB decides what runs (lease + heartbeat + reaper), so there is
no result backend. Delivery is at-least-once (``acks_late`` + ``reject_on_worker_lost``) and the
task is idempotent per job id; JSON only; one job reserved per pool process.

Importing this module is cheap and loads no torch: the app (web process) imports it to send tasks
by name. The worker imports ``worker.tasks`` and ``worker.generation`` (``include``) and, in its
main process, runs the reaper thread started on ``worker_ready``. Nothing here touches CUDA
before the pool forks.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any

from celery import Celery, signals
from kombu import Queue
from sqlalchemy.orm import Session, sessionmaker

from db import repo
from worker.lease import Reaper
from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)

TASK_NAME = "efficientllm.run_job"
GENERATE_TASK_NAME = "efficientllm.generate"


def transport_options(settings: Settings) -> dict[str, Any]:
    """Broker transport options: Redis' visibility timeout, or the SQLite transport's engine."""
    if settings.redis_url:
        return {"visibility_timeout": settings.visibility_timeout_s}
    # kombu's SQLAlchemy transport passes these to create_engine (a bad key would break it)
    return {"connect_args": {"check_same_thread": False, "timeout": 30}}


def make_app(settings: Settings | None = None) -> Celery:
    """A Celery app configured from ``settings`` (default: the environment)."""
    settings = settings or get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = Celery(
        "efficientllm", broker=settings.broker_url, include=["worker.tasks", "worker.generation"]
    )
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        event_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,  # the attempt cap lives in the DB (claim/reap)
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        task_soft_time_limit=settings.soft_time_limit_s,  # the job checkpoints and fails
        task_time_limit=settings.time_limit_s,  # the pool process is killed: the reaper retries
        worker_max_tasks_per_child=1,  # a fresh process per job: no torch global state carries over
        # on a broker connection loss the running job's pool process is terminated (its late
        # ack could not reach the broker): the reaper re-queues it after the lease TTL and it
        # resumes from its checkpoint (R9); no redelivered copy runs beside it
        worker_cancel_long_running_tasks_on_connection_loss=True,
        broker_connection_retry_on_startup=True,
        # a broker outage longer than kombu's 100 default retries would end the worker; retry
        # forever instead (R9: after a Redis restart the worker reconnects and consumes again)
        broker_connection_max_retries=None,
        broker_transport_options=transport_options(settings),
        task_default_queue=settings.queue,
        task_queues=[Queue(settings.queue)],
        task_routes={name: {"queue": settings.queue} for name in (TASK_NAME, GENERATE_TASK_NAME)},
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    app.efficientllm_settings = settings  # type: ignore[attr-defined]
    return app


app = make_app()
celery_app = app


def enqueue(
    job_id: str, *, queue: str, sm: repo.SessionLike | None = None, celery: Celery = app
) -> str:
    """Send the task for ``job_id`` by name; when ``sm`` is given, record the send (its time and
    task id) in the DB: a queued job never recorded as sent is re-sent by the reaper."""
    result = celery.send_task(TASK_NAME, args=[job_id], queue=queue)
    if sm is not None:
        repo.mark_sent(sm, job_id=job_id, task_id=result.id)
    return str(result.id)


def enqueue_generation(
    gen_id: str, *, queue: str, sm: repo.SessionLike | None = None, celery: Celery = app
) -> str:
    """Send the Playground task for ``gen_id``; record the send when ``sm`` is given."""
    result = celery.send_task(GENERATE_TASK_NAME, args=[gen_id], queue=queue)
    if sm is not None:
        repo.mark_generation_sent(sm, gen_id=gen_id)
    return str(result.id)


def _requeue(sm: sessionmaker[Session], job_id: str) -> None:
    job = repo.get_job(sm, job_id=job_id)
    if job is not None and job.status == "queued":
        enqueue(job_id, queue=job.queue, sm=sm)


def _send_generation(sm: sessionmaker[Session], gen_id: str) -> None:
    gen = repo.get_generation(sm, gen_id=gen_id)
    job = repo.get_job(sm, job_id=gen.job_id) if gen is not None else None
    if gen is not None and gen.status == "queued" and job is not None:
        enqueue_generation(gen_id, queue=job.queue, sm=sm)


_reaper: list[subprocess.Popen[bytes]] = []


def reaper_main(parent_pid: int) -> None:
    """Entry point of the reaper companion process (exits when its worker is gone)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s reaper %(message)s")
    settings: Settings = app.efficientllm_settings  # type: ignore[attr-defined]
    Reaper(
        settings.db_url,
        period_s=settings.reaper_s,
        requeue=_requeue,
        send_generation=_send_generation,
        resend_s=settings.resend_s,
    ).run(parent_pid=parent_pid)


@signals.worker_ready.connect
def _start_reaper(**_: Any) -> None:
    """Start the reaper companion process (it reaps once at once: orphans left at startup)."""
    if _reaper:
        return
    code = f"from worker.celery_app import reaper_main; reaper_main({os.getpid()})"
    _reaper.append(subprocess.Popen([sys.executable, "-c", code]))
    settings: Settings = app.efficientllm_settings  # type: ignore[attr-defined]
    log.info("reaper started (pid %d, every %.1f s)", _reaper[0].pid, settings.reaper_s)


@signals.worker_shutdown.connect
def _stop_reaper(**_: Any) -> None:
    while _reaper:
        proc = _reaper.pop()
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()


@signals.worker_process_init.connect
def _check_no_cuda_inherited(**_: Any) -> None:
    """A pool child must not inherit an initialised CUDA context from its parent."""
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_initialized():  # pragma: no cover - GPU only
        log.error("CUDA was initialised in the worker's parent before fork; jobs will fail")
