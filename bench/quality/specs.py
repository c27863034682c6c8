"""The arms of the benchmark: what each one trains, as data.

Every arm ends at the same budget (within the pruner's 0.5% tolerance; arm c copies the shape of
the pruning-aware arm it follows exactly), sees the same training batches in the same order (one
seed) and the same number of training tokens; one-shot calibration batches are forward/backward
passes without weight updates and are reported separately.

``levers`` are config-section updates over the trainer's defaults (``RunConfig.replace`` style);
the string ``"<source>"`` in them stands for the benchmark's source model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import reduce
from typing import Any, Literal

from efficientllm import presets

Kind = Literal["aware", "oneshot", "scratch"]

PAPER = {
    "distill": {"weight": 0.0},
    "train": {"lr_schedule": "rewarm"},
    "schedule": {"trajectory": "linear"},
    "saliency": {"mode": "window"},
}
"""The paper's recipe, spelled out (the config's defaults are the best lever set below)."""
NO_KD = {"distill": {"weight": 0.0}}
KD = {"distill": {"weight": 0.5, "temperature": 1.0, "teacher": "<source>"}}
"""Distillation from the frozen source: half the loss is logit KL at T=1."""
CONTINUOUS = {"train": {"lr_schedule": "continuous"}}
CUBIC = {"schedule": {"trajectory": "cubic"}}
EMA = {"saliency": {"mode": "ema", "beta": 0.9}}


def merge(*parts: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Lever sets deep-merged left to right (the presets' own merge)."""
    return reduce(presets.merge, parts, {})


BEST = merge(PAPER, KD, CONTINUOUS, CUBIC, EMA)
"""The best lever set: every lever on (chosen before the cpu-real run, where it won; it is the
config's default since; see the README)."""


@dataclass(frozen=True)
class Arm:
    method: str
    kind: Kind
    levers: dict[str, dict[str, Any]] = field(default_factory=dict)
    granularity: str = "global"
    """One-shot arms: global (per-layer widths) or uniform."""


ARMS: dict[str, Arm] = {
    "a": Arm("pruning-aware pretraining (variant A, the paper's defaults)", "aware", PAPER),
    "a_best": Arm(
        "pruning-aware pretraining, best lever set (KD + continuous LR + cubic + EMA)",
        "aware",
        BEST,
    ),
    "a_kd": Arm("a + knowledge distillation from the source", "aware", merge(PAPER, KD)),
    "a_cont": Arm("a + one continuous LR schedule", "aware", merge(PAPER, CONTINUOUS)),
    "a_cubic": Arm("a + cubic size trajectory", "aware", merge(PAPER, CUBIC)),
    "a_ema": Arm("a + EMA saliency (beta 0.9)", "aware", merge(PAPER, EMA)),
    "a_nokd": Arm(
        "a + continuous LR + cubic + EMA (the best set without KD)",
        "aware",
        merge(PAPER, CONTINUOUS, CUBIC, EMA),
    ),
    "b": Arm("one-shot pruning (global) + continued pretraining", "oneshot", NO_KD),
    "b_kd": Arm(
        "one-shot pruning (global) + continued pretraining with KD from the source", "oneshot", KD
    ),
    "c": Arm("the pruning-aware arm's final architecture from random init", "scratch", NO_KD),
    "d": Arm(
        "uniform one-shot pruning + continued pretraining", "oneshot", NO_KD, granularity="uniform"
    ),
    "e": Arm(
        "pruning-aware pretraining (variant B: OBS compensation)",
        "aware",
        merge(PAPER, {"schedule": {"compensation": "obs"}}),
    ),
}
"""Every arm, in report order."""


def parse_arms(text: str) -> list[str]:
    """``abcde`` (one letter an arm, as before) or a comma list such as ``a_best,a,b,b_kd,c``."""
    names = [t.strip() for t in text.split(",")] if "," in text or "_" in text else list(text)
    names = [n for n in names if n]
    unknown = [n for n in names if n not in ARMS]
    if unknown:
        raise SystemExit(f"error: --arms: unknown arm(s) {unknown}; known: {', '.join(ARMS)}")
    return [k for k in ARMS if k in names]


def scratch_parent(arms: list[str], kept: dict) -> str:
    """The pruning-aware arm that arm c re-initialises: a_best when run, else a."""
    for pool in (arms, kept):  # an arm run now wins over one kept from an earlier run
        for key in ("a_best", "a"):
            if key in pool:
                return key
    raise SystemExit(
        "error: arm c trains a pruning-aware arm's final architecture; add a or a_best"
    )


def resolve(levers: dict[str, dict[str, Any]], source: str) -> dict[str, dict[str, Any]]:
    return {
        sec: {k: (source if v == "<source>" else v) for k, v in vals.items()}
        for sec, vals in levers.items()
    }
