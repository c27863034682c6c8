"""What a pruning-aware run carries from step to step, and so what a checkpoint holds.

``TrainState`` is the one object the loop mutates: the (shrinking) model, its optimizer, the
saliency accumulator, the data sampler, the scorer's random generator, the current shape and the
step. ``save`` writes all of it atomically (``checkpoint.save``) and ``TrainState.build`` brings
it back, so a resumed run continues the same loss curve.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from efficientllm.config import RunConfig
from efficientllm.model_io import load_model, shape_from_config
from efficientllm.pruning.decide import Drops, decide
from efficientllm.pruning.saliency import SaliencyAccumulator
from efficientllm.shape import ModelShape
from efficientllm.training import checkpoint as ckpt
from efficientllm.training.data import BlockSampler


def load_student(cfg: RunConfig, saved: ckpt.Checkpoint | None) -> Any:
    """The source model, or the pruned model of a checkpoint (our heterogeneous class)."""
    if saved is None:
        return load_model(cfg.model.source)
    from efficientllm.modeling import EfficientLLMConfig, EfficientLLMForCausalLM

    config = EfficientLLMConfig.from_dict(saved.state["model_config"])
    model = EfficientLLMForCausalLM(config)
    missing, unexpected = model.load_state_dict(saved.model, strict=False)
    allowed = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - allowed or unexpected:
        raise RuntimeError(f"checkpoint {saved.path} does not fit: {missing} {unexpected}")
    return model.eval()


@dataclass
class TrainState:
    """The mutable state of one run; every field is in a checkpoint."""

    model: Any
    optimizer: torch.optim.Optimizer
    saliency: SaliencyAccumulator
    sampler: BlockSampler
    """This process's sampler (``distributed.ShardedSampler`` on several processes)."""
    scorer_rng: torch.Generator
    shape: ModelShape
    step: int = 0

    @classmethod
    def build(
        cls,
        cfg: RunConfig,
        *,
        sampler: BlockSampler,
        device: torch.device,
        saved: ckpt.Checkpoint | None,
    ) -> TrainState:
        """A fresh state from the source model, or the state of checkpoint ``saved``."""
        t = cfg.train
        model = load_student(cfg, saved).to(device)
        model.train()  # loaders return eval mode; evaluation switches back itself
        params = [p for _, p in ckpt.unique_named_parameters(model)]
        opt = torch.optim.AdamW(
            params, lr=t.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=t.weight_decay
        )
        acc = SaliencyAccumulator(mode=cfg.saliency.mode, beta=cfg.saliency.beta)
        gen = torch.Generator().manual_seed(t.seed + 1)
        state = cls(model, opt, acc, sampler, gen, shape_from_config(model.config.to_dict()))
        if saved is not None:
            ckpt.load_optimizer_tensors(
                model, opt, saved.optimizer, saved.state["optimizer_groups"]
            )
            acc.load_state_dict(saved.saliency)
            sampler.load_state_dict(saved.state["sampler"])
            ckpt.restore_rng(saved.rng, saved.state["python_rng"])
            gen.set_state(saved.rng["scorer"])
            state.step = saved.step
        return state

    def parameters(self) -> list[torch.nn.Parameter]:
        """The model's parameters, tied ones once (they change after each pruning event)."""
        return [p for _, p in ckpt.unique_named_parameters(self.model)]

    def prune_(
        self,
        target: int,
        cfg: RunConfig,
        *,
        compensator: Any = None,
        check: Callable[[Drops], object] | None = None,
    ) -> tuple[Any, Any]:
        """Decide on the accumulated saliency which groups bring the model to ``target`` params
        and remove them physically (optimizer moments and accumulator included); returns the
        decision and the scores it was made on. ``check`` sees the drops before anything is
        removed (the cross-rank agreement check of a data-parallel run raises there)."""
        from efficientllm.pruning.prune import apply_drops_

        b = cfg.budget
        scores = self.saliency.value()
        decision = decide(
            scores,
            self.shape,
            target,
            granularity=b.granularity,
            kinds=b.kinds,
            hidden_multiple=b.hidden_multiple,
            ffn_multiple=b.ffn_multiple,
            tolerance=b.tolerance,
        )
        if check is not None:
            check(decision.drops)
        with torch.no_grad():
            if compensator is not None:  # variant B: compensate the consumers, then remove
                compensator.compensate_(self.model, decision.drops)
            self.shape = apply_drops_(
                self.model,
                self.shape,
                decision.drops,
                optimizer=self.optimizer,
                accumulator=self.saliency,
            )
            if compensator is not None:
                compensator.reset()
        if cfg.saliency.mode == "window":
            self.saliency.reset()
        return decision, scores

    def save(self, root: Path, *, tokens: int, keep: int, fault: Any = None) -> Path:
        """Write this state as checkpoint ``step`` under ``root`` (atomic; newest ``keep``)."""
        return ckpt.save(
            root,
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            saliency=dict(self.saliency.state_dict()),
            state={
                "tokens": tokens,
                "sampler": self.sampler.state_dict(),
                "shape": self.shape.to_dict(),
            },
            keep=keep,
            fault=fault,
            extra_rng={"scorer": self.scorer_rng.get_state()},
        )
