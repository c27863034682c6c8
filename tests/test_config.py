"""The run config: every problem reported at once, YAML/JSON, presets, schedules."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from efficientllm.config import RunConfig, TrainConfig, field_docs, load_config
from efficientllm.errors import ConfigError
from efficientllm.presets import build_config, preset_dict, preset_names
from efficientllm.training.schedule import StepPlan, cosine_lr, learning_rate, target_params


def test_all_problems_at_once() -> None:
    bad = {
        "model": {"source": ""},
        "train": {"lr": -1, "batch_size": "x", "bogus": 1},
        "budget": {"granularity": "weird", "target": "abc"},
    }
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(bad)
    text = str(err.value)
    for needle in (
        "model.source",
        "train.lr",
        "train.batch_size",
        "train.bogus",
        "budget.granularity",
        "budget.target",
        "data.train",
    ):
        assert needle in text
    assert len(err.value.problems) == 7


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_load_yaml_and_json(tmp_path, suffix) -> None:
    d = {
        "model": {"source": "org/name"},
        "data": {"train": ["a.txt"]},
        "budget": {"target": "67M"},
        "train": {"total_tokens": 4096, "batch_size": 2},
    }
    path = tmp_path / f"job{suffix}"
    path.write_text(yaml.safe_dump(d) if suffix == ".yaml" else json.dumps(d))
    cfg = load_config(path)
    assert cfg.budget.target == "67M" and cfg.train.batch_size == 2
    assert RunConfig.from_dict(cfg.to_dict()) == cfg


def test_every_field_is_documented() -> None:
    import dataclasses

    for section in dataclasses.fields(RunConfig):
        cls = section.type if isinstance(section.type, type) else None
        cls = cls or getattr(RunConfig(), section.name).__class__
        if dataclasses.is_dataclass(cls):
            docs = field_docs(cls)
            assert {f.name for f in dataclasses.fields(cls)} <= set(docs), cls
    assert "Training tokens" in field_docs(TrainConfig)["total_tokens"]


@pytest.mark.parametrize("name", preset_names())
def test_presets_are_valid(name) -> None:
    d = preset_dict(name)
    over = {"model": {"source": "x/y"}, "data": {"train": ["a.txt"]}}
    cfg = build_config(preset=name, overrides=over if "model" not in d else {})
    assert cfg.train.total_tokens > 0


def test_trajectory_and_lr() -> None:
    assert target_params(0, source=100, budget=50, start_tokens=0, prune_tokens=10) == 100
    assert target_params(5, source=100, budget=50, start_tokens=0, prune_tokens=10) == 75
    assert target_params(99, source=100, budget=50, start_tokens=0, prune_tokens=10) == 50
    plan = StepPlan.make(
        total_tokens=1000, tokens_per_step=10, start_fraction=0.1, prune_fraction=0.5
    )
    assert (plan.total_steps, plan.prune_start_step, plan.prune_end_step) == (100, 10, 60)
    assert plan.target(60, source=100, budget=50) == 50 and plan.phase(60) == "recovery"
    assert cosine_lr(0, total=10, peak=1.0, warmup=2, min_ratio=0.1) == 0.5
    assert cosine_lr(10, total=10, peak=1.0, warmup=2, min_ratio=0.1) == pytest.approx(0.1)


def test_budget_none_means_no_pruning_plan() -> None:
    cfg = RunConfig.from_dict(
        {"model": {"source": "x/y"}, "data": {"train": ["a.txt"]}, "budget": {"target": "None"}}
    )
    assert cfg.budget.no_pruning
    assert not RunConfig().budget.no_pruning
    plan = StepPlan.make(
        total_tokens=1000, tokens_per_step=100, start_fraction=0, prune_fraction=0.5, prune=False
    )
    assert (plan.total_steps, plan.prune_start_step, plan.prune_end_step) == (10, 0, 0)
    assert {plan.phase(s) for s in range(10)} == {"recovery"}
    assert plan.target(3, source=500, budget=500) == 500


def test_cubic_and_linear_trajectories() -> None:
    kw = dict(source=1000, budget=200, start_tokens=20, prune_tokens=100)
    lin = {t: target_params(t, **kw, trajectory="linear") for t in (0, 20, 30, 70, 90, 120, 500)}
    cub = {t: target_params(t, **kw, trajectory="cubic") for t in (0, 20, 30, 70, 90, 120, 500)}
    assert lin == {0: 1000, 20: 1000, 30: 920, 70: 600, 90: 440, 120: 200, 500: 200}
    # P* + (P0 - P*)(1 - f)^3: f = 0.1 -> 200 + 800*0.729, f = 0.5 -> 300, f = 0.7 -> 221.6
    assert cub == {0: 1000, 20: 1000, 30: 783, 70: 300, 90: 222, 120: 200, 500: 200}
    assert target_params(30, source=1000, budget=200, start_tokens=20, prune_tokens=100) == 920
    with pytest.raises(ValueError, match="trajectory"):
        target_params(30, **kw, trajectory="exp")  # type: ignore[arg-type]
    plan = StepPlan.make(
        total_tokens=1000,
        tokens_per_step=10,
        start_fraction=0.1,
        prune_fraction=0.5,
        trajectory="cubic",
    )
    assert plan.target(10, source=1000, budget=200) == 1000
    assert plan.target(35, source=1000, budget=200) == 300  # half way: 200 + 800/8
    assert plan.target(60, source=1000, budget=200) == 200  # the budget at prune_end_step
    assert plan.target(99, source=1000, budget=200) == 200
    cubic = [plan.target(s, source=1000, budget=200) for s in range(101)]
    assert cubic == sorted(cubic, reverse=True)
    assert (
        StepPlan.make(
            total_tokens=1000, tokens_per_step=10, start_fraction=0.1, prune_fraction=0.5
        ).target(35, source=1000, budget=200)
        == 600
    )


def _lrs(schedule: str) -> tuple[list[float], StepPlan]:
    over = {
        "model": {"source": "x/y"},
        "data": {"train": ["a.txt"], "block_len": 32},
        "train": {
            "total_tokens": 32 * 4 * 40,
            "batch_size": 4,
            "lr": 1e-3,
            "recovery_lr": 5e-4,
            "warmup_steps": 2,
            "min_lr_ratio": 0.1,
            "lr_schedule": schedule,
        },
        "schedule": {"prune_fraction": 0.5, "start_fraction": 0.0},
    }
    cfg = build_config(preset="tiny-debug", overrides=over)
    plan = StepPlan.make(
        total_tokens=32 * 4 * 40, tokens_per_step=128, start_fraction=0, prune_fraction=0.5
    )
    assert (plan.total_steps, plan.prune_end_step) == (40, 20)
    return [learning_rate(s, plan, cfg.train) for s in range(plan.total_steps)], plan


def test_continuous_lr_is_one_warmup_cosine_over_the_run() -> None:
    lrs, plan = _lrs("continuous")
    peak, floor = 1e-3, 1e-4
    assert lrs[:2] == pytest.approx([peak / 2, peak])
    for s in range(2, 40):  # one cosine over all 40 steps; recovery_lr is unused
        ref = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (s - 2) / 38))
        assert lrs[s] == pytest.approx(ref, rel=1e-12), s
    assert all(a >= b for a, b in zip(lrs[1:], lrs[2:], strict=False))  # no re-warmup at 20
    assert lrs[plan.prune_end_step] == pytest.approx(
        floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * 18 / 38))
    )


def test_rewarm_lr_warms_up_again_for_recovery() -> None:
    lrs, plan = _lrs("rewarm")
    peak, floor, rpeak = 1e-3, 1e-4, 5e-4
    assert lrs[:2] == pytest.approx([peak / 2, peak])
    for s in range(2, 20):  # the pruning phase: cosine over its 20 steps
        ref = floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (s - 2) / 18))
        assert lrs[s] == pytest.approx(ref, rel=1e-12), s
    end = plan.prune_end_step
    assert lrs[end : end + 2] == pytest.approx([rpeak / 2, rpeak])  # fresh warmup
    assert lrs[end + 1] > lrs[end - 1]
    rfloor = rpeak * 0.1
    for s in range(end + 2, 40):
        ref = rfloor + (rpeak - rfloor) * 0.5 * (1 + math.cos(math.pi * (s - end - 2) / 18))
        assert lrs[s] == pytest.approx(ref, rel=1e-12), s


@pytest.mark.parametrize(
    "section,values,needle",
    [
        ("distill", {"weight": 1.5}, "distill.weight"),
        ("distill", {"weight": -0.1}, "distill.weight"),
        ("distill", {"temperature": 0}, "distill.temperature"),
        ("distill", {"temperature": -1.0}, "distill.temperature"),
        ("distill", {"phases": "always"}, "distill.phases"),
        ("train", {"lr_schedule": "step"}, "train.lr_schedule"),
        ("schedule", {"trajectory": "exp"}, "schedule.trajectory"),
    ],
)
def test_new_levers_are_validated(section, values, needle) -> None:
    d = {"model": {"source": "x/y"}, "data": {"train": ["a.txt"]}, section: values}
    with pytest.raises(ConfigError) as err:
        RunConfig.from_dict(d)
    assert needle in str(err.value) and len(err.value.problems) == 1


def test_distill_defaults_and_valid_edges() -> None:
    base = {"model": {"source": "x/y"}, "data": {"train": ["a.txt"]}}
    cfg = RunConfig.from_dict(base)
    # the defaults are the lever set that won bench/quality --scale cpu-real (README)
    assert cfg.distill.enabled and cfg.distill.weight == 0.5 and cfg.distill.temperature == 1.0
    assert cfg.distill.teacher == "" and cfg.distill.phases == "both"
    assert cfg.train.lr_schedule == "continuous" and cfg.schedule.trajectory == "cubic"
    assert cfg.saliency.mode == "ema" and cfg.saliency.beta == 0.9
    off = RunConfig.from_dict({**base, "distill": {"weight": 0}})
    assert not off.distill.enabled
    for w in (0.0, 0.3, 1.0):
        assert RunConfig.from_dict({**base, "distill": {"weight": w}}).distill.weight == w
    cfg = RunConfig.from_dict({**base, "distill": {"weight": 0.5, "temperature": 2.0}})
    assert cfg.distill.enabled and RunConfig.from_dict(cfg.to_dict()) == cfg
