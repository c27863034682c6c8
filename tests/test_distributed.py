"""One tiny pruning-aware job on 2 CPU processes (gloo) against the same job on 1 process with the
same global batch: the same blocks, the same decisions on both ranks, the same final shape and
parameter count, per-step losses equal within float tolerance; a crash + resume on 2 processes
continues the curve; FSDP is refused with a clear error; a decision mismatch raises."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as tdist
from tiny import save_tiny_corpus, save_tiny_source

from efficientllm.config import RunConfig
from efficientllm.errors import DecisionMismatchError
from efficientllm.presets import build_config
from efficientllm.pruning.decide import Drops
from efficientllm.training.data import BlockSampler
from efficientllm.training.distributed import ShardedSampler, World
from efficientllm.training.events import ListSink, Pruned, RunStarted, StepMetrics, Stopped
from efficientllm.training.launch import spawn
from efficientllm.training.trainer import Trainer

CRASH = 137
LOSS_ATOL = 1e-4
"""1 vs 2 processes: the gradient of the global batch is summed in a different order (two
half-batch means averaged by the all-reduce vs one mean), so losses agree to float rounding,
amplified a little by 40 AdamW steps; measured max difference is reported by the test."""


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    d = tmp_path_factory.mktemp("assets")
    return save_tiny_source(d / "src", "llama_gqa_tied"), save_tiny_corpus(d / "corpus")


def _cfg(assets: tuple[Path, list[Path]], out: Path, batch_size: int) -> dict[str, Any]:
    src, docs = assets
    over = {
        "model": {"source": str(src)},
        "data": {"train": [str(p) for p in docs]},
        "train": {"batch_size": batch_size, "deterministic": True, "device": "cpu"},
        "budget": {"granularity": "global"},
        "out_dir": str(out),
    }
    return build_config(preset="tiny-debug", overrides=over).to_dict()


def _job(rank: int, cfg: dict[str, Any], report: str, crash_before: int) -> None:
    """One rank of a run; writes what it saw to ``report`` (``{rank}`` filled in)."""
    polls = {"n": 0}

    def should_stop() -> bool:  # a crash (not a stop): the process dies without a checkpoint
        polls["n"] += 1
        if crash_before and polls["n"] >= crash_before:
            os._exit(CRASH)
        return False

    sink = ListSink()
    trainer = Trainer(RunConfig.from_dict(cfg), sink=sink, should_stop=should_stop)
    result = trainer.run()
    assert trainer.state is not None
    record = {
        "losses": {str(k): v for k, v in result.losses.items()},
        "decisions": trainer.decisions,
        "params": result.params,
        "numel": sum(p.numel() for p in trainer.state.parameters()),
        "shape": trainer.state.shape.to_dict(),
        "events": len(sink.events),
        "pruned": [e.removed for e in sink.of(Pruned)],
    }
    Path(report.format(rank=rank)).write_text(json.dumps(record), encoding="utf-8")


def _run(cfg: dict[str, Any], nprocs: int, report: Path, crash_before: int = 0) -> list[dict]:
    spawn(_job, nprocs, cfg, str(report), crash_before)
    return [json.loads(Path(str(report).format(rank=r)).read_text()) for r in range(nprocs)]


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict]]:
    d = tmp_path_factory.mktemp("runs")
    one = _run(_cfg(assets, d / "one", 4), 1, d / "one-{rank}.json")
    two = _run(_cfg(assets, d / "two", 2), 2, d / "two-{rank}.json")
    return {"one": one, "two": two}


def test_two_processes_match_one(runs: dict[str, list[dict]]) -> None:
    (one,), (r0, r1) = runs["one"], runs["two"]
    assert r0["decisions"] and r0["decisions"] == r1["decisions"]  # identical on both ranks
    assert r0["decisions"] == one["decisions"]  # ... and the same as on one process
    assert r0["shape"] == r1["shape"] == one["shape"]
    assert r0["params"] == r1["params"] == one["params"] == r0["numel"] == one["numel"]
    assert r0["pruned"] == one["pruned"] and r1["events"] == 0  # events from rank 0 only
    assert r0["losses"] == r1["losses"]  # the all-reduced loss of the global batch
    assert set(r0["losses"]) == set(one["losses"])
    diff = max(abs(r0["losses"][k] - one["losses"][k]) for k in one["losses"])
    print(f"max |loss(2 processes) - loss(1 process)| over 40 steps: {diff:.3g}")
    assert diff <= LOSS_ATOL


def test_crash_and_resume_on_two_processes(assets, runs, tmp_path: Path) -> None:
    cfg = _cfg(assets, tmp_path / "run", 2)
    with pytest.raises(Exception, match=str(CRASH)):  # both ranks die before step 14
        _run(cfg, 2, tmp_path / "crashed-{rank}.json", crash_before=14)
    assert (tmp_path / "run" / "checkpoints" / "step-000010").is_dir()
    r0, r1 = _run(cfg, 2, tmp_path / "resumed-{rank}.json")
    assert sorted(map(int, r0["losses"])) == list(range(11, 41))  # resumed from step 10
    full = runs["two"][0]
    diff = max(abs(v - full["losses"][k]) for k, v in r0["losses"].items())
    print(f"max |loss(resumed) - loss(uninterrupted)| steps 11-40: {diff:.3g}")
    assert diff == 0.0  # deterministic: the resumed curve is the uninterrupted one
    assert r0["shape"] == r1["shape"] == full["shape"] and r0["params"] == full["params"]


def _fsdp_job(rank: int, cfg: dict[str, Any], report: str) -> None:
    os.environ["ACCELERATE_USE_FSDP"] = "true"
    try:
        Trainer(RunConfig.from_dict(cfg)).run()
        msg = "no error"
    except Exception as err:
        msg = f"{type(err).__name__}: {err}"
    Path(report.format(rank=rank)).write_text(msg, encoding="utf-8")


def test_fsdp_is_refused_clearly(assets, tmp_path: Path) -> None:
    report = str(tmp_path / "fsdp-{rank}.txt")
    spawn(_fsdp_job, 2, _cfg(assets, tmp_path / "run", 2), report)
    for r in range(2):
        msg = Path(report.format(rank=r)).read_text()
        assert msg.startswith("ConfigError: FSDP is not supported"), msg
    assert not (tmp_path / "run" / "checkpoints").exists()


def _mismatch_job(rank: int, report: str) -> None:
    tdist.init_process_group("gloo")
    try:
        world = World(rank=rank, size=2)
        same = Drops(ffn={0: {1, 2}}, hidden={3})
        world.check_decision(same, step=4)  # equal drops pass
        try:
            world.check_decision(Drops(ffn={0: {rank}}), step=6)
            msg = "no error"
        except DecisionMismatchError as err:
            msg = str(err)
        Path(report.format(rank=rank)).write_text(msg, encoding="utf-8")
    finally:
        tdist.destroy_process_group()


def test_decision_mismatch_raises_on_every_rank(tmp_path: Path) -> None:
    report = str(tmp_path / "mismatch-{rank}.txt")
    spawn(_mismatch_job, 2, report)
    for r in range(2):
        msg = Path(report.format(rank=r)).read_text()
        assert "different groups to prune at step 6" in msg and "nothing was removed" in msg


def test_sharded_sampler_sees_the_global_batches() -> None:
    blocks = torch.arange(22 * 3).reshape(22, 3)
    ref = BlockSampler(blocks, batch_size=4, seed=5)
    ranks = [
        ShardedSampler(blocks, batch_size=2, seed=5, world=World(rank=r, size=2)) for r in (0, 1)
    ]
    for _ in range(12):  # crosses two epoch ends (5 full global batches per epoch)
        want = next(ref)
        got = torch.cat([next(s) for s in ranks])
        assert torch.equal(got, want)
        assert ranks[0].last_indices + ranks[1].last_indices == ref.last_indices
    assert ranks[0].state_dict() == ranks[1].state_dict() == ref.state_dict()
    again = ShardedSampler(blocks, batch_size=2, seed=5, world=World(rank=1, size=2))
    again.load_state_dict(ref.state_dict())
    assert torch.equal(next(again), next(ref)[2:])


def test_worker_runs_a_job_on_two_processes(assets, runs, tmp_path: Path) -> None:
    """``EFFICIENTLLM_GPUS_PER_JOB=2``: the task forwards rank 0's events, a stop request
    (cancel) stops both ranks at a checkpoint, and the next attempt resumes and finishes."""
    pytest.importorskip("celery", reason="worker extras not installed")
    from worker.parallel import run_parallel

    cfg = RunConfig.from_dict(_cfg(assets, tmp_path / "job", 2))
    sink = ListSink()
    stop_when = lambda: any(isinstance(e, StepMetrics) and e.step >= 5 for e in sink.events)  # noqa: E731
    first = run_parallel(cfg, nprocs=2, sink=sink, should_stop=stop_when)
    started = sink.of(RunStarted)[0]
    assert started.num_processes == 2 and first.status == "stopped"
    assert sink.of(Stopped)[0].step == first.step >= 5
    sink2 = ListSink()
    second = run_parallel(cfg, nprocs=2, sink=sink2, should_stop=lambda: False)
    assert sink2.of(RunStarted)[0].resumed_from == first.step
    assert second.status == "finished" and second.params == runs["two"][0]["params"]
    assert second.export_path is not None and (second.export_path / "config.json").is_file()
