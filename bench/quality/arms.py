"""What the arms run: one trainer run, one-shot pruning, a random re-init, the shared evaluation.

The arms themselves (which of these each one calls, with which levers) are in ``specs.py``.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from bench.quality.scales import Scale


def train(
    name: str,
    source: Path,
    out: Path,
    scale: Scale,
    *,
    train_files: list[Path],
    heldout_files: list[Path],
    tokens: int,
    budget: str = "none",
    lr: float | None = None,
    deterministic: bool | None = None,
    levers: dict | None = None,
    say=print,
) -> dict:
    """One trainer run (pruning when ``budget`` is a budget, plain training for ``none``);
    ``levers`` are config-section updates on top (distillation, LR schedule, trajectory ...)."""
    from efficientllm.config import RunConfig
    from efficientllm.training.events import Evaluated, ListSink, Pruned, StepMetrics
    from efficientllm.training.trainer import Trainer

    if out.exists():
        shutil.rmtree(out)
    steps = max(1, tokens // scale.tokens_per_step)
    lr = scale.lr if lr is None else lr
    base = RunConfig.from_dict(
        {
            "model": {"source": str(source), "dtype": "auto"},
            "data": {
                "train": [str(f) for f in train_files],
                "heldout": [str(f) for f in heldout_files],
                "block_len": scale.block_len,
            },
            "budget": {"target": budget, "granularity": "global"},
            "schedule": {
                "prune_fraction": scale.prune_fraction,
                "prune_every": scale.prune_every,
            },
            "train": {
                "total_tokens": tokens,
                "batch_size": scale.batch_size,
                "lr": lr,
                "recovery_lr": lr,
                "warmup_steps": scale.warmup_steps,
                "eval_every": max(1, steps // scale.evals),
                "eval_tokens": scale.eval_tokens,
                "checkpoint_every": 0,
                "keep_checkpoints": 1,
                "seed": scale.seed,
                "device": scale.device,
                "deterministic": scale.deterministic if deterministic is None else deterministic,
            },
            "out_dir": str(out),
        }
    )
    cfg = base.replace(**(levers or {}))
    sink = _Progress(ListSink(), name, steps, say)
    t0 = time.perf_counter()
    result = Trainer(cfg, sink=sink).run()
    seconds = time.perf_counter() - t0
    events = sink.inner
    curve = [[e.tokens, e.ppl] for e in events.of(Evaluated)]
    losses = [[m.tokens, m.loss] for m in events.of(StepMetrics)]
    return {
        "export": str(result.export_path),
        "params": result.params,
        "train_tokens": result.step * scale.tokens_per_step,
        "steps": result.step,
        "seconds": round(seconds, 1),
        "curve": curve,
        "loss": losses,
        "pruning_events": len(events.of(Pruned)),
        "teacher_flops": result.teacher_flops,
        "levers": levers or {},
        "eval_protocol": events.of(Evaluated)[-1].protocol if events.of(Evaluated) else None,
    }


class _Progress:
    """Forwards events and prints a line every ~10% of the steps (long CPU runs)."""

    def __init__(self, inner, name: str, steps: int, say) -> None:
        self.inner, self.name, self.steps, self.say = inner, name, steps, say
        self.every = max(1, steps // 10)
        self.t0 = time.perf_counter()

    def emit(self, event) -> None:
        from efficientllm.training.events import Evaluated, StepMetrics

        self.inner.emit(event)
        if isinstance(event, StepMetrics) and event.step % self.every == 0:
            el = time.perf_counter() - self.t0
            eta = el / event.step * (self.steps - event.step)
            self.say(
                f"  [{self.name}] step {event.step}/{self.steps} loss {event.loss:.3f} "
                f"params {event.params:,} {event.tokens_per_s:,.0f} tok/s ETA {eta / 60:.1f} min"
            )
        elif isinstance(event, Evaluated):
            self.say(f"  [{self.name}] {event.label} ppl {event.ppl:.2f} @ {event.tokens:,} tokens")


def oneshot(
    source: Path,
    out: Path,
    scale: Scale,
    *,
    train_files: list[Path],
    granularity: str,
) -> dict:
    """One-shot pruning of ``source`` to the budget with calibration saliency (taylor1)."""
    from efficientllm.training.pipeline import OneShotJob, run_oneshot

    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    report = run_oneshot(
        OneShotJob(
            model=str(source),
            data=list(train_files),
            budget=scale.budget,
            out=out,
            granularity=granularity,
            scorer="taylor1",
            calib_batches=scale.calib_batches,
            batch_size=scale.batch_size,
            block_len=scale.block_len,
            eval_tokens=0,
            seed=scale.seed,
        )
    )
    return {
        "export": report["export"]["path"],
        "params": report["params"],
        "calibration_tokens": report["calibration"]["tokens"],
        "removed": report["removed"],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def random_like(export: Path, out: Path, *, seed: int) -> Path:
    """A random-init model folder with exactly the architecture of ``export``."""
    import torch

    from efficientllm.export import export_model
    from efficientllm.model_io import load_model, load_tokenizer

    model = load_model(export)
    torch.manual_seed(seed)
    fresh = type(model)(model.config)  # the model class's own init, seeded
    del model
    if out.exists():
        shutil.rmtree(out)
    export_model(fresh, out, tokenizer=load_tokenizer(export))
    return out


def final_eval(export: Path, heldout_docs, scale: Scale, task_cache: Path) -> dict:
    """The shared evaluation: whole-held-out perplexity + the offline lm-eval task."""
    from efficientllm.evaluation.harness import evaluate_offline
    from efficientllm.evaluation.mctask import NextSentenceSpec
    from efficientllm.evaluation.perplexity import perplexity
    from efficientllm.model_io import load_model, load_tokenizer, shape_from_config
    from efficientllm.training.data import tokenize_documents

    model = load_model(export)
    tok = load_tokenizer(export)
    stream = tokenize_documents(heldout_docs, tok, add_bos=False)
    ppl = perplexity(
        model,
        stream,
        block_len=scale.block_len,
        max_tokens=scale.final_eval_tokens,
        batch_size=scale.batch_size,
    )
    mc = evaluate_offline(
        model,
        tok,
        [d.text for d in heldout_docs],
        cache_root=task_cache,
        spec=NextSentenceSpec(n_items=scale.mc_items, seed=scale.seed),
        batch_size=scale.batch_size,
    )
    shape = shape_from_config(model.config.to_dict())
    return {
        "ppl": ppl.ppl,
        "ppl_protocol": ppl.protocol,
        "mc": mc,
        "params_counted": sum(p.numel() for p in model.parameters()),
        "shape": shape.to_dict(),
        "shape_summary": shape.describe(),
    }
