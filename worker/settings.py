"""Worker settings: one frozen dataclass read from the environment (and nothing else).

Every field names the environment variable it comes from. Durations are in seconds. The defaults
suit a single GPU box; the tests shrink the timings (TTL 5 s, heartbeat 1 s, reaper 1 s,
visibility timeout 10 s) so that crash recovery happens within seconds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path

# Every environment variable this module reads (tests/test_compose.py checks compose against it).
ENV_VARS = (
    "REDIS_URL",
    "DATABASE_URL",
    "EFFICIENTLLM_DATA",
    "EFFICIENTLLM_LEASE_TTL_S",
    "EFFICIENTLLM_HEARTBEAT_S",
    "EFFICIENTLLM_REAPER_S",
    "EFFICIENTLLM_RESEND_S",
    "EFFICIENTLLM_VISIBILITY_TIMEOUT_S",
    "EFFICIENTLLM_MAX_ATTEMPTS",
    "EFFICIENTLLM_QUEUE",
    "EFFICIENTLLM_EVENT_FLUSH_S",
    "EFFICIENTLLM_GPUS_PER_JOB",
    "EFFICIENTLLM_MAX_ACTIVE_JOBS_PER_USER",
    "EFFICIENTLLM_SOFT_TIME_LIMIT_S",
    "EFFICIENTLLM_TIME_LIMIT_S",
    "EFFICIENTLLM_MAX_JOB_STEPS",
    "EFFICIENTLLM_MAX_JOB_WALL_S",
    "APP_ENV",
    "FAULT",
    "FAULT_STEP_DELAY_S",
)


@dataclass(frozen=True, kw_only=True)
class Settings:
    """Everything the worker and the submitting app need to agree on."""

    redis_url: str | None = None
    """``REDIS_URL``: the Celery broker and the pub/sub bus for live notifications. Unset: the
    embedded default, kombu's SQLAlchemy transport on ``<data>/broker.sqlite`` (no server)."""
    database_url: str | None = None
    """``DATABASE_URL``: the job database (the source of truth). Unset: ``db.engine``'s default,
    a SQLite file in the data directory."""
    data_dir: Path = Path("data")
    """``EFFICIENTLLM_DATA``: holds the SQLite DB and broker (embedded mode), each job's outputs
    in ``runs/<job_id>/`` and is the artifacts root (artifact paths are relative to it)."""
    lease_ttl_s: float = 60.0
    """``EFFICIENTLLM_LEASE_TTL_S``: how long a claimed job stays leased without a heartbeat; after
    that the reaper (or another claim) may take it over."""
    heartbeat_s: float = 10.0
    """``EFFICIENTLLM_HEARTBEAT_S``: lease renewal (and cancel check) interval; well below TTL."""
    reaper_s: float = 30.0
    """``EFFICIENTLLM_REAPER_S``: how often each worker re-queues jobs whose lease expired."""
    resend_s: float = 60.0
    """``EFFICIENTLLM_RESEND_S``: a queued job (or generation) with no live broker message (the
    send failed, or it was sent this long ago while nothing runs on its queue) is sent again by
    the reaper once it has waited this long."""
    visibility_timeout_s: float = 3600.0
    """``EFFICIENTLLM_VISIBILITY_TIMEOUT_S``: Redis transport: an unacked message older than this
    is redelivered (a duplicate of a still-running job is a no-op thanks to the lease)."""
    max_attempts: int = 3
    """``EFFICIENTLLM_MAX_ATTEMPTS``: starts allowed per job before it fails ('max_attempts')."""
    queue: str = "gpu"
    """``EFFICIENTLLM_QUEUE``: the queue of the GPU pool this worker serves and jobs go to."""
    event_flush_s: float = 0.5
    """``EFFICIENTLLM_EVENT_FLUSH_S``: the event sink writes to the DB at most this often
    (important events such as checkpoints flush at once)."""
    gpus_per_job: int = 1
    """``EFFICIENTLLM_GPUS_PER_JOB``: processes (one per GPU, data parallel) each job runs on;
    above 1 the task starts that many rank subprocesses on this machine (``worker/parallel.py``)
    and rank r uses GPU r of this worker's ``CUDA_VISIBLE_DEVICES`` (CPU processes without
    CUDA). Run one worker per group of GPUs."""
    max_active_jobs_per_user: int = 4
    """``EFFICIENTLLM_MAX_ACTIVE_JOBS_PER_USER``: with login on, queued + running jobs one user
    may have; a further submission is refused with a message (0: no limit). With login off
    (one local user) the app applies no limit."""
    soft_time_limit_s: float | None = None
    """``EFFICIENTLLM_SOFT_TIME_LIMIT_S``: Celery's soft time limit of one attempt (unset: none).
    When it expires the job stops at the next step boundary, writes a checkpoint and ends
    ``failed`` with error code ``time_limit`` (not retried: a retry would hit it again)."""
    time_limit_s: float | None = None
    """``EFFICIENTLLM_TIME_LIMIT_S``: Celery's hard time limit of one attempt (unset: none), the
    backstop for a soft stop that hangs: the pool process is killed, and the reaper re-queues
    the job from its last checkpoint after the lease TTL (or fails it at the attempt cap). Keep
    it well above the soft limit: a step plus a checkpoint must fit between the two."""
    max_job_steps: int | None = None
    """``EFFICIENTLLM_MAX_JOB_STEPS``: at most this many optimizer steps per job over all its
    attempts (unset: no cap); past it the job stops with a checkpoint and ends ``failed`` with
    error code ``budget_exceeded``, not retried (``worker/budget.py``)."""
    max_job_wall_s: float | None = None
    """``EFFICIENTLLM_MAX_JOB_WALL_S``: at most this many seconds per job since its first start,
    over all its attempts (unset: no cap); past it, as for ``max_job_steps``."""
    app_env: str = "production"
    """``APP_ENV``: ``test`` enables the fault hooks below; anything else ignores them."""
    fault: str | None = None
    """``FAULT`` (test only): ``ckpt_mid_write`` | ``after_rename`` | ``before_export`` |
    ``export_mid_write`` | ``before_gguf`` exit the pool process (code 137) at that point of a
    job's first attempt (``point:n``: the n-th time it is reached; a comma-separated list: one
    point per attempt in turn); ``always_kill`` exits right after every claim (a poison job)."""
    step_delay_s: float = 0.0
    """``FAULT_STEP_DELAY_S`` (test only): sleep this long before each training step, so that a
    tiny CPU job runs long enough to be killed or cancelled mid-way."""

    @property
    def broker_url(self) -> str:
        """The Celery broker: Redis when configured, else SQLite through kombu's SQLAlchemy."""
        if self.redis_url:
            return self.redis_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.sqlite').resolve()}"

    @property
    def testing(self) -> bool:
        return self.app_env == "test"

    @property
    def fault_hook(self) -> str | None:
        """The fault to inject, or None (always None outside ``APP_ENV=test``)."""
        return self.fault if self.testing and self.fault else None

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Read the variables above (missing or empty ones take the defaults)."""
        env = os.environ if env is None else env

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        kw: dict[str, object] = {
            "redis_url": get("REDIS_URL"),
            "database_url": get("DATABASE_URL"),
            "data_dir": Path(get("EFFICIENTLLM_DATA") or "data"),
            "lease_ttl_s": get("EFFICIENTLLM_LEASE_TTL_S"),
            "heartbeat_s": get("EFFICIENTLLM_HEARTBEAT_S"),
            "reaper_s": get("EFFICIENTLLM_REAPER_S"),
            "resend_s": get("EFFICIENTLLM_RESEND_S"),
            "visibility_timeout_s": get("EFFICIENTLLM_VISIBILITY_TIMEOUT_S"),
            "max_attempts": get("EFFICIENTLLM_MAX_ATTEMPTS"),
            "queue": get("EFFICIENTLLM_QUEUE"),
            "event_flush_s": get("EFFICIENTLLM_EVENT_FLUSH_S"),
            "gpus_per_job": get("EFFICIENTLLM_GPUS_PER_JOB"),
            "max_active_jobs_per_user": get("EFFICIENTLLM_MAX_ACTIVE_JOBS_PER_USER"),
            "soft_time_limit_s": get("EFFICIENTLLM_SOFT_TIME_LIMIT_S"),
            "time_limit_s": get("EFFICIENTLLM_TIME_LIMIT_S"),
            "max_job_steps": get("EFFICIENTLLM_MAX_JOB_STEPS"),
            "max_job_wall_s": get("EFFICIENTLLM_MAX_JOB_WALL_S"),
            "app_env": get("APP_ENV"),
            "fault": get("FAULT"),
            "step_delay_s": get("FAULT_STEP_DELAY_S"),
        }
        types = {f.name: f.type for f in fields(cls)}
        out: dict[str, object] = {}
        for name, value in kw.items():
            if value is None:
                continue
            if types[name] in ("float", float, "float | None"):
                value = float(value)  # type: ignore[arg-type]
            elif types[name] in ("int", int, "int | None"):
                value = int(value)  # type: ignore[arg-type]
            out[name] = value
        s = cls(**out)  # type: ignore[arg-type]
        s.validate()
        return s

    def validate(self) -> None:
        """Raise ValueError listing every inconsistent setting."""
        problems = []
        if min(self.lease_ttl_s, self.heartbeat_s, self.reaper_s, self.resend_s) <= 0:
            problems.append("lease TTL, heartbeat, reaper period and resend grace must be > 0")
        if self.heartbeat_s >= self.lease_ttl_s:
            problems.append(
                f"EFFICIENTLLM_HEARTBEAT_S ({self.heartbeat_s}) must be below "
                f"EFFICIENTLLM_LEASE_TTL_S ({self.lease_ttl_s})"
            )
        if self.max_attempts < 1:
            problems.append("EFFICIENTLLM_MAX_ATTEMPTS must be >= 1")
        if self.gpus_per_job < 1:
            problems.append("EFFICIENTLLM_GPUS_PER_JOB must be >= 1")
        if self.max_active_jobs_per_user < 0:
            problems.append("EFFICIENTLLM_MAX_ACTIVE_JOBS_PER_USER must be >= 0")
        if self.visibility_timeout_s <= 0:
            problems.append("EFFICIENTLLM_VISIBILITY_TIMEOUT_S must be > 0")
        soft, hard = self.soft_time_limit_s, self.time_limit_s
        if (soft is not None and soft <= 0) or (hard is not None and hard <= 0):
            problems.append("the soft and hard time limits must be > 0 (or unset)")
        elif soft is not None and hard is not None and soft >= hard:
            problems.append(
                f"EFFICIENTLLM_SOFT_TIME_LIMIT_S ({soft}) must be below "
                f"EFFICIENTLLM_TIME_LIMIT_S ({hard})"
            )
        if (self.max_job_steps is not None and self.max_job_steps < 1) or (
            self.max_job_wall_s is not None and self.max_job_wall_s <= 0
        ):
            problems.append("EFFICIENTLLM_MAX_JOB_STEPS and _WALL_S must be > 0 (or unset)")
        if problems:
            raise ValueError("; ".join(problems))

    def env(self) -> dict[str, str]:
        """These settings as environment variables (to start a worker subprocess with)."""
        out = {
            "EFFICIENTLLM_DATA": str(self.data_dir),
            "EFFICIENTLLM_LEASE_TTL_S": str(self.lease_ttl_s),
            "EFFICIENTLLM_HEARTBEAT_S": str(self.heartbeat_s),
            "EFFICIENTLLM_REAPER_S": str(self.reaper_s),
            "EFFICIENTLLM_RESEND_S": str(self.resend_s),
            "EFFICIENTLLM_VISIBILITY_TIMEOUT_S": str(self.visibility_timeout_s),
            "EFFICIENTLLM_MAX_ATTEMPTS": str(self.max_attempts),
            "EFFICIENTLLM_QUEUE": self.queue,
            "EFFICIENTLLM_EVENT_FLUSH_S": str(self.event_flush_s),
            "APP_ENV": self.app_env,
        }
        if self.gpus_per_job > 1:
            out["EFFICIENTLLM_GPUS_PER_JOB"] = str(self.gpus_per_job)
        if self.soft_time_limit_s is not None:
            out["EFFICIENTLLM_SOFT_TIME_LIMIT_S"] = str(self.soft_time_limit_s)
        if self.time_limit_s is not None:
            out["EFFICIENTLLM_TIME_LIMIT_S"] = str(self.time_limit_s)
        if self.max_job_steps is not None:
            out["EFFICIENTLLM_MAX_JOB_STEPS"] = str(self.max_job_steps)
        if self.max_job_wall_s is not None:
            out["EFFICIENTLLM_MAX_JOB_WALL_S"] = str(self.max_job_wall_s)
        if self.redis_url:
            out["REDIS_URL"] = self.redis_url
        if self.database_url:
            out["DATABASE_URL"] = self.database_url
        if self.fault:
            out["FAULT"] = self.fault
        if self.step_delay_s:
            out["FAULT_STEP_DELAY_S"] = str(self.step_delay_s)
        return out

    @property
    def db_url(self) -> str:
        """The job database URL (``DATABASE_URL`` or db/engine's SQLite default in data_dir)."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'efficientllm.db').resolve()}"


def get_settings() -> Settings:
    """Settings from the current environment (read each call: cheap, and tests change env)."""
    return Settings.from_env()
