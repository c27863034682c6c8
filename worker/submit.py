"""Submitting and cancelling jobs, and Playground generations: what the app calls. Loads no
torch at import.

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


MAX_PROMPT_CHARS = 2000
MAX_NEW_TOKENS = 256  # worker.tasks.MAX_NEW_TOKENS (not imported: it loads the task code)
MAX_TEMPERATURE = 2.0


def validate_generation(prompt: str, max_new_tokens: Any, temperature: Any) -> tuple[int, float]:
    """(max_new_tokens, temperature) as numbers; raises ``ConfigError`` listing every problem."""
    import math

    from efficientllm.errors import ConfigError

    problems: list[str] = []
    if not isinstance(prompt, str) or not prompt.strip():
        problems.append("the prompt is empty")
    elif len(prompt) > MAX_PROMPT_CHARS:
        problems.append(f"the prompt has {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
    try:
        n = float(max_new_tokens)
        if not n.is_integer() or not 1 <= n <= MAX_NEW_TOKENS:
            raise ValueError
    except (TypeError, ValueError):
        problems.append(f"max new tokens must be a whole number from 1 to {MAX_NEW_TOKENS}")
        n = 0
    try:
        t = float(temperature)
        if not math.isfinite(t) or not 0 <= t <= MAX_TEMPERATURE:
            raise ValueError
    except (TypeError, ValueError):
        problems.append(f"temperature must be between 0 and {MAX_TEMPERATURE:g}")
        t = 0.0
    if problems:
        raise ConfigError(problems)
    return int(n), t


def submit_generation(
    session: Session | sessionmaker[Session],
    *,
    job_id: str,
    owner: str,
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    celery: Celery | None = None,
) -> str:
    """Validate, create the generation row and send ``efficientllm.generate`` to the job's
    queue; returns the generation id. ``ConfigError`` for bad input or a job that is not the
    owner's or has not succeeded (nothing is created then)."""
    from efficientllm.errors import ConfigError
    from worker.celery_app import GENERATE_TASK_NAME

    if celery is None:
        from worker.celery_app import app as celery
    n, t = validate_generation(prompt, max_new_tokens, temperature)
    job = repo.get_job(session, job_id=job_id, owner=owner) if job_id else None
    if job is None:
        raise ConfigError("choose one of your jobs")
    if job.status != "succeeded":
        raise ConfigError(f"job {job_id[:8]} is {job.status}; only a succeeded job can generate")
    gen = repo.create_generation(
        session, job_id=job_id, owner=owner, prompt=prompt, max_new_tokens=n, temperature=t
    )
    celery.send_task(GENERATE_TASK_NAME, args=[gen.id], queue=job.queue)
    log.info("generation %s for job %s submitted to queue %s", gen.id, job_id, job.queue)
    return gen.id


def cancel_job(
    session: Session | sessionmaker[Session], *, job_id: str, owner: str | None
) -> str | None:
    """Cancel cooperatively: queued -> cancelled; running -> the worker stops within a
    heartbeat. Returns the resulting status, or None if not found / not owned."""
    return repo.request_cancel(session, job_id=job_id, owner=owner)
