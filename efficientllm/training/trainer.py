"""The pruning-aware pretraining loop (method.md).

Keep pretraining the source model; accumulate saliency from each step's own gradients; every
``prune_every`` steps remove, while the model is above the size trajectory, the groups with the
lowest normalised saliency (physically, optimizer state included); once the budget is reached at
the end of the pruning phase, keep training the fixed shape (the recovery phase).

The trainer is injected with an event sink, a stop callback polled between steps, and an optional
fault hook (tests of crash recovery); it resumes from the newest complete checkpoint in
``<out_dir>/checkpoints`` when there is one. Everything a checkpoint holds is one
``TrainState`` (``training/state.py``).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from efficientllm.config import RunConfig
from efficientllm.errors import ConfigError, NonFiniteLossError
from efficientllm.model_io import load_tokenizer
from efficientllm.pruning.saliency import compute_unit_scores, mean_normalised_saliency
from efficientllm.shape import ModelShape
from efficientllm.training import checkpoint as ckpt
from efficientllm.training.events import (
    CheckpointSaved,
    Evaluated,
    EventSink,
    Exported,
    Failed,
    Finished,
    ListSink,
    PhaseChanged,
    Pruned,
    RunStarted,
    StepMetrics,
    Stopped,
)
from efficientllm.training.preflight import check_run
from efficientllm.training.result import RunResult, export_run, read_result, write_result
from efficientllm.training.schedule import StepPlan, learning_rate
from efficientllm.training.state import TrainState

log = logging.getLogger(__name__)


def _device(cfg: RunConfig) -> torch.device:
    if cfg.train.device != "auto":
        return torch.device(cfg.train.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer:
    """Runs one ``RunConfig`` to the end (or until ``should_stop`` returns True)."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        sink: EventSink | None = None,
        should_stop: Callable[[], bool] | None = None,
        fault: Callable[[str], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.sink = sink or ListSink()
        self.should_stop = should_stop or (lambda: False)
        self.fault = fault
        self.out = Path(cfg.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.state: TrainState | None = None
        self.teacher: Any = None
        self.comp: Any = None

    @property
    def step(self) -> int:
        return self.state.step if self.state is not None else 0

    # ---- one run --------------------------------------------------------------------------
    def run(self) -> RunResult:
        try:
            return self._run()
        except Exception as err:
            self.sink.emit(
                Failed(step=self.step, tokens=0, error=str(err), error_type=type(err).__name__)
            )
            raise

    def _run(self) -> RunResult:
        source, budget = check_run(self.cfg)
        finished = read_result(self.out)
        if finished is not None:
            return finished
        st, plan = self._setup(source, budget)
        losses: dict[int, float] = {}
        last = time.perf_counter()
        while st.step < plan.total_steps:
            if self.should_stop():
                return self._stop(losses)
            phase = plan.phase(st.step)
            pruning = plan.prune_start_step <= st.step < plan.prune_end_step
            loss, gnorm = self._train_step(phase, pruning)
            st.step += 1
            losses[st.step] = loss
            target = plan.target(st.step, source=source.num_params(), budget=budget)
            if pruning and (
                st.step % self.cfg.schedule.prune_every == 0 or st.step == plan.prune_end_step
            ):
                self._prune(target)
            self.sink.emit(
                StepMetrics(
                    step=st.step,
                    tokens=self.tokens,
                    phase=phase,
                    loss=loss,
                    lr=st.optimizer.param_groups[0]["lr"],
                    params=st.shape.num_params(),
                    target_params=max(target, budget),
                    tokens_per_s=plan.tokens_per_step / max(time.perf_counter() - last, 1e-9),
                    grad_norm=gnorm,
                )
            )
            self._after_step()
            last = time.perf_counter()  # tokens/s (and so the ETA) count training time only
        return self._finish(losses)

    # ---- setup ----------------------------------------------------------------------------
    def _setup(self, source: ModelShape, budget: int) -> tuple[TrainState, StepPlan]:
        from accelerate import Accelerator

        from efficientllm.training.data import BlockSampler
        from efficientllm.training.distill import load_teacher
        from efficientllm.training.rundata import prepare

        cfg, t = self.cfg, self.cfg.train
        if t.deterministic:
            torch.set_num_threads(1)
            torch.use_deterministic_algorithms(True)
        device = _device(cfg)
        bf16 = device.type == "cuda" and cfg.model.dtype != "float32"
        self.accel = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if bf16 else "no")
        if self.accel.num_processes > 1:
            raise ConfigError(
                "several processes (accelerate launch / torchrun) are not supported yet: physical "
                "pruning would need all-reduced saliency and a re-wrapped DDP model after each "
                "event; run on one GPU"
            )
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        self.device = device
        self.tokenizer = load_tokenizer(cfg.model.source)
        self.data = prepare(cfg.data, self.tokenizer, seed=t.seed)
        sampler = BlockSampler(self.data.train_blocks, batch_size=t.batch_size, seed=t.seed)
        self.plan = StepPlan.make(
            total_tokens=t.total_tokens,
            tokens_per_step=t.batch_size * t.grad_accum * cfg.data.block_len,
            start_fraction=cfg.schedule.start_fraction,
            prune_fraction=cfg.schedule.prune_fraction,
            prune=not cfg.budget.no_pruning,
            trajectory=cfg.schedule.trajectory,
        )
        ckpt.clean_partial(self.ckpt_dir)
        saved = ckpt.load_latest(self.ckpt_dir)
        self.teacher = load_teacher(cfg.distill, cfg.model.source, device, bf16=bf16)
        self.state = st = TrainState.build(cfg, sampler=sampler, device=device, saved=saved)
        if cfg.schedule.compensation == "obs":
            from efficientllm.pruning.compensate import Compensator

            self.comp = Compensator.for_group_kinds(cfg.budget.kinds)
            self.comp.attach(st.model)
        self.sink.emit(
            RunStarted(
                step=st.step,
                tokens=self.tokens,
                source_params=source.num_params(),
                budget=budget,
                total_steps=self.plan.total_steps,
                prune_end_step=self.plan.prune_end_step,
                shape=source.to_dict(),
                config=cfg.to_dict(),
                resumed_from=saved.step if saved else None,
            )
        )
        if saved is None and t.eval_tokens:
            self._evaluate("start")
        return st, self.plan

    # ---- pieces ---------------------------------------------------------------------------
    @property
    def tokens(self) -> int:
        return self.step * self.plan.tokens_per_step

    def _train_step(self, phase: str, pruning: bool) -> tuple[float, float | None]:
        """One optimizer step (with gradient accumulation); returns (LM loss, grad norm)."""
        st, t = self.state, self.cfg.train
        assert st is not None
        for g in st.optimizer.param_groups:
            g["lr"] = learning_rate(st.step, self.plan, t)
        loss_sum = lm_sum = 0.0
        teach = self.teacher if self.teacher and self.teacher.active(phase) else None
        for _ in range(t.grad_accum):
            batch = next(st.sampler).to(self.device)
            with self.accel.autocast():
                out = st.model(batch, labels=batch)
                loss = out.loss
                lm_sum += loss.item() / t.grad_accum
                if teach is not None:  # the step minimises the mix; LM loss is reported
                    loss = teach.loss(loss, out.logits, batch)
                loss = loss / t.grad_accum
            self.accel.backward(loss)
            loss_sum += loss.item()
            del loss, out  # no graph may outlive the step: pruning changes parameter shapes
        if not math.isfinite(loss_sum):
            raise NonFiniteLossError(
                f"loss became {loss_sum} at step {st.step}; lower train.lr or check the data"
            )
        if pruning:
            st.saliency.update(
                compute_unit_scores(
                    st.model,
                    scorer=self.cfg.saliency.scorer,
                    optimizer=st.optimizer,
                    fisher=self.cfg.saliency.fisher,
                    generator=st.scorer_rng,
                )
            )
        gnorm = None
        if t.grad_clip > 0:
            gnorm = float(torch.nn.utils.clip_grad_norm_(st.parameters(), t.grad_clip))
        st.optimizer.step()
        st.optimizer.zero_grad(set_to_none=True)
        return lm_sum, gnorm

    def _after_step(self) -> None:
        """Evaluation and checkpoints due after the step just taken; the phase change."""
        t, plan, step = self.cfg.train, self.plan, self.step
        if step == plan.prune_end_step:
            self._evaluate("after_pruning")
            if step < plan.total_steps:
                self.sink.emit(PhaseChanged(step=step, tokens=self.tokens, phase="recovery"))
        elif t.eval_every and step % t.eval_every == 0 and step < plan.total_steps:
            self._evaluate("step")
        if t.checkpoint_every and step % t.checkpoint_every == 0 and step < plan.total_steps:
            self._checkpoint()

    def _stop(self, losses: dict[int, float]) -> RunResult:
        assert self.state is not None
        self._checkpoint()
        self.sink.emit(Stopped(step=self.step, tokens=self.tokens, reason="stop requested"))
        return RunResult(
            "stopped", self.step, self.state.shape.num_params(), None, losses, self._teacher_flops()
        )

    def _finish(self, losses: dict[int, float]) -> RunResult:
        assert self.state is not None
        shape = self.state.shape
        if self.plan.prune_end_step < self.plan.total_steps and self.cfg.train.eval_tokens:
            self._evaluate("final")
        path = self._export()
        result = RunResult(
            "finished", self.step, shape.num_params(), path, losses, self._teacher_flops()
        )
        write_result(self.out, result)
        self.sink.emit(
            Finished(
                step=self.step, tokens=self.tokens, params=shape.num_params(), shape=shape.to_dict()
            )
        )
        return result

    def _teacher_flops(self) -> int:
        """Teacher forward FLOPs of every step so far (also across a resume)."""
        if self.teacher is None:
            return 0
        steps = sum(self.teacher.active(self.plan.phase(s)) for s in range(self.step))
        return 2 * self.teacher.params * steps * self.plan.tokens_per_step

    def _prune(self, target: int) -> None:
        st = self.state
        assert st is not None
        shape, before = st.shape, st.shape.num_params()
        if before <= target or st.saliency.steps == 0:
            return
        decision, scores = st.prune_(target, self.cfg, compensator=self.comp)
        self.sink.emit(
            Pruned(
                step=self.step,
                tokens=self.tokens,
                params_before=before,
                params_after=st.shape.num_params(),
                target_params=target,
                removed=decision.summary(),
                saliency=mean_normalised_saliency(scores, shape),
                shape=st.shape.to_dict(),
            )
        )

    def _evaluate(self, label: str) -> None:
        from efficientllm.evaluation.perplexity import perplexity

        t = self.cfg.train
        if not t.eval_tokens or self.state is None:
            return
        model = self.state.model
        res = perplexity(
            model,
            self.data.heldout,
            block_len=self.cfg.data.block_len,
            max_tokens=t.eval_tokens,
            batch_size=t.batch_size,
        )
        model.train()
        self.sink.emit(
            Evaluated(
                step=self.step,
                tokens=self.tokens,
                phase=self.plan.phase(max(self.step - 1, 0)),
                label=label,
                ppl=res.ppl,
                loss=res.nll,
                protocol=res.protocol,
            )
        )

    def _checkpoint(self) -> None:
        assert self.state is not None
        t = self.cfg.train
        path = self.state.save(
            self.ckpt_dir, tokens=self.tokens, keep=t.keep_checkpoints, fault=self.fault
        )
        self.sink.emit(CheckpointSaved(step=self.step, tokens=self.tokens, path=str(path)))

    def _export(self) -> Path:
        assert self.state is not None
        res = export_run(
            self.state.model, self.tokenizer, self.cfg, split=self.data.split, fault=self.fault
        )
        self.sink.emit(
            Exported(
                step=self.step,
                tokens=self.tokens,
                path=str(res.path),
                format=res.fmt,
                params=res.num_params,
            )
        )
        return Path(res.path)
