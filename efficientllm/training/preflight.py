"""Checks a run's configuration against its sources before anything heavy is loaded.

Every mistake a user can make in a ``RunConfig`` that the config alone cannot see (a budget the
source cannot reach, missing or empty text, a teacher with another vocabulary) raises a typed
error here, before the model, the data or the teacher are read.
"""

from __future__ import annotations

from efficientllm.config import RunConfig
from efficientllm.model_io import load_config_dict, shape_from_config
from efficientllm.pruning.budget import check_budget, parse_budget
from efficientllm.shape import ModelShape


def check_run(cfg: RunConfig) -> tuple[ModelShape, int]:
    """The source's shape and the budget in parameters, or the error that stops the run."""
    from efficientllm.training.distill import check_teacher
    from efficientllm.training.rundata import validate_sources

    source = shape_from_config(load_config_dict(cfg.model.source))
    if cfg.budget.no_pruning:
        budget = source.num_params()
    else:
        budget = parse_budget(cfg.budget.target, source.num_params())
        check_budget(
            source,
            budget,
            hidden_multiple=cfg.budget.hidden_multiple,
            ffn_multiple=cfg.budget.ffn_multiple,
        )
    validate_sources(cfg.data)
    check_teacher(cfg.distill, cfg.model.source, source.vocab_size)
    return source, budget
