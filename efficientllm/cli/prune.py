"""``plan`` (predict the shape a budget gives, from config.json only) and ``prune-oneshot``
(the one-shot baseline: score once on calibration text, remove, export)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from efficientllm.cli.common import (
    BudgetOpt,
    FfnMulOpt,
    FormatChoice,
    GranOpt,
    HiddenMulOpt,
    ModelOpt,
    ScorerChoice,
    doc,
    friendly,
    layer_rows,
    plain,
)
from efficientllm.config import ExportConfig, SaliencyConfig


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""

    @app.command()
    @friendly
    def plan(
        model: ModelOpt,
        budget: BudgetOpt,
        granularity: GranOpt = "uniform",
        hidden_multiple: HiddenMulOpt = 8,
        ffn_multiple: FfnMulOpt = 8,
        as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
    ) -> None:
        """Predict the per-layer shape and exact parameter count for a budget (config.json only)."""
        from efficientllm.model_io import source_shape
        from efficientllm.pruning.budget import format_params, parse_budget
        from efficientllm.pruning.budget import plan as make_plan

        source = source_shape(model)
        target = parse_budget(budget, source.num_params())
        p = make_plan(
            source,
            target,
            granularity=plain(granularity),
            hidden_multiple=hidden_multiple,
            ffn_multiple=ffn_multiple,
        )
        if as_json:
            typer.echo(json.dumps(p.to_dict(), indent=2))
            return
        typer.echo(f"source  {source.describe()}  {source.num_params():,} params")
        typer.echo(
            f"budget  {target:,} ({format_params(target)})  granularity {plain(granularity)}"
        )
        typer.echo(
            f"plan    {p.shape.describe()}  {p.num_params:,} params ({p.gap:.3%} below budget)"
        )
        typer.echo(
            f"  hidden {p.shape.hidden_size} (source {source.hidden_size}), "
            f"head_dim {p.shape.head_dim}"
        )
        for row in layer_rows(p.shape):
            typer.echo(row)
        for note in p.notes:
            typer.echo(f"note: {note}")

    @app.command("prune-oneshot")
    @friendly
    def prune_oneshot(
        model: ModelOpt,
        data: Annotated[
            list[Path],
            typer.Option(
                "--data",
                "-d",
                help="Text files or folders (.txt/.md/.jsonl/.parquet) for calibration "
                "(and held-out text unless --heldout is given).",
            ),
        ],
        budget: BudgetOpt,
        out: Annotated[
            Path,
            typer.Option(
                "--out", "-o", help="Folder to write the pruned model to (must not exist yet)."
            ),
        ],
        heldout: Annotated[
            list[Path] | None,
            typer.Option(
                help="Held-out text files for perplexity. "
                "Default: 10% of --data documents, split by document."
            ),
        ] = None,
        granularity: GranOpt = "global",
        scorer: Annotated[
            ScorerChoice,
            typer.Option(help=doc(SaliencyConfig, "scorer")),
        ] = "taylor1",
        calib_batches: Annotated[
            int, typer.Option(help="Calibration batches to score groups on.", min=1)
        ] = 8,
        batch_size: Annotated[
            int, typer.Option(help="Blocks per calibration/eval batch.", min=1)
        ] = 2,
        block_len: Annotated[int, typer.Option(help="Tokens per block.", min=8)] = 256,
        eval_tokens: Annotated[
            int, typer.Option(help="Held-out tokens to score for perplexity (0 = skip).", min=0)
        ] = 16384,
        hidden_multiple: HiddenMulOpt = 8,
        ffn_multiple: FfnMulOpt = 8,
        fmt: Annotated[
            FormatChoice,
            typer.Option("--format", help=doc(ExportConfig, "format")),
        ] = "auto",
        seed: Annotated[int, typer.Option(help="Seed for the document split and block order.")] = 0,
    ) -> None:
        """Score groups on calibration text, remove them all at once down to the budget, export."""
        from efficientllm.training.pipeline import OneShotJob, run_oneshot

        job = OneShotJob(
            model=model,
            data=list(data),
            heldout=list(heldout or []),
            budget=budget,
            out=out,
            granularity=plain(granularity),
            scorer=plain(scorer),
            calib_batches=calib_batches,
            batch_size=batch_size,
            block_len=block_len,
            eval_tokens=eval_tokens,
            hidden_multiple=hidden_multiple,
            ffn_multiple=ffn_multiple,
            fmt=plain(fmt),
            seed=seed,
        )
        report = run_oneshot(job, echo=lambda s: typer.echo(s, err=True))
        typer.echo(json.dumps(report, indent=2))
