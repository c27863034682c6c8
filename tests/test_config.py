"""The run config: every problem reported at once, YAML/JSON, presets, schedules."""

from __future__ import annotations

import json

import pytest
import yaml

from efficientllm.config import RunConfig, TrainConfig, field_docs, load_config
from efficientllm.errors import ConfigError
from efficientllm.presets import build_config, preset_dict, preset_names
from efficientllm.schedule import Plan, cosine_lr, target_params


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
    plan = Plan.make(total_tokens=1000, tokens_per_step=10, start_fraction=0.1, prune_fraction=0.5)
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
    plan = Plan.make(
        total_tokens=1000, tokens_per_step=100, start_fraction=0, prune_fraction=0.5, prune=False
    )
    assert (plan.total_steps, plan.prune_start_step, plan.prune_end_step) == (10, 0, 0)
    assert {plan.phase(s) for s in range(10)} == {"recovery"}
    assert plan.target(3, source=500, budget=500) == 500
