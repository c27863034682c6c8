"""What a run leaves behind: the exported model folder and ``result.json``.

``result.json`` is written last, after the export, so its presence means the run finished; a
re-run of a finished folder returns the recorded result instead of training again.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efficientllm.config import RunConfig

log = logging.getLogger(__name__)

RESULT_FILE = "result.json"


@dataclass
class RunResult:
    status: str
    """finished | stopped"""
    step: int
    params: int
    export_path: Path | None
    losses: dict[int, float] = field(default_factory=dict)
    """Per-step training loss of this process (step number -> loss)."""
    teacher_flops: int = 0
    """Forward FLOPs of the distillation teacher over the whole run (0 without one)."""


def read_result(out: Path) -> RunResult | None:
    """The recorded result of a finished run in ``out``, or None."""
    done = out / RESULT_FILE
    if not done.is_file():
        return None
    r = json.loads(done.read_text(encoding="utf-8"))
    log.warning("run in %s already finished; delete the folder to start over", out)
    return RunResult(
        "finished", r["step"], r["params"], Path(r["export"]), {}, r.get("teacher_flops", 0)
    )


def write_result(out: Path, result: RunResult) -> None:
    record = {
        "step": result.step,
        "params": result.params,
        "export": str(result.export_path),
        "teacher_flops": result.teacher_flops,
    }
    (out / RESULT_FILE).write_text(json.dumps(record), encoding="utf-8")


def export_run(
    model: Any,
    tokenizer: Any,
    cfg: RunConfig,
    *,
    split: dict[str, Any],
    fault: Callable[[str], None] | None = None,
) -> Any:
    """Export the trained model to ``<out_dir>/export`` with the run's config, data split and
    events beside the weights; returns ``export.ExportResult``."""
    from efficientllm.export import export_model

    out = Path(cfg.out_dir)
    target = out / "export"
    if target.exists():
        shutil.rmtree(target)  # a previous attempt died after exporting; redo it whole
    for partial in [*out.glob(f".{target.name}.tmp-*"), *out.glob(f".{target.name}.old-*")]:
        shutil.rmtree(partial, ignore_errors=True)  # what a process killed mid-export left
    extra: dict[str, str | bytes] = {
        "run_config.json": json.dumps(cfg.to_dict(), indent=2),
        "data_split.json": json.dumps(split, indent=2),
    }
    events = out / "events.jsonl"
    if events.exists():
        extra["events.jsonl"] = events.read_text(encoding="utf-8")
    if fault:
        fault("before_export")
    return export_model(
        model, target, tokenizer=tokenizer, fmt=cfg.export.format, extra_files=extra, fault=fault
    )


GGUF_DIR = "gguf"
"""The run's GGUF file lives in ``<out_dir>/gguf/`` (beside, not inside, the export folder)."""


def export_run_gguf(
    model: Any,
    tokenizer: Any,
    cfg: RunConfig,
    *,
    fault: Callable[[str], None] | None = None,
) -> tuple[Path | None, str | None]:
    """Write the run's GGUF file (``cfg.export.gguf``) to ``<out_dir>/gguf/model-<type>.gguf``:
    (its path, None), or (None, why not) when it is off or the model cannot be represented.

    A GGUF the model cannot have is a note, not a failed run: the safetensors export stands.
    """
    from efficientllm.errors import ExportError
    from efficientllm.export import export_gguf

    dtype = cfg.export.gguf
    if dtype == "none":
        return None, None
    folder = Path(cfg.out_dir) / GGUF_DIR
    if folder.exists():
        shutil.rmtree(folder)  # an earlier attempt's file: written again from this model
    if fault:
        fault("before_gguf")
    try:
        path = export_gguf(model, tokenizer, folder / f"model-{dtype}.gguf", dtype=dtype)
    except ExportError as err:
        log.warning("no GGUF file: %s", err)
        return None, str(err)
    return path, None
