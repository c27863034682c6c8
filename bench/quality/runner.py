"""Run arms: one arm end to end (train + shared evaluation), and several side by side.

With ``jobs > 1`` the arms run in that many spawned processes, each on its own thread(s)
(``deterministic`` scales: one thread, deterministic kernels), so a 2-core machine runs two arms
at once and each arm's numbers are the same as when run alone. Arm ``c`` starts once the
pruning-aware arm whose architecture it copies has finished.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from bench.quality.scales import Scale
from bench.quality.specs import ARMS, resolve


@dataclass(frozen=True)
class ArmContext:
    source: str
    work: Path
    scale: Scale
    train_files: list[Path]
    heldout_files: list[Path]
    task_cache: Path
    t0: float
    """Wall-clock (``time.time()``) origin of the log lines, shared by the child processes."""


def _say(ctx: ArmContext):
    def say(msg: str) -> None:
        print(f"[{(time.time() - ctx.t0) / 60:5.1f} min] {msg}", flush=True)

    return say


def run_arm(key: str, ctx: ArmContext, parent_export: str | None = None) -> dict:
    """Train arm ``key`` and evaluate it; writes ``<work>/<key>/arm.json`` and returns it."""
    import torch

    from bench.quality.arms import final_eval, oneshot, random_like, train
    from efficientllm.training.data import read_documents

    scale, arm, say = ctx.scale, ARMS[key], _say(ctx)
    if scale.deterministic:
        torch.set_num_threads(1)
        torch.use_deterministic_algorithms(True)
    levers = resolve(arm.levers, ctx.source)
    common = dict(
        train_files=ctx.train_files, heldout_files=ctx.heldout_files, say=say, levers=levers
    )
    out, extra = ctx.work / key, {}
    say(f"arm {key}: {arm.method}")
    if arm.kind == "aware":
        run = train(
            key,
            Path(ctx.source),
            out,
            scale,
            tokens=scale.arm_tokens,
            budget=scale.budget,
            **common,
        )
    elif arm.kind == "oneshot":
        shot = oneshot(
            Path(ctx.source),
            out / "oneshot",
            scale,
            train_files=ctx.train_files,
            granularity=arm.granularity,
        )
        run = train(
            key, Path(shot["export"]), out / "train", scale, tokens=scale.arm_tokens, **common
        )
        run["seconds"] = round(run["seconds"] + shot["seconds"], 1)
        extra = {"oneshot": {k: v for k, v in shot.items() if k != "export"}}
    else:
        if parent_export is None:
            raise ValueError("arm c needs the export of a pruning-aware arm")
        init = random_like(Path(parent_export), out / "init", seed=scale.seed)
        run = train(key, init, out / "train", scale, tokens=scale.arm_tokens, **common)
    say(f"arm {key}: final evaluation (held-out text + lm-eval next_sentence)")
    ev = final_eval(Path(run["export"]), read_documents(ctx.heldout_files), scale, ctx.task_cache)
    result = {"name": key, "method": arm.method, **run, **extra, **ev}
    (out / "arm.json").write_text(json.dumps(result, indent=2), encoding="utf-8")
    say(
        f"arm {key}: ppl {ev['ppl']:.2f}, {run['params']:,} params, "
        f"{run['train_tokens']:,} tokens, {run['seconds'] / 60:.1f} min"
    )
    return result


def run_arms(
    arms: list[str], ctx: ArmContext, *, jobs: int, parent: str | None, done: dict[str, dict]
) -> dict[str, dict]:
    """Run ``arms`` (``c`` after ``parent``), ``jobs`` at a time; returns key -> result."""
    results: dict[str, dict] = {}
    first = [k for k in arms if ARMS[k].kind != "scratch"]
    later = [k for k in arms if ARMS[k].kind == "scratch"]

    def parent_export() -> str | None:
        src = results.get(parent) or done.get(parent) if parent else None
        return src["export"] if src else None

    if jobs <= 1:
        for key in first + later:
            results[key] = run_arm(key, ctx, parent_export())
        return results
    # the longest arms first, so the two processes finish close together
    first.sort(key=lambda k: (ARMS[k].kind != "aware", "distill" not in ARMS[k].levers))
    with ProcessPoolExecutor(max_workers=jobs, mp_context=get_context("spawn")) as pool:
        pending: dict[Future, str] = {pool.submit(run_arm, k, ctx): k for k in first}
        while pending or later:
            ready = parent is None or parent in results or parent in done
            if later and not ready and not pending:
                raise RuntimeError(f"arm c waits for arm {parent}, which is not being run")
            if later and ready:
                for key in later:
                    pending[pool.submit(run_arm, key, ctx, parent_export())] = key
                later = []
            finished, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for fut in finished:
                key = pending.pop(fut)
                try:
                    results[key] = fut.result()
                except BaseException:
                    # queued arms are dropped; finished ones are in <work>/<key>/arm.json
                    pool.shutdown(wait=False, cancel_futures=True)
                    raise
    return results
