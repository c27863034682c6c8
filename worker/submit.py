"""Submitting and cancelling jobs, and Playground generations: what the app calls. Loads no
torch at import.

The DB row is committed first, then the task is sent by name (the app never imports the task
code) and the send is recorded (``sent_at``). If sending fails the row stays queued and unsent:
the error is logged, not raised (the job exists, a resubmit would duplicate it), and a worker's
reaper sends it once ``EFFICIENTLLM_RESEND_S`` has passed and the broker is back.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy.orm import Session, sessionmaker

from db import repo
from efficientllm.errors import EfficientLLMError
from worker.settings import get_settings

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger(__name__)


class JobLimitError(EfficientLLMError):
    """The user already has the most queued + running jobs allowed (nothing was created)."""


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as ``RunConfig.to_dict()``; raises ``ConfigError`` listing every problem.

    ``efficientllm.config`` is torch-free (tests/test_worker.py checks it); imported lazily
    anyway so that ``import worker.submit`` stays light.
    """
    from efficientllm.config import RunConfig

    return RunConfig.from_dict(config).to_dict()


def _limit_error(active: int, limit: int) -> JobLimitError:
    return JobLimitError(
        f"you already have {active} jobs queued or running (at most {limit} per user); "
        "wait for one to finish or cancel one"
    )


def submit_job(
    session: Session | sessionmaker[Session],
    *,
    config: dict[str, Any],
    owner: str = "local",
    name: str = "",
    queue: str | None = None,
    max_attempts: int | None = None,
    max_active: int | None = None,
    celery: Celery | None = None,
) -> str:
    """Validate ``config``, create the job row and ring the broker; returns the job id.

    ``max_active``: refuse (``JobLimitError``, nothing created) when ``owner`` already has that
    many queued + running jobs; None: no limit (the app passes its per-user limit with login
    on). ``celery`` defaults to ``worker.celery_app.app`` (configured from the environment).
    """
    from worker.celery_app import enqueue

    if celery is None:
        from worker.celery_app import app as celery
    settings = getattr(celery, "efficientllm_settings", None) or get_settings()
    checked = validate_config(config)
    queue = queue or settings.queue
    try:  # count and insert in one transaction: concurrent submissions cannot both pass
        job = repo.create_job(
            session,
            config=checked,
            owner=owner,
            name=name,
            queue=queue,
            max_attempts=max_attempts or settings.max_attempts,
            max_active=max_active,
        )
    except repo.ActiveLimit as err:
        raise _limit_error(err.active, err.limit) from None
    try:
        enqueue(job.id, queue=queue, sm=session, celery=celery)
    except Exception as err:  # the row is durable; the reaper sends it later
        log.warning("job %s: broker send failed (%s); the reaper will re-send it", job.id, err)
        return job.id
    log.info("job %s submitted to queue %s", job.id, queue)
    return job.id


MAX_PROMPT_CHARS = 2000
MAX_NEW_TOKENS = 256  # worker.generation.MAX_NEW_TOKENS (not imported: it loads the task code)
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
    from worker.celery_app import enqueue_generation

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
    try:
        enqueue_generation(gen.id, queue=job.queue, sm=session, celery=celery)
    except Exception as err:  # as for jobs: queued and unsent, the reaper sends it later
        log.warning("generation %s: broker send failed (%s); will be re-sent", gen.id, err)
        return gen.id
    log.info("generation %s for job %s submitted to queue %s", gen.id, job_id, job.queue)
    return gen.id


def cancel_job(
    session: Session | sessionmaker[Session], *, job_id: str, owner: str | None
) -> str | None:
    """Cancel cooperatively: queued -> cancelled; running -> the worker stops within a
    heartbeat. Returns the resulting status, or None if not found / not owned."""
    return repo.request_cancel(session, job_id=job_id, owner=owner)
