"""Zero-shot evaluation through EleutherAI's lm-evaluation-harness (``lm_eval`` 0.4.x).

``EfficientLM`` wraps any causal LM that returns ``.logits`` (our heterogeneous
``EfficientLLMForCausalLM``, its exports, vanilla Llama/Qwen/Mistral models) as an lm-eval model.
It is registered as ``efficientllm``, so after ``import efficientllm.harness`` (or through
``python -m efficientllm.harness``, which forwards to lm-eval's own command line)::

    python -m efficientllm.harness run --model efficientllm \\
        --model_args pretrained=runs/x/export --tasks arc_easy

loads the folder with our safe loaders (safetensors only, no remote code).

``run_tasks`` runs lm-eval tasks on an in-memory model; ``evaluate_offline`` builds the offline
``next_sentence`` task (``efficientllm.mctask``) from held-out text and runs it, so the harness
path works without the Hugging Face hub.

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
import torch.nn.functional as F

from efficientllm.errors import ConfigError, DataError, EfficientLLMError
from efficientllm.mctask import TASK_NAME, NextSentenceSpec, build_task

log = logging.getLogger(__name__)

LM_EVAL_HINT = "lm-eval is not installed: pip install 'efficientllm[eval]'"

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
"""Tasks built locally from held-out text (``efficientllm.mctask``); no hub needed."""

BOOTSTRAP_ITERS = 100
"""lm-eval computes the stderr of mean metrics in closed form; > 0 only switches it on."""


class MissingDependencyError(EfficientLLMError, ImportError):
    """An optional dependency (here lm-eval) is not installed."""


try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
except ImportError:  # pragma: no cover - exercised only without the [eval] extra
    lm_eval = None
    TemplateLM = object  # type: ignore[assignment,misc]


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, or a clear error saying how to install it."""
    if lm_eval is None:
        raise MissingDependencyError(LM_EVAL_HINT)
    return lm_eval


def _int_batch_size(value: int | str | None, default: int = 8) -> int:
    """lm-eval's CLI passes ``batch_size`` as text ("8", "auto", "auto:4")."""
    if value is None:
        return default
    if isinstance(value, str) and value.startswith("auto"):
        log.warning("batch_size %r: automatic batch sizes are not supported; using %d", value, 8)
        return default
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"batch_size must be a whole number, got {value!r}") from None
    if size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {size}")
    return size


def _resolve_dtype(dtype: Any) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name == "auto":
        return None
    got = getattr(torch, name, None)
    if not isinstance(got, torch.dtype):
        raise ConfigError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    return got


class EfficientLM(TemplateLM):
    """lm-eval model over an in-memory causal LM or a model folder / hub id.

    Scoring: requests are sorted by length (longest first), right-padded and scored in batches
    of ``batch_size`` with one forward pass each (no KV cache); with right padding a causal model
    never attends to the pads, so results do not depend on the batch. Inputs longer than
    ``max_length`` (default: ``config.max_position_embeddings``) are cut on the left. With
    ``share_prefix`` (default) the choices of one question share one pass over their context
    (KV cache), which is 2-3x less work on multiple-choice tasks; log-probabilities are in float32.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        *,
        model: torch.nn.Module | None = None,
        tokenizer: Any = None,
        batch_size: int | str | None = 8,
        max_length: int | str | None = None,
        device: str | None = None,
        dtype: Any = None,
        add_bos_token: bool | None = None,
        share_prefix: bool = True,
        max_batch_size: int | None = None,
        trust_remote_code: bool | str | None = None,
        **unused: Any,
    ) -> None:
        require_lm_eval()
        super().__init__()
        if str(trust_remote_code).lower() == "true":
            raise ConfigError("trust_remote_code is never enabled; our loaders run no remote code")
        if unused:
            log.warning("EfficientLM ignores unknown arguments: %s", ", ".join(sorted(unused)))
        if (pretrained is None) == (model is None):
            raise ConfigError("give either pretrained=<folder or hub id> or model=<a loaded model>")
        if pretrained is not None:
            from efficientllm.model_io import load_model, load_tokenizer

            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            model = load_model(pretrained, dtype=_resolve_dtype(dtype), device=device)
            tokenizer = tokenizer if tokenizer is not None else load_tokenizer(pretrained)
        elif device is not None:
            model = model.to(device)
        if tokenizer is None:
            raise ConfigError("EfficientLM(model=...) needs its tokenizer: pass tokenizer=...")
        self.model = model
        self.tokenizer = tokenizer
        self._device = next(model.parameters()).device
        self.batch_size = _int_batch_size(batch_size)
        cfg_len = getattr(getattr(model, "config", None), "max_position_embeddings", None)
        self._max_length = int(max_length) if max_length is not None else cfg_len
        if not self._max_length or self._max_length < 2:
            raise ConfigError(
                "the model config has no max_position_embeddings; pass max_length=<tokens>"
            )
        self.add_bos_token = add_bos_token
        self.share_prefix = str(share_prefix).lower() not in ("false", "0", "no")
        if tokenizer.eos_token_id is None and tokenizer.bos_token_id is None:
            raise ConfigError("the tokenizer has neither an EOS nor a BOS token to condition on")
        self.pretrained = pretrained

    # ---- what lm-eval asks of a TemplateLM ---------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.tokenizer.bos_token_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return 256

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "tokenizer")).replace("/", "__")

    def tok_encode(
        self,
        string: str,
        add_special_tokens: bool | None = None,
        left_truncate_len: int | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Token ids of ``string``; by default the tokenizer's own special-token setting (as
        lm-eval's ``hf`` model does), never a second BOS when the text already starts with one."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
        if add_special_tokens is None:
            bos = self.tokenizer.bos_token
            kw = {"add_special_tokens": False} if bos and string.startswith(bos) else {}
        else:
            kw = {"add_special_tokens": add_special_tokens}
        ids = self.tokenizer.encode(string, **kw)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True
    ) -> str:
        return self.tokenizer.apply_chat_template(
            chat_history,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=not add_generation_prompt,
        )

    def get_model_info(self) -> dict[str, Any]:
        return {
            "model_class": type(self.model).__name__,
            "model_num_parameters": sum(p.numel() for p in self.model.parameters()),
            "model_dtype": str(next(self.model.parameters()).dtype),
            "max_length": self.max_length,
        }

    # ---- scoring --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _eval_mode(self) -> Iterator[None]:
        was_training = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                yield
        finally:
            self.model.train(was_training)

    def _pad(self, rows: list[list[int]]) -> torch.Tensor:
        """Right-padded ``[len(rows), longest]`` ids (a causal model never looks at the pads)."""
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.eot_token_id
        ids = torch.full((len(rows), max(map(len, rows))), pad, dtype=torch.long)
        for r, row in enumerate(rows):
            ids[r, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids.to(self._device)

    @staticmethod
    def _score(logits: torch.Tensor, target: list[int]) -> tuple[float, bool]:
        """(sum of log p(target), every target token is the argmax) from ``[len(target), V]``
        logits, in float32."""
        logp = F.log_softmax(logits.float(), dim=-1)
        tgt = torch.tensor(target, dtype=torch.long, device=logp.device)
        return float(logp.gather(-1, tgt[:, None]).sum()), bool((logp.argmax(-1) == tgt).all())

    def _score_batched(
        self, chunk: list[int], prepared: list[tuple[list[int], list[int]]]
    ) -> list[tuple[float, bool]]:
        """One forward over right-padded ``context + continuation[:-1]`` rows; logits are
        kept only from the first scored position of the batch on."""
        width = max(len(prepared[i][0]) for i in chunk)
        first = min(len(prepared[i][0]) - len(prepared[i][1]) for i in chunk)
        ids = self._pad([prepared[i][0] for i in chunk])
        logits = self.model(input_ids=ids, use_cache=False, logits_to_keep=width - first).logits
        scores = []
        for row, i in enumerate(chunk):
            inp, target = prepared[i]
            end = len(inp) - first
            scores.append(self._score(logits[row, end - len(target) : end], target))
        return scores

    def _score_shared(self, ctx: list[int], conts: list[list[int]]) -> list[tuple[float, bool]]:
        """Continuations of one context: the context once (KV cache), then all continuations
        in one batch on top of it; the same numbers as ``_score_batched`` up to rounding."""
        res = self.model(input_ids=self._pad([ctx]), use_cache=True, logits_to_keep=1)
        first = res.logits[0, -1:]  # predicts every continuation's first token
        rest = [c[:-1] for c in conts]
        if not any(rest):
            return [self._score(first, c) for c in conts]
        cache = res.cache
        cache.batch_repeat_interleave(len(conts))
        logits = self.model(input_ids=self._pad(rest), cache=cache, use_cache=True).logits
        return [
            self._score(torch.cat([first, logits[row, : len(c) - 1]]), c)
            for row, c in enumerate(conts)
        ]

    def _loglikelihood_tokens(
        self,
        requests: list[tuple[tuple[str, str] | None, list[int], list[int]]],
        disable_tqdm: bool = False,
        override_bs: int | None = None,
        **kwargs: Any,
    ) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), continuation is the greedy choice) per
        ``(key, context_ids, continuation_ids)`` request, in the order given.

        Requests that share their context (the choices of a multiple-choice question) score the
        context once when ``share_prefix`` is on and everything fits in ``max_length``; the
        rest go longest first in right-padded batches of ``batch_size``.
        """
        from tqdm import tqdm

        prepared = []  # (model input = left-truncated context + continuation[:-1], targets)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise DataError("an lm-eval request has an empty continuation; nothing to score")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1) :]
            inp = whole[:-1]
            n = min(len(cont), len(inp))
            if n < len(cont):
                log.warning(
                    "continuation of %d tokens is longer than max_length %d: scoring its last %d",
                    len(cont),
                    self.max_length,
                    n,
                )
            prepared.append((inp, list(cont)[-n:]))
            fits = ctx and len(ctx) + len(cont) - 1 <= self.max_length
            if self.share_prefix and fits:
                groups.setdefault(tuple(ctx), []).append(i)
        bs = override_bs or self.batch_size
        out: list[tuple[float, bool] | None] = [None] * len(prepared)
        shared = [
            (ctx, idx[s : s + bs])
            for ctx, idx in groups.items()
            if len(idx) > 1
            for s in range(0, len(idx), bs)
        ]
        in_shared = {i for _, chunk in shared for i in chunk}
        rest = sorted(
            (i for i in range(len(prepared)) if i not in in_shared),
            key=lambda i: (-len(prepared[i][0]), i),
        )
        bar = tqdm(
            total=len(prepared),
            desc="Running loglikelihood requests",
            disable=True if disable_tqdm else None,
        )
        with self._eval_mode():
            for ctx, chunk in shared:
                conts = [list(requests[i][2]) for i in chunk]
                for i, score in zip(chunk, self._score_shared(list(ctx), conts), strict=True):
                    out[i] = score
                bar.update(len(chunk))
            for start in range(0, len(rest), bs):
                chunk = rest[start : start + bs]
                for i, score in zip(chunk, self._score_batched(chunk, prepared), strict=True):
                    out[i] = score
                bar.update(len(chunk))
        bar.close()
        for (key, _, _), score in zip(requests, out, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, score)
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[float]:
        """Log-likelihood of whole texts in disjoint windows of ``max_length`` (each token scored
        once, the first one conditioned on ``prefix_token_id``)."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for r, req in enumerate(requests):
            (string,) = req.args
            for ctx, cont in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(string),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                ),
            ):
                windows.append((None, ctx, cont))
                owner.append(r)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
        totals = [0.0] * len(requests)
        for r, (s, _) in zip(owner, scores, strict=True):
            totals[r] += s
        for req, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        """Greedy decoding (no KV cache) until a stop string, EOS or ``max_gen_toks`` tokens."""
        from tqdm import tqdm

        results = []
        with self._eval_mode():
            for req in tqdm(requests, desc="Generating", disable=True if disable_tqdm else None):
                context, gen_kwargs = req.args
                gen_kwargs = dict(gen_kwargs or {})
                until = gen_kwargs.pop("until", None)
                until = [until] if isinstance(until, str) else list(until or [])
                eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
                if eos_text and eos_text not in until:
                    until.append(eos_text)
                max_new = int(gen_kwargs.pop("max_gen_toks", self.max_gen_toks))
                if gen_kwargs.get("do_sample"):
                    log.warning("generate_until: sampling is not supported; decoding greedily")
                keep = max(self.max_length - max_new, 1)
                ids = self.tok_encode(context, left_truncate_len=keep) or [self.prefix_token_id]
                new: list[int] = []
                text = ""
                for _ in range(max_new):
                    inp = self._pad([(ids + new)[-self.max_length :]])
                    logits = self.model(input_ids=inp, use_cache=False, logits_to_keep=1).logits
                    nxt = int(logits[0, -1].argmax())
                    if nxt == self.eot_token_id:
                        break
                    new.append(nxt)
                    text = self.tok_decode(new)
                    if any(stop and stop in text for stop in until):
                        break
                for stop in until:
                    if stop:
                        text = text.split(stop)[0]
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, req.args[1]), text)
        return results


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
    ds_config = sys.modules.get("datasets.config")
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
    """``python -m efficientllm.harness ...``: lm-eval's command line with ``efficientllm``."""
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
