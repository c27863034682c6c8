"""The pruning-aware pretraining loop (method.md).

Keep pretraining the source model; accumulate saliency from each step's own gradients; every
``prune_every`` steps remove, while the model is above the size trajectory, the groups with the
lowest normalised saliency (physically, optimizer state included); once the budget is reached at
the end of the pruning phase, train the fixed shape with a fresh warmup + cosine schedule.

The trainer is injected with an event sink, a stop callback polled between steps, and an optional
fault hook (tests of crash recovery); it resumes from the newest complete checkpoint in
``<out_dir>/checkpoints`` when there is one.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from efficientllm import checkpoint as ckpt
from efficientllm.budget import check_budget, parse_budget
from efficientllm.config import RunConfig
from efficientllm.curves import SaliencyKind
from efficientllm.decide import decide
from efficientllm.errors import ConfigError, NonFiniteLossError
from efficientllm.events import (
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
from efficientllm.groups import unit_cost
from efficientllm.model_io import load_config_dict, load_model, load_tokenizer, shape_from_config
from efficientllm.saliency import SaliencyAccumulator, compute_unit_scores
from efficientllm.schedule import Plan, cosine_lr
from efficientllm.shape import ModelShape

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    status: str
    """finished | stopped"""
    step: int
    params: int
    export_path: Path | None
    losses: dict[int, float]
    """Per-step training loss of this process (step number -> loss)."""
    teacher_flops: int = 0
    """Forward FLOPs of the distillation teacher over the whole run (0 without one)."""


def _device(cfg: RunConfig) -> torch.device:
    if cfg.train.device != "auto":
        return torch.device(cfg.train.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def mean_normalised_saliency(scores, shape: ModelShape) -> dict[SaliencyKind, float]:
    """Mean saliency per parameter of each group kind (the paper's trajectory plot); the keys
    are ``SALIENCY_KINDS``, which the Monitor plots."""
    per_qhead = 2 * shape.head_dim * shape.hidden_size
    return {
        "qhead": float(torch.cat(scores.q_head).mean()) / per_qhead,
        "ffn": float(torch.cat(scores.ffn).mean()) / unit_cost(shape, "ffn", 0),
        "hidden": float(scores.hidden.mean()) / unit_cost(shape, "hidden"),
    }


def _compensated_kinds(kinds) -> tuple[str, ...]:
    """Consumers worth tracking for the group kinds that may be removed."""
    out = []
    if {"qhead", "kvgroup"} & set(kinds):
        out.append("head")
    if "ffn" in kinds:
        out.append("ffn")
    if "hidden" in kinds:
        out.append("hidden")
    return tuple(out)


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

    # ---- setup ----------------------------------------------------------------------------
    def _validate(self) -> tuple[ModelShape, int]:
        from efficientllm.rundata import validate_sources

        source = shape_from_config(load_config_dict(self.cfg.model.source))
        if self.cfg.budget.no_pruning:
            budget = source.num_params()
        else:
            budget = parse_budget(self.cfg.budget.target, source.num_params())
            check_budget(
                source,
                budget,
                hidden_multiple=self.cfg.budget.hidden_multiple,
                ffn_multiple=self.cfg.budget.ffn_multiple,
            )
        validate_sources(self.cfg.data)
        from efficientllm.distill import check_teacher

        check_teacher(self.cfg.distill, self.cfg.model.source, source.vocab_size)
        return source, budget

    def _load(self, state: ckpt.Checkpoint | None):
        if state is None:
            return load_model(self.cfg.model.source)
        from efficientllm.modeling import EfficientLLMConfig, EfficientLLMForCausalLM

        config = EfficientLLMConfig.from_dict(state.state["model_config"])
        model = EfficientLLMForCausalLM(config)
        missing, unexpected = model.load_state_dict(state.model, strict=False)
        allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
        if set(missing) - allowed or unexpected:
            raise RuntimeError(f"checkpoint {state.path} does not fit: {missing} {unexpected}")
        return model.eval()

    # ---- one run --------------------------------------------------------------------------
    def run(self) -> RunResult:
        try:
            return self._run()
        except Exception as err:
            self.sink.emit(
                Failed(
                    step=getattr(self, "step", 0),
                    tokens=0,
                    error=str(err),
                    error_type=type(err).__name__,
                )
            )
            raise

    def _run(self) -> RunResult:
        from accelerate import Accelerator

        from efficientllm.data import BlockSampler
        from efficientllm.rundata import prepare

        cfg, t = self.cfg, self.cfg.train
        source, budget = self._validate()
        done = self.out / "result.json"
        if done.is_file():  # re-running a finished run is a no-op
            import json

            r = json.loads(done.read_text(encoding="utf-8"))
            log.warning("run in %s already finished; delete the folder to start over", self.out)
            return RunResult(
                "finished", r["step"], r["params"], Path(r["export"]), {}, r.get("teacher_flops", 0)
            )
        if t.deterministic:
            torch.set_num_threads(1)
            torch.use_deterministic_algorithms(True)
        device = _device(cfg)
        bf16 = device.type == "cuda" and cfg.model.dtype != "float32"
        accel = Accelerator(cpu=device.type == "cpu", mixed_precision="bf16" if bf16 else "no")
        if accel.num_processes > 1:
            raise ConfigError(
                "several processes (accelerate launch / torchrun) are not supported yet: physical "
                "pruning would need all-reduced saliency and a re-wrapped DDP model after each "
                "event; run on one GPU"
            )
        torch.manual_seed(t.seed)
        random.seed(t.seed)
        tokenizer = load_tokenizer(cfg.model.source)
        data = prepare(cfg.data, tokenizer, seed=t.seed)
        sampler = BlockSampler(data.train_blocks, batch_size=t.batch_size, seed=t.seed)
        plan = Plan.make(
            total_tokens=t.total_tokens,
            tokens_per_step=t.batch_size * t.grad_accum * cfg.data.block_len,
            start_fraction=cfg.schedule.start_fraction,
            prune_fraction=cfg.schedule.prune_fraction,
            prune=not cfg.budget.no_pruning,
            trajectory=cfg.schedule.trajectory,
        )
        ckpt.clean_partial(self.ckpt_dir)
        state = ckpt.load_latest(self.ckpt_dir)
        model = self._load(state).to(device)
        model.train()  # loaders return eval mode; evaluation switches back itself
        from efficientllm.distill import load_teacher

        self.teacher = load_teacher(cfg.distill, cfg.model.source, device, bf16=bf16)
        params = [p for _, p in ckpt.unique_named_parameters(model)]
        opt = torch.optim.AdamW(
            params, lr=t.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=t.weight_decay
        )
        acc = SaliencyAccumulator(mode=cfg.saliency.mode, beta=cfg.saliency.beta)
        self.comp = None
        if cfg.schedule.compensation == "obs":
            from efficientllm.compensate import Compensator

            self.comp = Compensator(kinds=_compensated_kinds(cfg.budget.kinds))
            self.comp.attach(model)
        gen = torch.Generator().manual_seed(t.seed + 1)
        self.step = 0
        if state is not None:
            ckpt.load_optimizer_tensors(
                model, opt, state.optimizer, state.state["optimizer_groups"]
            )
            acc.load_state_dict(state.saliency)
            sampler.load_state_dict(state.state["sampler"])
            ckpt.restore_rng(state.rng, state.state["python_rng"])
            gen.set_state(state.rng["scorer"])
            self.step = state.step
        shape = shape_from_config(model.config.to_dict())
        self.sink.emit(
            RunStarted(
                step=self.step,
                tokens=self.step * plan.tokens_per_step,
                source_params=source.num_params(),
                budget=budget,
                total_steps=plan.total_steps,
                prune_end_step=plan.prune_end_step,
                shape=source.to_dict(),
                config=cfg.to_dict(),
                resumed_from=state.step if state else None,
            )
        )
        if state is None and t.eval_tokens:
            self._evaluate(model, data.heldout, tokenizer, plan, "start")
        losses: dict[int, float] = {}
        last = time.perf_counter()
        while self.step < plan.total_steps:
            if self.should_stop():
                self._checkpoint(model, opt, acc, sampler, gen, plan, shape)
                self.sink.emit(
                    Stopped(
                        step=self.step,
                        tokens=self.step * plan.tokens_per_step,
                        reason="stop requested",
                    )
                )
                return RunResult(
                    "stopped",
                    self.step,
                    shape.num_params(),
                    None,
                    losses,
                    self._teacher_flops(plan),
                )
            step = self.step
            phase = plan.phase(step)
            for g in opt.param_groups:
                g["lr"] = self._lr(step, plan)
            loss_sum = lm_sum = 0.0
            teach = self.teacher if self.teacher and self.teacher.active(phase) else None
            for _ in range(t.grad_accum):
                batch = next(sampler).to(device)
                with accel.autocast():
                    out = model(batch, labels=batch)
                    loss = out.loss
                    lm_sum += loss.item() / t.grad_accum
                    if teach is not None:  # the step minimises the mix; LM loss is reported
                        loss = teach.loss(loss, out.logits, batch)
                    loss = loss / t.grad_accum
                accel.backward(loss)
                loss_sum += loss.item()
                del loss, out  # no graph may outlive the step: pruning changes parameter shapes
            if not math.isfinite(loss_sum):
                raise NonFiniteLossError(
                    f"loss became {loss_sum} at step {step}; lower train.lr or check the data"
                )
            pruning = plan.prune_start_step <= step < plan.prune_end_step
            if pruning:
                acc.update(
                    compute_unit_scores(
                        model,
                        scorer=cfg.saliency.scorer,
                        optimizer=opt,
                        fisher=cfg.saliency.fisher,
                        generator=gen,
                    )
                )
            gnorm = None
            if t.grad_clip > 0:
                gnorm = float(torch.nn.utils.clip_grad_norm_(params, t.grad_clip))
            opt.step()
            opt.zero_grad(set_to_none=True)
            self.step = step = step + 1
            tokens = step * plan.tokens_per_step
            losses[step] = lm_sum
            target = plan.target(step, source=source.num_params(), budget=budget)
            if pruning and (step % cfg.schedule.prune_every == 0 or step == plan.prune_end_step):
                shape = self._prune(model, opt, acc, shape, target, step, tokens)
                params = [p for _, p in ckpt.unique_named_parameters(model)]
            now = time.perf_counter()
            self.sink.emit(
                StepMetrics(
                    step=step,
                    tokens=tokens,
                    phase=phase,
                    loss=lm_sum,
                    lr=opt.param_groups[0]["lr"],
                    params=shape.num_params(),
                    target_params=max(target, budget),
                    tokens_per_s=plan.tokens_per_step / max(now - last, 1e-9),
                    grad_norm=gnorm,
                )
            )
            if step == plan.prune_end_step:
                self._evaluate(model, data.heldout, tokenizer, plan, "after_pruning")
                if step < plan.total_steps:
                    self.sink.emit(PhaseChanged(step=step, tokens=tokens, phase="recovery"))
            elif t.eval_every and step % t.eval_every == 0 and step < plan.total_steps:
                self._evaluate(model, data.heldout, tokenizer, plan, "step")
            if t.checkpoint_every and step % t.checkpoint_every == 0 and step < plan.total_steps:
                self._checkpoint(model, opt, acc, sampler, gen, plan, shape)
            last = time.perf_counter()  # tokens/s (and so the ETA) count training time only
        if plan.prune_end_step < plan.total_steps and t.eval_tokens:
            self._evaluate(model, data.heldout, tokenizer, plan, "final")
        path = self._export(model, tokenizer, plan, data.split)
        import json

        flops = self._teacher_flops(plan)
        record = {"step": self.step, "params": shape.num_params(), "export": str(path)}
        done.write_text(json.dumps({**record, "teacher_flops": flops}), encoding="utf-8")
        self.sink.emit(
            Finished(
                step=self.step,
                tokens=self.step * plan.tokens_per_step,
                params=shape.num_params(),
                shape=shape.to_dict(),
            )
        )
        return RunResult("finished", self.step, shape.num_params(), path, losses, flops)

    # ---- pieces ---------------------------------------------------------------------------
    def _teacher_flops(self, plan: Plan) -> int:
        """Teacher forward FLOPs of every step so far (also across a resume)."""
        if self.teacher is None:
            return 0
        steps = sum(self.teacher.active(plan.phase(s)) for s in range(self.step))
        return 2 * self.teacher.params * steps * plan.tokens_per_step

    def _lr(self, step: int, plan: Plan) -> float:
        """continuous: one warmup + cosine over the run; rewarm: one over the pruning phase,
        then a fresh one at ``recovery_lr`` over recovery."""
        t, end = self.cfg.train, plan.prune_end_step
        if t.lr_schedule == "continuous":
            start, total, peak = 0, plan.total_steps, t.lr
        elif step < end:
            start, total, peak = 0, end, t.lr
        else:
            start, total, peak = end, plan.total_steps - end, t.recovery_lr
        return cosine_lr(
            step - start, total=total, peak=peak, warmup=t.warmup_steps, min_ratio=t.min_lr_ratio
        )

    def _prune(
        self, model, opt, acc, shape: ModelShape, target: int, step: int, tokens: int
    ) -> ModelShape:
        from efficientllm.prune import apply_drops_

        before = shape.num_params()
        if before <= target or acc.steps == 0:
            return shape
        b = self.cfg.budget
        scores = acc.value()
        decision = decide(
            scores,
            shape,
            target,
            granularity=b.granularity,
            kinds=b.kinds,
            hidden_multiple=b.hidden_multiple,
            ffn_multiple=b.ffn_multiple,
            tolerance=b.tolerance,
        )
        with torch.no_grad():
            if self.comp is not None:  # variant B: compensate the consumers, then remove
                self.comp.compensate_(model, decision.drops)
            new = apply_drops_(model, shape, decision.drops, optimizer=opt, accumulator=acc)
            if self.comp is not None:
                self.comp.reset()
        if self.cfg.saliency.mode == "window":
            acc.reset()
        self.sink.emit(
            Pruned(
                step=step,
                tokens=tokens,
                params_before=before,
                params_after=new.num_params(),
                target_params=target,
                removed=decision.summary(),
                saliency=mean_normalised_saliency(scores, shape),
                shape=new.to_dict(),
            )
        )
        return new

    def _evaluate(self, model, heldout, tokenizer, plan: Plan, label: str) -> None:
        from efficientllm.evaluate import perplexity

        t = self.cfg.train
        if not t.eval_tokens:
            return
        res = perplexity(
            model,
            heldout,
            block_len=self.cfg.data.block_len,
            max_tokens=t.eval_tokens,
            batch_size=t.batch_size,
        )
        model.train()
        self.sink.emit(
            Evaluated(
                step=self.step,
                tokens=self.step * plan.tokens_per_step,
                phase=plan.phase(max(self.step - 1, 0)),
                label=label,
                ppl=res.ppl,
                loss=res.nll,
                protocol=res.protocol,
            )
        )

    def _checkpoint(self, model, opt, acc, sampler, gen, plan: Plan, shape: ModelShape) -> None:
        sal = acc.state_dict()
        sal_state = {**sal}
        state = {
            "tokens": self.step * plan.tokens_per_step,
            "sampler": sampler.state_dict(),
            "shape": shape.to_dict(),
        }
        path = ckpt.save(
            self.ckpt_dir,
            self.step,
            model=model,
            optimizer=opt,
            saliency=sal_state,
            state=state,
            keep=self.cfg.train.keep_checkpoints,
            fault=self.fault,
            extra_rng={"scorer": gen.get_state()},
        )
        self.sink.emit(
            CheckpointSaved(step=self.step, tokens=self.step * plan.tokens_per_step, path=str(path))
        )

    def _export(self, model, tokenizer, plan: Plan, split: dict) -> Path:
        import json

        from efficientllm.export import export_model

        target = self.out / "export"
        if target.exists():
            import shutil

            shutil.rmtree(target)  # a previous attempt died after exporting; redo it whole
        extra = {
            "run_config.json": json.dumps(self.cfg.to_dict(), indent=2),
            "data_split.json": json.dumps(split, indent=2),
        }
        events = self.out / "events.jsonl"
        if events.exists():
            extra["events.jsonl"] = events.read_text(encoding="utf-8")
        if self.fault:
            self.fault("before_export")
        res = export_model(
            model, target, tokenizer=tokenizer, fmt=self.cfg.export.format, extra_files=extra
        )
        self.sink.emit(
            Exported(
                step=self.step,
                tokens=self.step * plan.tokens_per_step,
                path=str(res.path),
                format=res.fmt,
                params=res.num_params,
            )
        )
        return Path(res.path)
