"""End-to-end one-shot pruning job: validate everything, score, prune, evaluate, export.

Everything that can be checked cheaply (model config, budget, data files, output folder) is
checked before any weights are loaded, so bad input fails in seconds and writes nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from efficientllm.choices import ExportFormat, Granularity, Scorer
from efficientllm.config import DataConfig
from efficientllm.errors import ConfigError, DataError


@dataclass(frozen=True, kw_only=True)
class OneShotJob:
    """Settings of ``efficientllm prune-oneshot`` (see its ``--help``)."""

    model: str
    data: list[Path]
    budget: str
    out: Path
    heldout: list[Path] = field(default_factory=list)
    granularity: Granularity = "global"
    scorer: Scorer = "taylor1"
    calib_batches: int = 8
    batch_size: int = 2
    block_len: int = 256
    eval_tokens: int = 16384
    hidden_multiple: int = 8
    ffn_multiple: int = 8
    fmt: ExportFormat = "auto"
    seed: int = 0
    heldout_fraction: float = 0.1


def _ppl(model, stream, job: OneShotJob, bos_id):
    from efficientllm.evaluation.perplexity import perplexity

    if job.eval_tokens == 0:
        return None
    return perplexity(
        model,
        stream,
        block_len=job.block_len,
        max_tokens=job.eval_tokens,
        batch_size=job.batch_size,
        bos_id=bos_id,
    )


def run_oneshot(job: OneShotJob, *, echo: Callable[[str], None] = lambda s: None) -> dict:
    """Run the job; returns the report that is also written as ``oneshot_report.json``."""
    import torch

    from efficientllm.export import export_model
    from efficientllm.model_io import load_model, load_tokenizer, source_shape
    from efficientllm.pruning.budget import check_budget, parse_budget
    from efficientllm.pruning.oneshot import prune_oneshot_
    from efficientllm.training.rundata import prepare, validate_sources

    t0 = time.perf_counter()
    source = source_shape(job.model)
    budget = parse_budget(job.budget, source.num_params())
    check_budget(source, budget, hidden_multiple=job.hidden_multiple, ffn_multiple=job.ffn_multiple)
    if job.out.exists():
        raise ConfigError(f"output folder {job.out} already exists; choose a new --out")
    data_cfg = DataConfig(
        train=[str(p) for p in job.data],
        heldout=[str(p) for p in job.heldout],
        heldout_fraction=job.heldout_fraction,
        block_len=job.block_len,
    )
    validate_sources(data_cfg)
    echo(f"source {source.describe()} {source.num_params():,} params -> budget {budget:,}")

    model = load_model(job.model)
    tok = load_tokenizer(job.model)
    data = prepare(data_cfg, tok, seed=job.seed)
    blocks, held_stream = data.train_blocks, data.heldout
    echo(
        f"data: {len(data.split['train'])} calibration document(s), "
        f"{len(data.split['heldout'])} held-out document(s)"
    )
    need = job.calib_batches * job.batch_size
    if len(blocks) < job.batch_size:
        raise DataError(
            f"calibration text makes {len(blocks)} block(s) of {job.block_len} tokens, fewer "
            f"than one batch of {job.batch_size}; add text or lower --block-len"
        )
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(job.seed))[:need]
    batches = [blocks[order[i : i + job.batch_size]] for i in range(0, len(order), job.batch_size)]

    echo("held-out perplexity before pruning ...")
    before = _ppl(model, held_stream, job, None)  # no BOS: SmolLM2's BOS is a chat token
    echo(f"scoring groups on {len(batches)} calibration batches ...")
    result = prune_oneshot_(
        model,
        batches,
        budget=budget,
        granularity=job.granularity,
        scorer=job.scorer,
        hidden_multiple=job.hidden_multiple,
        ffn_multiple=job.ffn_multiple,
        progress=lambda i: echo(f"  batch {i}/{len(batches)}"),
    )
    echo("held-out perplexity after pruning ...")
    after = _ppl(model, held_stream, job, None)
    report: dict[str, Any] = {
        "source_params": source.num_params(),
        "budget": budget,
        "params": result.shape.num_params(),
        "removed": result.decision.summary(),
        "shape": result.shape.to_dict(),
        "calibration": {
            "batches": result.calibration_batches,
            "tokens": result.calibration_tokens,
            "scorer": job.scorer,
        },
        "perplexity_before": before.ppl if before else None,
        "perplexity_after": after.ppl if after else None,
        "perplexity_protocol": after.protocol if after else None,
        "job": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(job).items()},
            "data": [str(p) for p in job.data],
            "heldout": [str(p) for p in job.heldout],
        },
    }
    exported = export_model(
        model,
        job.out,
        tokenizer=tok,
        fmt=job.fmt,
        extra_files={"oneshot_report.json": json.dumps(report, indent=2)},
    )
    report["export"] = {
        "path": str(exported.path),
        "format": exported.fmt,
        "max_abs_diff_after_reload": exported.max_abs_diff,
    }
    report["seconds"] = round(time.perf_counter() - t0, 1)
    echo(
        f"perplexity {report['perplexity_before']} -> {report['perplexity_after']} "
        f"({report['perplexity_protocol']}); exported to {exported.path}"
    )
    return report
