"""A job's resource budget on a shared worker (reliability checklist R14, ``worker/budget.py``).

``EFFICIENTLLM_MAX_JOB_STEPS`` and ``EFFICIENTLLM_MAX_JOB_WALL_S`` cap one job over all its
attempts: past either it stops at a step boundary with a checkpoint and ends
``failed('budget_exceeded')`` on its first attempt, and a later delivery does not run it again.
Runs the real task function (``worker.tasks.run``) in this process on the tiny 40-step job.
"""

from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # db/ and worker/ are top-level packages next to efficientllm/
    sys.path.insert(0, str(ROOT))

pytest.importorskip("celery")

from db import repo  # noqa: E402
from db.models import utcnow  # noqa: E402
from worker.budget import JobBudget  # noqa: E402
from worker.settings import Settings  # noqa: E402


@pytest.fixture(scope="module")
def tiny_config(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    from tiny import save_tiny_corpus, save_tiny_source
    from worker_util import tiny_job_config

    d = tmp_path_factory.mktemp("budget_assets")
    return tiny_job_config(save_tiny_source(d / "src", "llama_gqa_tied"), save_tiny_corpus(d / "c"))


def _run(tiny_config: dict[str, Any], settings: Settings) -> tuple[str, Any, Any]:
    """Submit the tiny job, run it once, then deliver it again: (outcome, job, sessions)."""
    from db.engine import make_engine, session_factory, upgrade_to_head
    from worker import tasks
    from worker.submit import validate_config

    upgrade_to_head(settings.db_url)
    sm = session_factory(make_engine(settings.db_url))
    jid = repo.create_job(sm, config=validate_config(tiny_config)).id
    outcome = tasks.run(jid, settings)
    assert tasks.run(jid, settings) == "noop"  # a redelivery: terminal, so not retried
    job = repo.get_job(sm, job_id=jid)
    return outcome, job, sm


def _checkpoints(settings: Settings, job_id: str) -> list[int]:
    ckpt = settings.runs_dir / job_id / "checkpoints"
    return sorted(int(p.name.split("-")[1]) for p in ckpt.glob("step-*") if p.is_dir())


def test_budget_rule() -> None:
    t0 = utcnow()
    assert not JobBudget().limited and JobBudget().exceeded(10**9) is None
    steps = JobBudget(max_steps=10)
    assert steps.exceeded(9) is None
    why = steps.exceeded(10)
    assert why is not None and "10 steps" in why and "EFFICIENTLLM_MAX_JOB_STEPS" in why
    wall = JobBudget(max_wall_s=3, started_at=t0)
    assert wall.exceeded(0, now=t0 + timedelta(seconds=2.9)) is None
    why = wall.exceeded(0, now=t0 + timedelta(seconds=3))
    assert why is not None and "3 s" in why and "EFFICIENTLLM_MAX_JOB_WALL_S" in why
    assert JobBudget(max_wall_s=3).exceeded(0) is None  # not started: nothing to measure
    with pytest.raises(ValueError, match="MAX_JOB_STEPS"):
        Settings.from_env({"EFFICIENTLLM_MAX_JOB_STEPS": "0"})
    env = Settings.from_env(
        {"EFFICIENTLLM_MAX_JOB_STEPS": "10", "EFFICIENTLLM_MAX_JOB_WALL_S": "3"}
    )
    assert (env.max_job_steps, env.max_job_wall_s) == (10, 3.0)
    assert Settings.from_env(env.env()).max_job_steps == 10  # survives a worker subprocess


def test_step_budget_stops_with_a_checkpoint_and_is_not_retried(
    tiny_config: dict[str, Any], tmp_path: Path
) -> None:
    """max_steps=10 while the job asks for 40: failed('budget_exceeded') on attempt 1, metrics
    for steps 1..10 only, a complete checkpoint at step 10, no export."""
    settings = Settings(data_dir=tmp_path, max_job_steps=10, event_flush_s=0.1)
    outcome, job, sm = _run(tiny_config, settings)
    assert outcome == "failed", job.error_message
    assert (job.status, job.error_code, job.attempt) == ("failed", "budget_exceeded", 1)
    assert "step budget of 10 steps" in job.error_message and "step 10" in job.error_message
    assert [m.step for m in repo.metrics(sm, job_id=job.id)] == list(range(1, 11))
    assert job.last_checkpoint_step == 10 and 10 in _checkpoints(settings, job.id)
    assert repo.artifacts(sm, job_id=job.id) == []


def test_wall_clock_budget_stops_with_a_checkpoint(
    tiny_config: dict[str, Any], tmp_path: Path
) -> None:
    """max_wall_clock=3 s, steps slowed to 0.1 s (40 steps need > 4 s): failed('budget_exceeded')
    on attempt 1 before step 40, with a checkpoint at the step it stopped at."""
    settings = Settings(
        data_dir=tmp_path, max_job_wall_s=3.0, app_env="test", step_delay_s=0.1, event_flush_s=0.1
    )
    outcome, job, sm = _run(tiny_config, settings)
    assert outcome == "failed", job.error_message
    assert (job.status, job.error_code, job.attempt) == ("failed", "budget_exceeded", 1)
    assert "wall-clock budget of 3 s" in job.error_message
    stopped = [m.step for m in repo.metrics(sm, job_id=job.id)][-1]
    assert 0 < stopped < 40 and f"step {stopped}" in job.error_message
    assert job.last_checkpoint_step == stopped and stopped in _checkpoints(settings, job.id)
    assert (job.finished_at - job.started_at).total_seconds() >= 3.0
    assert repo.artifacts(sm, job_id=job.id) == []
