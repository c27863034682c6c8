"""``export``: a model folder (a run's export, or any supported Llama-style folder) as a GGUF
file for llama.cpp, in f32/f16/Q8_0 from Python or a K-quant through llama.cpp's quantizer."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from efficientllm.choices import GGUF_DTYPES
from efficientllm.cli.common import choice, friendly, plain

QUANT_TYPES: tuple[str, ...] = (*GGUF_DTYPES, "q4_k_m", "q4_k_s", "q5_k_m", "q5_k_s", "q6_k")
"""What ``--type`` takes: the Python-written types, then llama.cpp's K-quants (extra ``gguf``)."""


def model_folder(path: Path) -> Path:
    """The model folder behind ``path``: the folder itself, or a run folder's ``export/``."""
    from efficientllm.errors import ModelNotFoundError

    if (path / "config.json").is_file():
        return path
    if (path / "export" / "config.json").is_file():
        return path / "export"
    raise ModelNotFoundError(
        f"{path} is neither a model folder (config.json + safetensors) nor a run folder with an "
        "export/; pass the folder `efficientllm run --out` wrote, or its export/"
    )


def export_gguf_file(folder: Path, out: Path, qtype: str) -> Path:
    """Write ``folder``'s model to ``out`` as GGUF of type ``qtype`` (K-quants via f16)."""
    from efficientllm.export import export_gguf_folder

    if qtype in GGUF_DTYPES:
        return export_gguf_folder(folder, out, dtype=qtype)
    from efficientllm.export.llamacpp import quantize_gguf

    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".gguf-f16-") as tmp:
        f16 = export_gguf_folder(folder, Path(tmp) / "model-f16.gguf", dtype="f16")
        return quantize_gguf(f16, out, qtype)


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""

    @app.command("export")
    @friendly
    def export_cmd(
        model: Annotated[
            Path,
            typer.Option(
                "--model",
                "-m",
                help="A model folder (config.json + safetensors + tokenizer) or a run folder "
                "(its export/ is used).",
                show_default=False,
            ),
        ],
        out: Annotated[
            Path | None,
            typer.Option(
                "--out", "-o", help="The file to write (default: <model>/model-<type>.gguf)."
            ),
        ] = None,
        fmt: Annotated[
            choice("Format", ("gguf",)),  # type: ignore[valid-type]
            typer.Option("--format", "-f", help="Output format (gguf: one file for llama.cpp)."),
        ] = "gguf",
        qtype: Annotated[
            choice("GGUFType", QUANT_TYPES),  # type: ignore[valid-type]
            typer.Option(
                "--type",
                "-t",
                help="Weight type: f32, f16 and q8_0 are written from Python; the K-quants go "
                "through llama.cpp's quantizer (needs the gguf extra: llama-cpp-python).",
            ),
        ] = "q8_0",
    ) -> None:
        """Write a model as a GGUF file for llama.cpp (a per-layer shape as its `deci`
        architecture, a uniform one as `llama`), tokenizer and chat template included."""
        qtype_s = plain(qtype)
        assert plain(fmt) == "gguf"
        folder = model_folder(model)
        target = out if out is not None else folder / f"model-{qtype_s}.gguf"
        path = export_gguf_file(folder, target, qtype_s)
        size = path.stat().st_size
        typer.echo(f"wrote {path} ({size / 2**20:.1f} MiB, {qtype_s})")
        typer.echo(json.dumps({"gguf": str(path), "type": qtype_s, "bytes": size}))
