"""A job's resource budget on a shared worker (reliability checklist R14).

``EFFICIENTLLM_MAX_JOB_STEPS`` caps the optimizer steps of one job and
``EFFICIENTLLM_MAX_JOB_WALL_S`` the seconds since its first start, both over all its attempts
(a retry does not get a fresh budget). A job past either stops at the next step boundary with a
checkpoint, like a cancel, and ends ``failed('budget_exceeded')``; it is not retried, since a
retry would hit the same cap. The hard time limit stays the backstop for a step that never ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from db.models import utcnow

__all__ = ["JobBudget"]


@dataclass(frozen=True)
class JobBudget:
    max_steps: int | None = None
    max_wall_s: float | None = None
    started_at: datetime | None = None
    """When the job's first attempt started (``jobs.started_at``)."""

    @property
    def limited(self) -> bool:
        return self.max_steps is not None or self.max_wall_s is not None

    def exceeded(self, step: int, now: datetime | None = None) -> str | None:
        """Why a job with ``step`` steps done is over its budget, or None while it is within."""
        if self.max_steps is not None and step >= self.max_steps:
            return (
                f"it reached this worker's step budget of {self.max_steps} steps"
                " (EFFICIENTLLM_MAX_JOB_STEPS); train fewer tokens or ask the operator to"
                " raise the cap"
            )
        if self.max_wall_s is not None and self.started_at is not None:
            elapsed = ((now or utcnow()) - self.started_at).total_seconds()
            if elapsed >= self.max_wall_s:
                return (
                    f"it ran {elapsed:.0f} s, over this worker's wall-clock budget of"
                    f" {self.max_wall_s:g} s (EFFICIENTLLM_MAX_JOB_WALL_S); train fewer tokens"
                    " or ask the operator to raise the cap"
                )
        return None
