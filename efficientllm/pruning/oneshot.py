"""One-shot post-training pruning: the LLM-Pruner-style baseline the paper compares against.

Score every minimal group on N calibration batches (gradients of the LM loss, no weight update),
then remove everything at once down to the budget, ranked by normalised saliency.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from efficientllm.model_io import shape_from_config
from efficientllm.pruning.budget import Granularity, check_budget
from efficientllm.pruning.decide import Decision, decide
from efficientllm.pruning.groups import GroupKind
from efficientllm.pruning.prune import apply_drops_
from efficientllm.pruning.saliency import SaliencyAccumulator, Scorer, compute_unit_scores
from efficientllm.shape import ModelShape

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OneShotResult:
    source: ModelShape
    shape: ModelShape
    decision: Decision
    calibration_batches: int
    calibration_tokens: int


def score_groups(
    model,
    batches: Iterable[torch.Tensor],
    *,
    scorer: Scorer = "taylor1",
    progress: Callable[[int], None] | None = None,
) -> tuple[SaliencyAccumulator, int, int]:
    """Accumulate per-unit saliency over calibration ``batches`` ([B, T] token ids)."""
    acc = SaliencyAccumulator(mode="window")
    was_training = model.training
    model.eval()  # no dropout; gradients still flow
    n_batches = n_tokens = 0
    for batch in batches:
        model.zero_grad(set_to_none=True)
        if scorer in ("taylor1", "taylor_mix"):
            loss = model(batch, labels=batch).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"calibration loss is {loss.item()}")
            loss.backward()
        acc.update(compute_unit_scores(model, scorer=scorer))
        n_batches += 1
        n_tokens += batch.numel()
        if progress:
            progress(n_batches)
    model.zero_grad(set_to_none=True)
    model.train(was_training)
    return acc, n_batches, n_tokens


def prune_oneshot_(
    model,
    batches: Iterable[torch.Tensor],
    *,
    budget: int,
    granularity: Granularity = "global",
    scorer: Scorer = "taylor1",
    kinds: tuple[GroupKind, ...] = ("qhead", "kvgroup", "ffn", "hidden"),
    hidden_multiple: int = 8,
    ffn_multiple: int = 8,
    tolerance: float = 0.005,
    progress: Callable[[int], None] | None = None,
) -> OneShotResult:
    """Score on ``batches``, then prune ``model`` in place to at most ``budget`` parameters."""
    source = shape_from_config(model.config.to_dict())
    check_budget(source, budget, hidden_multiple=hidden_multiple, ffn_multiple=ffn_multiple)
    acc, n_batches, n_tokens = score_groups(model, batches, scorer=scorer, progress=progress)
    if n_batches == 0:
        raise ValueError("no calibration batches: the calibration text is shorter than one block")
    decision = decide(
        acc.value(),
        source,
        budget,
        granularity=granularity,
        kinds=kinds,
        hidden_multiple=hidden_multiple,
        ffn_multiple=ffn_multiple,
        tolerance=tolerance,
    )
    with torch.no_grad():
        shape = apply_drops_(model, source, decision.drops)
    assert shape == decision.shape, (shape, decision.shape)
    log.info(
        "one-shot: %s -> %s params (%s)",
        f"{source.num_params():,}",
        f"{shape.num_params():,}",
        decision.summary(),
    )
    return OneShotResult(
        source=source,
        shape=shape,
        decision=decision,
        calibration_batches=n_batches,
        calibration_tokens=n_tokens,
    )
