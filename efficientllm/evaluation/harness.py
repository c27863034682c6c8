"""Zero-shot evaluation through EleutherAI's lm-evaluation-harness (``lm_eval`` 0.4.x).

``EfficientLM`` wraps any causal LM that returns ``.logits`` (our heterogeneous
``EfficientLLMForCausalLM``, its exports, vanilla Llama/Qwen/Mistral models) as an lm-eval model.
It is registered as ``efficientllm``, so after ``import efficientllm.evaluation.harness``
(or through ``python -m efficientllm.evaluation.harness``, which forwards to lm-eval's own CLI)::

    python -m efficientllm.evaluation.harness run --model efficientllm \\
        --model_args pretrained=runs/x/export --tasks arc_easy

loads the folder with our safe loaders (safetensors only, no remote code).

``run_tasks`` runs lm-eval tasks on an in-memory model; ``evaluate_offline`` builds the offline
``next_sentence`` task (``efficientllm.evaluation.mctask``) from held-out text and runs it, so
the harness path works without the Hugging Face hub.

This module imports torch and lm-eval; ``import efficientllm`` and the CLI import it lazily.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import random
import sys
from collections.abc import Iterator, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from efficientllm.errors import ConfigError, DataError
from efficientllm.evaluation.deps import (
    MissingDependencyError,
    lm_eval,
    require_lm_eval,
)
from efficientllm.evaluation.lm import EfficientLM
from efficientllm.evaluation.mctask import TASK_NAME, NextSentenceSpec, build_task

log = logging.getLogger(__name__)


PAPER_TASKS: tuple[str, ...] = (
    "arc_easy",
    "arc_challenge",
    "boolq",
    "hellaswag",
    "openbookqa",
    "piqa",
    "winogrande",
)
"""The zero-shot multiple-choice tasks of the paper (their data come from the Hugging Face hub)."""

OFFLINE_TASKS: tuple[str, ...] = (TASK_NAME,)
"""Tasks built locally from held-out text (``efficientllm.evaluation.mctask``); no hub needed."""

BOOTSTRAP_ITERS = 100
"""lm-eval computes the stderr of mean metrics in closed form; > 0 only switches it on."""


def _register() -> None:
    """Register ``EfficientLM`` as lm-eval model ``efficientllm`` (once per process)."""
    if lm_eval is None:
        return
    from lm_eval.api.registry import model_registry, register_model

    # lm-eval fills its registry with its own models only when it finds the registry empty
    importlib.import_module("lm_eval.models")

    if "efficientllm" not in model_registry:
        register_model("efficientllm")(EfficientLM)


_register()


# ---- running tasks ---------------------------------------------------------------------------
@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """No hub access while the offline tasks load (environment and ``datasets`` restored)."""
    keys = ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")
    saved = {k: os.environ.get(k) for k in keys}
    ds_config: Any = sys.modules.get("datasets.config")
    ds_saved = getattr(ds_config, "HF_HUB_OFFLINE", None)
    os.environ.update(dict.fromkeys(keys, "1"))
    if ds_config is not None:
        ds_config.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if ds_config is not None:
            ds_config.HF_HUB_OFFLINE = ds_saved


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """lm-eval seeds python, numpy and torch globally; give the caller its streams back."""
    import numpy as np

    py, npy, cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)


@contextlib.contextmanager
def _lean_evaluator() -> Iterator[None]:
    """Skip what ``simple_evaluate`` adds that we do not report: the git hash (a ``git``
    subprocess that prints ``fatal: not a git repository`` outside one) and the environment
    dump (pip and system probes, about a second); lm-eval's warnings (e.g. "Overwriting default
    num_fewshot") only show when logging is at INFO or below."""
    from lm_eval import evaluator

    saved = evaluator.get_git_commit_hash, evaluator.add_env_info
    lm_log = logging.getLogger("lm_eval")
    level = lm_log.level
    evaluator.get_git_commit_hash = lambda: None
    evaluator.add_env_info = lambda storage: None
    if lm_log.getEffectiveLevel() > logging.INFO:
        lm_log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        evaluator.get_git_commit_hash, evaluator.add_env_info = saved
        lm_log.setLevel(level)


@lru_cache(maxsize=1)
def _packaged_tasks() -> frozenset[str]:
    """Every task, group and tag name lm-eval ships (a scan of its task folder: seconds)."""
    from lm_eval.tasks import TaskManager

    return frozenset(TaskManager().all_tasks)


def _local_tasks(include_path: Path | None) -> set[str]:
    if include_path is None:
        return set()
    from lm_eval.tasks import TaskManager

    return set(TaskManager(include_path=str(include_path), include_defaults=False).all_tasks)


def check_tasks(tasks: Sequence[str], include_path: Path | None = None) -> list[str]:
    """Refuse unknown task names (before any model work); returns the names that are not in
    ``include_path``, i.e. lm-eval's packaged tasks, whose data come from the hub."""
    require_lm_eval()
    names = [t.strip() for t in tasks if t and t.strip()]
    if not names:
        raise ConfigError("no tasks given; name at least one lm-eval task")
    local = _local_tasks(Path(include_path) if include_path is not None else None)
    needs_hub = [n for n in names if n not in local]
    unknown = [n for n in needs_hub if n not in _packaged_tasks()] if needs_hub else []
    if unknown:
        where = f" (looked in lm-eval's tasks and {include_path})" if include_path else ""
        offline = (
            f"the offline task {TASK_NAME!r} is built from held-out text (`efficientllm eval "
            "--data ...`, or harness.evaluate_offline)"
            if include_path is None
            else f"the offline task {TASK_NAME!r} is always available"
        )
        raise ConfigError(
            f"unknown task {', '.join(map(repr, unknown))}{where}: {offline}; the paper's tasks "
            f"{', '.join(PAPER_TASKS)} need Hugging Face hub access; any other lm-eval task name "
            "works too (list them with `lm-eval ls tasks`)"
        )
    return needs_hub


def _metric(block: dict[str, Any], name: str) -> float | None:
    value = block.get(f"{name},none")
    return float(value) if isinstance(value, (int, float)) else None


def run_tasks(
    model: torch.nn.Module,
    tokenizer: Any,
    tasks: list[str],
    *,
    include_path: Path | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    num_fewshot: int = 0,
    seed: int = 0,
    max_length: int | None = None,
) -> dict[str, dict[str, Any]]:
    """Run lm-eval ``tasks`` on an in-memory model; per task ``{"acc", "acc_stderr",
    "acc_norm", "acc_norm_stderr", "n", "num_fewshot", "lm_eval_version"}`` (None where a task
    has no such metric).

    ``include_path`` is a folder of extra task YAMLs (e.g. ``mctask.build_task``'s). When every
    task is found there, lm-eval's packaged tasks are not scanned and the hub is switched off.
    The caller's python/numpy/torch random streams are left as they were.
    """
    lm_eval_mod = require_lm_eval()
    from lm_eval.tasks import TaskManager

    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be at least 1, got {limit}")
    include_path = Path(include_path) if include_path is not None else None
    names = [t.strip() for t in tasks if t and t.strip()]
    needs_hub = check_tasks(names, include_path)
    manager = TaskManager(
        include_path=str(include_path) if include_path is not None else None,
        include_defaults=bool(needs_hub),
    )
    lm = EfficientLM(model=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
    offline = contextlib.nullcontext() if needs_hub else _hub_offline()
    try:
        with offline, _rng_preserved(), _lean_evaluator():
            out = lm_eval_mod.simple_evaluate(
                model=lm,
                tasks=names,
                task_manager=manager,
                num_fewshot=num_fewshot,
                limit=limit,
                bootstrap_iters=BOOTSTRAP_ITERS,
                log_samples=False,
                random_seed=seed,
                numpy_random_seed=seed,
                torch_random_seed=seed,
                fewshot_random_seed=seed,
            )
    except OSError as err:  # data files or the hub (datasets' errors are OSErrors); not bugs
        log.debug("lm-eval failed", exc_info=True)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        hint = (
            f"; the data of {', '.join(needs_hub)} come from the Hugging Face hub: check the "
            f"network, or use the offline task {TASK_NAME!r}"
            if needs_hub
            else ""
        )
        raise DataError(
            f"lm-eval could not run {', '.join(names)} ({type(err).__name__}: {reason}){hint}"
        ) from err
    version = getattr(lm_eval_mod, "__version__", "unknown")
    report: dict[str, dict[str, Any]] = {}
    for task, block in out["results"].items():
        samples = out.get("n-samples", {}).get(task, {})
        n = samples.get("effective")
        report[task] = {
            "acc": _metric(block, "acc"),
            "acc_stderr": _metric(block, "acc_stderr"),
            "acc_norm": _metric(block, "acc_norm"),
            "acc_norm_stderr": _metric(block, "acc_norm_stderr"),
            "n": int(n) if n is not None else None,
            "num_fewshot": out.get("n-shot", {}).get(task, num_fewshot),
            "lm_eval_version": version,
        }
    return report


def evaluate_offline(
    model: torch.nn.Module,
    tokenizer: Any,
    heldout_docs: list[str],
    *,
    cache_root: Path,
    spec: NextSentenceSpec = NextSentenceSpec(),
    batch_size: int = 8,
    limit: int | None = None,
) -> dict[str, Any]:
    """Build (or reuse) the ``next_sentence`` task for ``heldout_docs`` under ``cache_root`` and
    run it; the task's result dict (see ``run_tasks``) plus ``task_dir``."""
    folder = build_task(list(heldout_docs), Path(cache_root), spec)
    res = run_tasks(
        model, tokenizer, [TASK_NAME], include_path=folder, batch_size=batch_size, limit=limit
    )
    return {**res[TASK_NAME], "task_dir": str(folder)}


def format_task_line(task: str, res: dict[str, Any]) -> str:
    """One line per task, e.g.
    ``next_sentence: acc 0.3450 ± 0.0337, acc_norm 0.3300 (200 items, 0-shot, lm-eval 0.4.13)``.
    """
    parts = []
    if res.get("acc") is not None:
        err = f" ± {res['acc_stderr']:.4f}" if res.get("acc_stderr") is not None else ""
        parts.append(f"acc {res['acc']:.4f}{err}")
    if res.get("acc_norm") is not None:
        parts.append(f"acc_norm {res['acc_norm']:.4f}")
    shots = res.get("num_fewshot")
    return (
        f"{task}: {', '.join(parts) or 'no accuracy metric'} "
        f"({res.get('n')} items, {shots}-shot, lm-eval {res.get('lm_eval_version')})"
    )


def main() -> None:  # pragma: no cover - thin forwarder to lm-eval's CLI
    """``python -m efficientllm.evaluation.harness ...``: lm-eval's CLI with ``efficientllm``."""
    require_lm_eval()
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


__all__ = [
    "OFFLINE_TASKS",
    "check_tasks",
    "PAPER_TASKS",
    "EfficientLM",
    "MissingDependencyError",
    "evaluate_offline",
    "format_task_line",
    "require_lm_eval",
    "run_tasks",
]


if __name__ == "__main__":  # pragma: no cover
    main()
