"""Build the web app: FastAPI with our own routes, Gradio Blocks mounted at ``/``.

``create_app()`` reads the environment (``DATABASE_URL``, ``EFFICIENTLLM_DATA``,
``EFFICIENTLLM_USERS="alice:pw,bob:pw"``, ``EFFICIENTLLM_MAX_UPLOAD_MB``), migrates the DB and
returns the ASGI app. Gradio gets ``ssr_mode=False``, no ``allowed_paths`` and an upload size
limit; downloads go through :mod:`app.downloads` only.
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from fastapi import FastAPI
from starlette.routing import Mount

from app.context import AppContext, make_context

__all__ = ["AppContext", "create_app", "make_context", "run"]
log = logging.getLogger(__name__)


def create_app(ctx: AppContext | None = None) -> FastAPI:
    """The ASGI app: ``/api/...`` routes first, then Gradio at ``/``."""
    import gradio as gr

    from app import downloads, views

    ctx = ctx or make_context()
    api = FastAPI(title="EfficientLLM", docs_url=None, redoc_url=None, openapi_url=None)
    api.include_router(downloads.router(ctx))
    blocks = views.build(ctx)
    auth = list(ctx.users.items()) if ctx.users else None
    api = gr.mount_gradio_app(
        api,
        blocks,
        path="/",
        auth=auth,
        ssr_mode=False,
        allowed_paths=[],
        max_file_size=ctx.max_upload_bytes,
        show_error=False,
    )
    ctx.gradio_app = next(r.app for r in api.routes if isinstance(r, Mount))  # type: ignore[assignment]
    return api


def run(host: str = "127.0.0.1", port: int = 7860) -> None:
    """Serve the app; without ``REDIS_URL`` also start the embedded local worker."""
    import uvicorn

    ctx = make_context()
    worker = None
    if not os.environ.get("REDIS_URL"):
        from worker.embedded import start_local_worker

        worker = start_local_worker()
        log.info("started the embedded local worker")
    # uvicorn re-raises a captured SIGTERM after its graceful shutdown; turn it into SystemExit
    # so that the finally below still stops the embedded worker (no orphaned workers).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        uvicorn.run(create_app(ctx), host=host, port=port, log_level="info")
    finally:
        stop = getattr(worker, "stop", None) or getattr(worker, "terminate", None)
        if callable(stop):
            stop()
