"""Pure schedules: the size trajectory (params at a token count) and warmup + cosine LR."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from efficientllm.choices import Trajectory

if TYPE_CHECKING:
    from efficientllm.config import TrainConfig


def target_params(
    tokens: int,
    *,
    source: int,
    budget: int,
    start_tokens: int,
    prune_tokens: int,
    trajectory: Trajectory = "linear",
) -> int:
    """Target size after ``tokens``, with f = min(1, (t - t0) / T_prune) clamped at t < t0:
    linear P0 - (P0 - P*)·f (method.md), cubic P* + (P0 - P*)·(1 - f)^3 (Zhu & Gupta 2017)."""
    if prune_tokens <= 0:
        return budget
    frac = min(1.0, max(0.0, (tokens - start_tokens) / prune_tokens))
    if trajectory == "cubic":
        return int(round(budget + (source - budget) * (1.0 - frac) ** 3))
    if trajectory != "linear":
        raise ValueError(f"unknown trajectory {trajectory!r}")
    return int(round(source - (source - budget) * frac))


def cosine_lr(step: int, *, total: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Linear warmup to ``peak`` over ``warmup`` steps, then cosine down to ``min_ratio*peak``
    at ``total`` steps (step counts from 0 within the phase)."""
    if warmup > 0 and step < warmup:
        return peak * (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, (step - warmup) / span)
    floor = peak * min_ratio
    return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass(frozen=True, kw_only=True)
class StepPlan:
    """Step boundaries of a run, from token counts and the step size."""

    tokens_per_step: int
    total_steps: int
    prune_start_step: int
    prune_end_step: int
    """First step of recovery: the model is at the budget from here on."""
    trajectory: Trajectory = "linear"

    @classmethod
    def make(
        cls,
        *,
        total_tokens: int,
        tokens_per_step: int,
        start_fraction: float,
        prune_fraction: float,
        prune: bool = True,
        trajectory: Trajectory = "linear",
    ) -> StepPlan:
        """``prune=False``: no pruning phase; every step trains the fixed shape (recovery)."""
        total = max(1, total_tokens // tokens_per_step)
        if not prune:
            return cls(
                tokens_per_step=tokens_per_step,
                total_steps=total,
                prune_start_step=0,
                prune_end_step=0,
            )
        start = int(round(start_fraction * total))
        end = max(start + 1, int(round((start_fraction + prune_fraction) * total)))
        return cls(
            tokens_per_step=tokens_per_step,
            total_steps=total,
            prune_start_step=start,
            prune_end_step=min(end, total),
            trajectory=trajectory,
        )

    def phase(self, step: int) -> str:
        return "prune" if step < self.prune_end_step else "recovery"

    def target(self, step: int, *, source: int, budget: int) -> int:
        """Target params after ``step`` optimizer steps; reaches ``budget`` at prune_end_step."""
        return target_params(
            step * self.tokens_per_step,
            source=source,
            budget=budget,
            start_tokens=self.prune_start_step * self.tokens_per_step,
            prune_tokens=(self.prune_end_step - self.prune_start_step) * self.tokens_per_step,
            trajectory=self.trajectory,
        )


def learning_rate(step: int, plan: StepPlan, train: TrainConfig) -> float:
    """LR of optimizer step ``step``. continuous: one warmup + cosine over the run; rewarm: one
    over the pruning phase, then a fresh one at ``recovery_lr`` over recovery."""
    end = plan.prune_end_step
    if train.lr_schedule == "continuous":
        start, total, peak = 0, plan.total_steps, train.lr
    elif step < end:
        start, total, peak = 0, end, train.lr
    else:
        start, total, peak = end, plan.total_steps - end, train.recovery_lr
    return cosine_lr(
        step - start,
        total=total,
        peak=peak,
        warmup=train.warmup_steps,
        min_ratio=train.min_lr_ratio,
    )
