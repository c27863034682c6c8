"""``run``: pruning-aware pretraining from a preset, a config file and flags (in that order of
precedence, flags last). The flags are generated from ``RunConfig`` (``cli/flags.py``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from efficientllm.cli.common import friendly
from efficientllm.cli.flags import overrides, run_config_flags, with_flags

FLAGS = run_config_flags()


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
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
    **flags: Any,
) -> None:
    """Pruning-aware pretraining: train while pruning down to the budget, then recover; export.
    Every config field is a flag (``--train.lr``, short ``--lr`` where unambiguous). Under
    ``torchrun``/``accelerate launch`` it runs data parallel (``--batch-size`` per process)."""
    from efficientllm.config import read_config_dict
    from efficientllm.presets import build_config, resolve_demo
    from efficientllm.training.distributed import env_rank
    from efficientllm.training.events import JsonlSink, MultiSink
    from efficientllm.training.progress import ProgressSink
    from efficientllm.training.trainer import Trainer

    file_dict = read_config_dict(config) if config else None
    over = overrides(FLAGS, flags)
    cfg = resolve_demo(build_config(preset=preset, file_dict=file_dict, overrides=over))
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if env_rank() != 0:  # another rank of `torchrun`/`accelerate launch`: rank 0 reports
        Trainer(cfg).run()
        return
    jsonl = JsonlSink(out_dir / "events.jsonl")
    try:
        result = Trainer(cfg, sink=MultiSink(ProgressSink(disable=quiet), jsonl)).run()
    finally:
        jsonl.close()
    export = str(result.export_path) if result.export_path else None
    summary = {"status": result.status, "step": result.step, "params": result.params}
    typer.echo(json.dumps({**summary, "export": export}))


def register(app: typer.Typer) -> None:
    """Add ``run`` to ``app``."""
    app.command("run")(friendly(with_flags(run, FLAGS)))
