"""The pruning-aware loop on tiny models: trajectory, budget, events, granularity, stop, resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import save_tiny_corpus, save_tiny_source

from efficientllm.export import load_exported
from efficientllm.presets import build_config
from efficientllm.training.events import (
    CheckpointSaved,
    Evaluated,
    Exported,
    Finished,
    ListSink,
    PhaseChanged,
    Pruned,
    RunStarted,
    StepMetrics,
    Stopped,
    read_events,
)
from efficientllm.training.schedule import StepPlan
from efficientllm.training.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    d = tmp_path_factory.mktemp("assets")
    src = save_tiny_source(d / "src", "llama_gqa_tied")
    docs = save_tiny_corpus(d / "corpus")
    return src, docs


def _cfg(assets, out: Path, **over):
    src, docs = assets
    base = {
        "model": {"source": str(src)},
        "data": {"train": [str(p) for p in docs]},
        "out_dir": str(out),
    }
    for section, values in over.items():
        base.setdefault(section, {}).update(values)
    return build_config(preset="tiny-debug", overrides=base)


@pytest.mark.parametrize("granularity", ["global", "uniform"])
def test_trajectory_budget_events(assets, tmp_path, granularity) -> None:
    # linear: the size is still above the budget one step before the pruning phase ends
    # (a cubic trajectory may already sit within the tolerance there)
    cfg = _cfg(
        assets,
        tmp_path / "run",
        budget={"granularity": granularity},
        schedule={"trajectory": "linear"},
    )
    sink = ListSink()
    result = Trainer(cfg, sink=sink).run()
    started = sink.of(RunStarted)[0]
    budget, source = started.budget, started.source_params
    plan = StepPlan.make(
        total_tokens=cfg.train.total_tokens,
        tokens_per_step=4 * 32,
        start_fraction=0.0,
        prune_fraction=0.5,
        trajectory="linear",
    )
    steps = sink.of(StepMetrics)
    assert [s.step for s in steps] == list(range(1, plan.total_steps + 1))
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in steps)
    tol = cfg.budget.tolerance
    for s in steps:  # follows the trajectory: at or below target right after each event
        target = plan.target(s.step, source=source, budget=budget)
        if s.step % cfg.schedule.prune_every == 0 or s.step >= plan.prune_end_step:
            assert s.params <= max(target, budget), s
    end = next(s for s in steps if s.step == plan.prune_end_step)
    assert budget * (1 - tol) <= end.params <= budget  # exactly when the pruning phase ends
    before = next(s for s in steps if s.step == plan.prune_end_step - 1)
    assert before.params > budget  # ... and not earlier
    assert all(s.params == end.params for s in steps if s.step >= plan.prune_end_step)
    assert result.params == end.params
    pruned = sink.of(Pruned)
    assert pruned and all(p.params_after <= p.target_params for p in pruned)
    shapes = [p.shape["layers"] for p in pruned]
    if granularity == "uniform":
        assert all(len({json.dumps(x) for x in layers}) == 1 for layers in shapes)
    # order of the stream
    kinds = [type(e).__name__ for e in sink.events]
    assert kinds[0] == "RunStarted" and kinds[-1] == "Finished" and kinds[-2] == "Exported"
    labels = [e.label for e in sink.of(Evaluated)]
    assert labels == ["start", "after_pruning", "final"]
    assert sink.of(PhaseChanged)[0].step == plan.prune_end_step
    ev_steps = [e.step for e in sink.events]
    assert ev_steps == sorted(ev_steps)
    # the export reloads with the same count
    model = load_exported(result.export_path)
    assert sum(p.numel() for p in model.parameters()) == end.params
    assert sink.of(Exported)[0].params == end.params


def test_global_mode_can_make_layers_differ(assets, tmp_path) -> None:
    cfg = _cfg(assets, tmp_path / "run", budget={"granularity": "global"})
    sink = ListSink()
    Trainer(cfg, sink=sink).run()
    final = sink.of(Finished)[0].shape["layers"]
    assert len({json.dumps(x) for x in final}) > 1  # heterogeneous widths


def test_stop_checkpoints_and_rerun_continues(assets, tmp_path) -> None:
    cfg = _cfg(assets, tmp_path / "run", train={"deterministic": True})
    calls = {"n": 0}

    def stop_after_7() -> bool:
        calls["n"] += 1
        return calls["n"] > 7

    sink = ListSink()
    res = Trainer(cfg, sink=sink, should_stop=stop_after_7).run()
    assert res.status == "stopped" and res.step == 7
    assert sink.of(Stopped)[0].step == 7
    assert sink.of(CheckpointSaved)[-1].step == 7
    sink2 = ListSink()
    res2 = Trainer(cfg, sink=sink2).run()
    assert sink2.of(RunStarted)[0].resumed_from == 7
    assert res2.status == "finished" and min(res2.losses) == 8


def test_corrupt_newest_checkpoint_is_skipped(assets, tmp_path, caplog) -> None:
    cfg = _cfg(assets, tmp_path / "run", train={"checkpoint_every": 5})
    calls = {"n": 0}

    def stop_after_12() -> bool:
        calls["n"] += 1
        return calls["n"] > 12

    Trainer(cfg, sink=ListSink(), should_stop=stop_after_12).run()
    newest = tmp_path / "run" / "checkpoints" / "step-000012"
    (newest / "rng.safetensors").write_bytes(b"garbage")
    (tmp_path / "run" / "checkpoints" / ".tmp-step-000013-1").mkdir()
    sink = ListSink()
    with caplog.at_level("WARNING"):
        Trainer(cfg, sink=sink).run()
    assert sink.of(RunStarted)[0].resumed_from == 10
    assert "step-000012" in caplog.text
    assert not (tmp_path / "run" / "checkpoints" / ".tmp-step-000013-1").exists()


def _run_cli(cfg_path: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "efficientllm.cli", "run", "--config", str(cfg_path), "--quiet"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def _losses(events_path: Path, after: int = 0) -> dict[int, float]:
    out: dict[int, float] = {}
    for e in read_events(events_path):
        if isinstance(e, StepMetrics) and e.step > after:
            out[e.step] = e.loss
    return out


def test_sigkill_resume_matches_uninterrupted_run(assets, tmp_path) -> None:
    """A deterministic run killed with SIGKILL and restarted continues the same loss curve and
    ends with bitwise the same model as an uninterrupted run."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    over = {
        "train": {
            "deterministic": True,
            "total_tokens": 32 * 4 * 80,
            "checkpoint_every": 5,
            "eval_tokens": 0,
        }
    }
    cfgs = {}
    for name in ("ref", "killed"):
        cfg = _cfg(assets, tmp_path / name, **over)
        cfgs[name] = tmp_path / f"{name}.json"
        cfgs[name].write_text(json.dumps(cfg.to_dict()))
    ref = _run_cli(cfgs["ref"], env)
    assert ref.wait(timeout=300) == 0, ref.stderr.read().decode()[-2000:]

    proc = _run_cli(cfgs["killed"], env)
    events = tmp_path / "killed" / "events.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if events.exists() and any(
            isinstance(e, CheckpointSaved) and e.step >= 10 for e in read_events(events)
        ):
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not any(isinstance(e, Finished) for e in read_events(events)), "run ended before kill"
    killed_at = max(_losses(events))
    resumed = _run_cli(cfgs["killed"], env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read().decode()[-2000:]
    starts = [e for e in read_events(events) if isinstance(e, RunStarted)]
    assert len(starts) == 2 and starts[1].resumed_from is not None
    resume_step = starts[1].resumed_from
    assert 10 <= resume_step <= killed_at
    ref_losses = _losses(tmp_path / "ref" / "events.jsonl")
    after: dict[int, float] = {}
    seen_second = False
    for e in read_events(events):  # losses emitted by the resumed process only
        if isinstance(e, RunStarted) and e.resumed_from is not None:
            seen_second = True
        elif seen_second and isinstance(e, StepMetrics):
            after[e.step] = e.loss
    assert sorted(after) == list(range(resume_step + 1, 81))
    assert all(after[s] == ref_losses[s] for s in after), "loss curve differs after resume"
    a = load_file(tmp_path / "ref" / "export" / "model.safetensors")
    b = load_file(tmp_path / "killed" / "export" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_variant_b_compensation_run_reaches_budget(assets, tmp_path) -> None:
    cfg = _cfg(assets, tmp_path / "run", schedule={"compensation": "obs"})
    sink = ListSink()
    res = Trainer(cfg, sink=sink).run()
    budget = sink.of(RunStarted)[0].budget
    assert budget * (1 - cfg.budget.tolerance) <= res.params <= budget
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in sink.of(StepMetrics))
    assert sink.of(Pruned)


def test_budget_none_trains_the_source_shape_without_pruning(assets, tmp_path) -> None:
    """``budget.target: none`` = plain (continued) pretraining: the baseline arms' trainer."""
    cfg = _cfg(assets, tmp_path / "plain", budget={"target": "none"}, train={"eval_every": 4})
    sink = ListSink()
    result = Trainer(cfg, sink=sink).run()
    started = sink.of(RunStarted)[0]
    assert started.budget == started.source_params
    assert started.prune_end_step == 0
    assert sink.of(Pruned) == []
    steps = sink.of(StepMetrics)
    assert {s.phase for s in steps} == {"recovery"}
    assert {s.params for s in steps} == {started.source_params}
    assert result.params == started.source_params
    assert steps[-1].loss < steps[0].loss
    labels = [e.label for e in sink.of(Evaluated)]
    assert labels[0] == "start" and labels[-1] == "final" and "after_pruning" not in labels
    assert labels.count("step") >= 2
    model = load_exported(result.export_path)
    assert sum(p.numel() for p in model.parameters()) == started.source_params


# ---- training mode, throughput, distillation -------------------------------------------------


@pytest.fixture
def grad_forwards():
    """``model.training`` at every forward of an EfficientLLM model that builds a graph: the
    student's training steps (evaluation and the teacher run under no_grad)."""
    from efficientllm.modeling import EfficientLLMForCausalLM

    seen: list[bool] = []

    def hook(module, args):
        if isinstance(module, EfficientLLMForCausalLM) and torch.is_grad_enabled():
            seen.append(module.training)

    handle = torch.nn.modules.module.register_module_forward_pre_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def test_trains_in_training_mode_without_evaluation(assets, tmp_path, grad_forwards) -> None:
    """With eval_tokens 0 no evaluation ever switches the (eval-mode) loaded model to train()."""
    cfg = _cfg(assets, tmp_path / "run", train={"eval_tokens": 0, "total_tokens": 32 * 4 * 8})
    res = Trainer(cfg, sink=ListSink()).run()
    assert res.status == "finished" and res.step == 8
    assert len(grad_forwards) == 8  # one forward per step (grad_accum 1)
    assert all(grad_forwards), grad_forwards


def test_trains_in_training_mode_after_resume(assets, tmp_path, grad_forwards) -> None:
    """A resumed run (no 'start' evaluation) trains in training mode from its first step."""
    cfg = _cfg(assets, tmp_path / "run", train={"total_tokens": 32 * 4 * 12, "eval_tokens": 64})
    calls = {"n": 0}

    def stop_after_3() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    assert Trainer(cfg, sink=ListSink(), should_stop=stop_after_3).run().status == "stopped"
    grad_forwards.clear()
    sink = ListSink()
    res = Trainer(cfg, sink=sink).run()
    assert sink.of(RunStarted)[0].resumed_from == 3 and res.status == "finished"
    assert len(grad_forwards) == res.step - 3
    assert all(grad_forwards), grad_forwards.index(False)


def test_tokens_per_s_excludes_evaluation_and_checkpoint_time(assets, tmp_path, monkeypatch):
    """Evaluation and checkpointing made (virtually) 1000 s slow leave tokens/s untouched."""
    import efficientllm.evaluation.perplexity as evaluate_mod
    import efficientllm.training.checkpoint as ckpt_mod
    import efficientllm.training.trainer as trainer_mod

    class Clock:  # time.perf_counter plus the virtual time spent in evaluation/checkpoints
        offset = 0.0

        def perf_counter(self) -> float:
            return time.perf_counter() + self.offset

    clock = Clock()

    def slow(fn):
        def wrapped(*a, **kw):
            clock.offset += 1000.0
            return fn(*a, **kw)

        return wrapped

    monkeypatch.setattr(trainer_mod, "time", clock)
    monkeypatch.setattr(evaluate_mod, "perplexity", slow(evaluate_mod.perplexity))
    monkeypatch.setattr(ckpt_mod, "save", slow(ckpt_mod.save))
    over = {"total_tokens": 32 * 4 * 16, "eval_every": 3, "checkpoint_every": 5, "eval_tokens": 64}
    cfg = _cfg(assets, tmp_path / "run", train=over)
    sink = ListSink()
    Trainer(cfg, sink=sink).run()
    assert len(sink.of(Evaluated)) == 8 and len(sink.of(CheckpointSaved)) == 3  # 3,6,..,15; 8
    assert clock.offset == 11_000
    steps = sink.of(StepMetrics)
    slowest = min(steps, key=lambda s: s.tokens_per_s)
    # 128 tokens a step: a step that counted one slow evaluation would show < 0.13 tokens/s
    assert slowest.tokens_per_s > 128 / 100, slowest


def _distill_run(assets, out: Path, phases: str, **train):
    over = {"total_tokens": 32 * 4 * 12, "eval_tokens": 0, **train}
    cfg = _cfg(
        assets, out, train=over, distill={"weight": 0.5, "temperature": 2.0, "phases": phases}
    )
    sink = ListSink()
    tr = Trainer(cfg, sink=sink)
    return tr, tr.run(), sink


def test_distillation_from_the_source_counts_teacher_flops(assets, tmp_path) -> None:
    from efficientllm.model_io import load_model

    both, res, sink = _distill_run(assets, tmp_path / "both", "both")
    started = sink.of(RunStarted)[0]
    tokens_per_step, total, end = 4 * 32, started.total_steps, started.prune_end_step
    assert (total, end) == (12, 6)
    assert res.status == "finished" and started.budget * 0.99 <= res.params <= started.budget
    assert all(torch.isfinite(torch.tensor(s.loss)) for s in sink.of(StepMetrics))
    n = both.teacher.params
    assert n == started.source_params  # the teacher is the unpruned source
    assert both.teacher.tokens == total * tokens_per_step  # it ran on every step's batch
    assert res.teacher_flops == 2 * n * total * tokens_per_step == both.teacher.flops
    # ... frozen: its weights are still the source's after the student was trained and pruned
    src = load_model(assets[0]).state_dict()
    assert all(torch.equal(v, src[k]) for k, v in both.teacher.model.state_dict().items())
    # re-running the finished folder is a no-op that still reports what the run cost
    assert Trainer(both.cfg).run().teacher_flops == res.teacher_flops

    prune, res_p, sink_p = _distill_run(assets, tmp_path / "prune", "prune")
    assert res_p.status == "finished"
    assert prune.teacher.tokens == end * tokens_per_step  # the pruning phase only
    assert res_p.teacher_flops == 2 * n * end * tokens_per_step
    # the same training while both distil, different once only "both" still does
    lb, lp = res.losses, res_p.losses
    assert [lp[s] for s in range(1, end + 1)] == pytest.approx([lb[s] for s in range(1, end + 1)])
    assert max(abs(lp[s] - lb[s]) for s in range(end + 2, total + 1)) > 1e-4

    plain = Trainer(
        _cfg(
            assets,
            tmp_path / "plain",
            train={"total_tokens": 32 * 4 * 12, "eval_tokens": 0},
            distill={"weight": 0.0},
        )
    )
    res_0 = plain.run()
    assert plain.teacher is None and res_0.teacher_flops == 0
    assert res_0.losses[1] == pytest.approx(lb[1])  # the reported loss is the LM loss
    assert max(abs(res_0.losses[s] - lb[s]) for s in range(2, total + 1)) > 1e-4


def test_stopped_distillation_run_reports_teacher_flops_so_far(assets, tmp_path) -> None:
    calls = {"n": 0}

    def stop_after_4() -> bool:
        calls["n"] += 1
        return calls["n"] > 4

    over = {"total_tokens": 32 * 4 * 12, "eval_tokens": 0}
    cfg = _cfg(assets, tmp_path / "run", train=over, distill={"weight": 0.3})
    tr = Trainer(cfg, sink=ListSink(), should_stop=stop_after_4)
    res = tr.run()
    n, tokens_per_step = tr.teacher.params, 4 * 32
    assert res.status == "stopped" and res.step == 4
    assert res.teacher_flops == 2 * n * 4 * tokens_per_step == tr.teacher.flops
    tr2 = Trainer(cfg, sink=ListSink())
    res2 = tr2.run()  # resumes at step 4
    assert res2.status == "finished" and tr2.teacher.tokens == 8 * tokens_per_step
    assert res2.teacher_flops == 2 * n * 12 * tokens_per_step  # the whole run, across the resume


def test_teacher_with_another_vocabulary_is_refused_before_training(assets, tmp_path) -> None:
    from efficientllm.errors import ConfigError

    other = save_tiny_source(tmp_path / "other", "llama_gqa_tied", vocab_size=80)
    same = save_tiny_source(tmp_path / "same", "llama_gqa_tied", seed=3)
    distill = {"weight": 0.5, "teacher": str(other)}
    sink = ListSink()
    with pytest.raises(ConfigError, match="vocabulary of 80 tokens"):
        Trainer(_cfg(assets, tmp_path / "bad", distill=distill), sink=sink).run()
    assert not sink.of(StepMetrics) and not (tmp_path / "bad" / "checkpoints").exists()
    with pytest.raises(ConfigError, match="distill.teacher"):
        missing = {"weight": 0.5, "teacher": str(tmp_path / "nowhere")}
        Trainer(_cfg(assets, tmp_path / "missing", distill=missing)).run()
    tr = Trainer(
        _cfg(
            assets,
            tmp_path / "ok",
            train={"total_tokens": 32 * 4 * 4, "eval_tokens": 0},
            distill={"weight": 0.5, "teacher": str(same)},
        )
    )
    assert tr.run().status == "finished" and tr.teacher is not None
