"""The pruning-aware pretraining loop (method.md).

Keep pretraining the source model; accumulate saliency from each step's own gradients; every
``prune_every`` steps remove, while the model is above the size trajectory, the groups with the
lowest normalised saliency (physically, optimizer state included); once the budget is reached at
the end of the pruning phase, keep training the fixed shape (the recovery phase).

The trainer is injected with an event sink, a stop callback polled between steps, and an optional
fault hook (tests of crash recovery); it resumes from the newest complete checkpoint in
``<out_dir>/checkpoints`` when there is one. Everything a checkpoint holds is one
``TrainState`` (``training/state.py``).

On several processes (``torchrun`` / ``accelerate launch``) the same loop runs data parallel
(``training/distributed.py``): the model is wrapped in DDP (re-wrapped after each pruning event),
each rank trains on its shard of the global batch, the ranks check that they took the same
pruning decision, and rank 0 alone emits events and writes checkpoints, evaluations and the
export while the others wait.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from efficientllm.config import RunConfig
from efficientllm.errors import NonFiniteLossError
from efficientllm.model_io import load_tokenizer
from efficientllm.pruning.saliency import compute_unit_scores, mean_normalised_saliency
from efficientllm.shape import ModelShape
from efficientllm.training import checkpoint as ckpt
from efficientllm.training.distributed import NullSink, World, drops_digest, env_rank
from efficientllm.training.events import (
    EventSink,
    Failed,
    ListSink,
    Pruned,
    RunStarted,
    StepMetrics,
)
from efficientllm.training.outputs import RunOutputs
from efficientllm.training.preflight import check_run
from efficientllm.training.result import RunResult, read_result
from efficientllm.training.schedule import StepPlan, learning_rate
from efficientllm.training.state import TrainState

log = logging.getLogger(__name__)


def _device(cfg: RunConfig) -> torch.device:
    if cfg.train.device != "auto":
        return torch.device(cfg.train.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class Trainer(RunOutputs):
    """Runs one ``RunConfig`` to the end (or until ``should_stop`` returns True)."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        sink: EventSink | None = None,
        should_stop: Callable[[], bool] | None = None,
        fault: Callable[[str], None] | None = None,
        may_write: Callable[[], bool] | None = None,
    ) -> None:
        self.cfg = cfg
        self.sink: EventSink = sink or ListSink()
        if env_rank() != 0:  # events come from rank 0 only
            self.sink = NullSink()
        self.should_stop = should_stop or (lambda: False)
        self.fault = fault
        self.may_write = may_write or (lambda: True)
        """Asked right before a checkpoint or the export is written; False skips the write
        (e.g. a worker whose job lease was lost: another process owns the run now)."""
        self.out = Path(cfg.out_dir)
        self.ckpt_dir = self.out / "checkpoints"
        self.state: TrainState | None = None
        self.teacher: Any = None
        self.comp: Any = None
        self.world = World()
        self.net: torch.nn.Module | None = None
        """The module the steps run through: the model, or its DDP wrapper."""
        self.decisions: list[str] = []
        """Digest of each pruning decision taken (equal on every rank)."""

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
            if self.world.any(self.should_stop()):  # one rank's stop request stops all
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

        from efficientllm.training.distill import load_teacher
        from efficientllm.training.rundata import prepare

        cfg, t = self.cfg, self.cfg.train
        if t.deterministic:
            torch.set_num_threads(1)
            torch.use_deterministic_algorithms(True)
        device = _device(cfg)
        bf16 = device.type == "cuda" and cfg.model.dtype != "float32"
        self.accel = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if bf16 else "no")
        self.world = world = World.from_accelerator(self.accel, device)
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        self.device = device = world.device if world.size > 1 else device
        self.tokenizer = load_tokenizer(cfg.model.source)
        self.data = prepare(cfg.data, self.tokenizer, seed=t.seed)
        sampler = world.sampler(self.data.train_blocks, batch_size=t.batch_size, seed=t.seed)
        self.plan = StepPlan.make(
            total_tokens=t.total_tokens,
            tokens_per_step=t.batch_size * t.grad_accum * cfg.data.block_len * world.size,
            start_fraction=cfg.schedule.start_fraction,
            prune_fraction=cfg.schedule.prune_fraction,
            prune=not cfg.budget.no_pruning,
            trajectory=cfg.schedule.trajectory,
        )
        world.on_main(lambda: ckpt.clean_partial(self.ckpt_dir))
        saved = ckpt.load_latest(self.ckpt_dir)
        self.teacher = load_teacher(cfg.distill, cfg.model.source, device, bf16=bf16)
        self.state = st = TrainState.build(cfg, sampler=sampler, device=device, saved=saved)
        if cfg.schedule.compensation == "obs":
            from efficientllm.pruning.compensate import Compensator

            self.comp = Compensator.for_group_kinds(cfg.budget.kinds)
            self.comp.attach(st.model)
        self.net = world.wrap(st.model)
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
                num_processes=world.size,
            )
        )
        if saved is None and t.eval_tokens:
            self._evaluate("start")
        return st, self.plan

    # ---- pieces ---------------------------------------------------------------------------
    def _train_step(self, phase: str, pruning: bool) -> tuple[float, float | None]:
        """One optimizer step (with gradient accumulation); returns (LM loss, grad norm)."""
        st, t = self.state, self.cfg.train
        assert st is not None
        for g in st.optimizer.param_groups:
            g["lr"] = learning_rate(st.step, self.plan, t)
        loss_sum = lm_sum = 0.0
        teach = self.teacher if self.teacher and self.teacher.active(phase) else None
        net = self.net or st.model
        for i in range(t.grad_accum):
            # DDP averages the gradients over ranks in the last micro-batch's backward
            with World.sync_context(net, last=i == t.grad_accum - 1):
                lm, total = self._micro_step(net, teach)
            lm_sum, loss_sum = lm_sum + lm, loss_sum + total
        lm_sum, loss_sum = self.world.mean([lm_sum, loss_sum])  # the global batch's loss
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

    def _micro_step(self, net: torch.nn.Module, teach: Any) -> tuple[float, float]:
        """Forward + backward of one micro-batch; returns its (LM, minimised) loss shares."""
        st, accum = self.state, self.cfg.train.grad_accum
        assert st is not None
        batch = next(st.sampler).to(self.device)
        with self.accel.autocast():
            out = net(batch, labels=batch)
            loss = out.loss
            lm = loss.item() / accum
            if teach is not None:  # the step minimises the mix; LM loss is reported
                loss = teach.loss(loss, out.logits, batch)
            loss = loss / accum
        self.accel.backward(loss)
        total = loss.item()
        del loss, out  # no graph may outlive the step: pruning changes parameter shapes
        return lm, total

    def _prune(self, target: int) -> None:
        st = self.state
        assert st is not None
        shape, before = st.shape, st.shape.num_params()
        if before <= target or st.saliency.steps == 0:
            return
        if self.comp is not None:  # every rank compensates with the H of the global batch
            self.comp.all_reduce_(st.model, self.world.sum_)
        check = partial(self.world.check_decision, step=self.step)
        self.net = self.world.release(self.net)  # DDP is rebuilt around the new shapes
        decision, scores = st.prune_(target, self.cfg, compensator=self.comp, check=check)
        self.decisions.append(drops_digest(decision.drops))
        self.net = self.world.wrap(st.model)
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
