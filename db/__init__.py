"""Persistence for jobs: engine helpers, typed models, repository functions and migrations.

The database is the source of truth for job state (see docs/reliability.md). This package
imports SQLAlchemy and Alembic only: never torch, gradio or celery.
"""

from db.engine import default_url, make_engine, session_factory, upgrade_to_head
from db.models import (
    ACTIVE_STATUSES,
    JOB_STATUSES,
    TERMINAL_STATUSES,
    ArchSnapshot,
    Artifact,
    Base,
    EvalPoint,
    Event,
    Job,
    MetricPoint,
)

__all__ = [
    "ACTIVE_STATUSES",
    "JOB_STATUSES",
    "TERMINAL_STATUSES",
    "ArchSnapshot",
    "Artifact",
    "Base",
    "EvalPoint",
    "Event",
    "Job",
    "MetricPoint",
    "default_url",
    "make_engine",
    "session_factory",
    "upgrade_to_head",
]
