"""What a run writes besides its steps: evaluations, checkpoints, the export, the result, and
the events that announce them (``Trainer``'s outputs, split off the loop).

On several processes rank 0 alone evaluates, writes checkpoints, the export and ``result.json``
(``World.on_main``); the other ranks wait for it and carry on with its result.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from efficientllm.config import RunConfig
from efficientllm.training.distributed import World
from efficientllm.training.events import (
    CheckpointSaved,
    Evaluated,
    EventSink,
    Exported,
    Finished,
    PhaseChanged,
    Stopped,
)
from efficientllm.training.result import RunResult, export_run, export_run_gguf, write_result
from efficientllm.training.schedule import StepPlan
from efficientllm.training.state import TrainState

log = logging.getLogger(__name__)


class RunOutputs:
    """Mixin of ``Trainer``: the attributes below are set by ``Trainer.__init__``/``_setup``."""

    cfg: RunConfig
    sink: EventSink
    fault: Callable[[str], None] | None
    may_write: Callable[[], bool]
    out: Path
    ckpt_dir: Path
    state: TrainState | None
    teacher: Any
    world: World
    plan: StepPlan
    data: Any
    tokenizer: Any

    @property
    def step(self) -> int:
        return self.state.step if self.state is not None else 0

    @property
    def tokens(self) -> int:
        return self.step * self.plan.tokens_per_step

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

    def _writes_allowed(self, what: str) -> bool:
        """``may_write()`` on every rank, agreed (one refusal skips the write everywhere)."""
        if self.world.any(not self.may_write()):
            log.warning("not writing the %s at step %d: writes are no longer ours", what, self.step)
            return False
        return True

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
        if not self._writes_allowed("export"):
            return RunResult(
                "stopped", self.step, shape.num_params(), None, losses, self._teacher_flops()
            )
        path = self._export()
        result = RunResult(
            "finished", self.step, shape.num_params(), path, losses, self._teacher_flops()
        )
        self.world.on_main(lambda: write_result(self.out, result))
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

    def _evaluate(self, label: str) -> None:
        from efficientllm.evaluation.perplexity import perplexity

        t = self.cfg.train
        if not t.eval_tokens or self.state is None:
            return
        model = self.state.model
        res = self.world.on_main(  # rank 0 evaluates, the others wait
            lambda: perplexity(
                model,
                self.data.heldout,
                block_len=self.cfg.data.block_len,
                max_tokens=t.eval_tokens,
                batch_size=t.batch_size,
            )
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
        if not self._writes_allowed("checkpoint"):
            return
        flush = getattr(self.sink, "flush", None)
        if callable(flush):  # the steps this checkpoint covers are recorded before it exists:
            flush()  # a crash after its rename resumes past them, and they would be lost
        t = self.cfg.train
        st = self.state
        path = self.world.on_main(  # rank 0 writes, the others wait (and resume from it)
            lambda: st.save(
                self.ckpt_dir, tokens=self.tokens, keep=t.keep_checkpoints, fault=self.fault
            )
        )
        self.sink.emit(CheckpointSaved(step=self.step, tokens=self.tokens, path=str(path)))

    def _export(self) -> Path:
        assert self.state is not None
        model = self.state.model
        res = self.world.on_main(
            lambda: export_run(
                model, self.tokenizer, self.cfg, split=self.data.split, fault=self.fault
            )
        )
        gguf, note = self.world.on_main(
            lambda: export_run_gguf(model, self.tokenizer, self.cfg, fault=self.fault)
        )
        self.sink.emit(
            Exported(
                step=self.step,
                tokens=self.tokens,
                path=str(res.path),
                format=res.fmt,
                params=res.num_params,
                gguf=None if gguf is None else str(gguf),
                gguf_note=note,
            )
        )
        return Path(res.path)
