"""Submitting and cancelling jobs: what the app calls. Loads no torch at import.

The DB row is committed first, then the task is sent by name (the app never imports the task
code). If sending fails the job stays queued in the DB and the error propagates.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from db import repo
from worker.settings import get_settings

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as ``RunConfig.to_dict()``; raises ``ConfigError`` listing every problem.

    ``efficientllm.config`` is torch-free (tests/test_worker.py checks it); imported lazily
    anyway so that ``import worker.submit`` stays light.
    """
    from efficientllm.config import RunConfig

    return RunConfig.from_dict(config).to_dict()


def submit_job(
    session: Session | sessionmaker[Session],
    *,
    config: dict[str, Any],
    owner: str = "local",
    name: str = "",
    queue: str | None = None,
    max_attempts: int | None = None,
    celery: Celery | None = None,
) -> str:
    """Validate ``config``, create the job row and ring the broker; returns the job id.

    ``celery`` defaults to ``worker.celery_app.app`` (configured from the environment).
    """
    from worker.celery_app import enqueue

    if celery is None:
        from worker.celery_app import app as celery
    settings = getattr(celery, "efficientllm_settings", None) or get_settings()
    checked = validate_config(config)
    queue = queue or settings.queue
    job = repo.create_job(
        session,
        config=checked,
        owner=owner,
        name=name,
        queue=queue,
        max_attempts=max_attempts or settings.max_attempts,
    )
    enqueue(job.id, queue=queue, sm=session, celery=celery)
    log.info("job %s submitted to queue %s", job.id, queue)
    return job.id


def cancel_job(
    session: Session | sessionmaker[Session], *, job_id: str, owner: str | None
) -> str | None:
    """Cancel cooperatively: queued -> cancelled; running -> the worker stops within a
    heartbeat. Returns the resulting status, or None if not found / not owned."""
    return repo.request_cancel(session, job_id=job_id, owner=owner)
