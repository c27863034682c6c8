"""Build the web app: FastAPI with our own routes, Gradio Blocks mounted at ``/``.

``create_app()`` reads the environment (``DATABASE_URL``, ``EFFICIENTLLM_DATA``,
``EFFICIENTLLM_USERS="alice:pw,bob:pw"``, ``EFFICIENTLLM_MAX_UPLOAD_MB``; with login on also
``EFFICIENTLLM_SECRET_KEY``, ``EFFICIENTLLM_SESSION_HOURS``, ``EFFICIENTLLM_MODELS_DIR`` and
``EFFICIENTLLM_MAX_ACTIVE_JOBS_PER_USER``), migrates the DB and returns the ASGI app. Gradio
gets ``ssr_mode=False``, no ``allowed_paths`` and an upload size limit; downloads go through
:mod:`app.downloads` only; login, sessions and the gate live in :mod:`app.login` and
:mod:`app.auth` (Gradio's own ``auth=`` is not used: no rate limit, no lockout).
"""

from __future__ import annotations

import logging
import os
import signal
import sys

from fastapi import FastAPI

from app.context import AppContext, make_context

__all__ = ["AppContext", "create_app", "make_context", "run"]
log = logging.getLogger(__name__)


def create_app(ctx: AppContext | None = None) -> FastAPI:
    """The ASGI app: ``/login``, ``/logout`` and ``/api/...`` routes first, then Gradio at ``/``.

    With login on, :class:`app.auth.LoginGate` wraps everything (no session: a page load is sent
    to ``/login``, anything else gets 401) and :func:`app.auth.user_of` is Gradio's
    ``auth_dependency``, which puts the user name on ``gr.Request``. With login off neither is
    installed: the app is exactly the single-user one.
    """
    import functools

    import gradio as gr

    from app import auth, downloads, login, views

    ctx = ctx or make_context()
    api = FastAPI(title="EfficientLLM", docs_url=None, redoc_url=None, openapi_url=None)
    if ctx.users:
        api.include_router(login.router(ctx, login.FailureLimiter()))
    api.include_router(downloads.router(ctx))
    blocks = views.build(ctx)
    api = gr.mount_gradio_app(
        api,
        blocks,
        path="/",
        auth_dependency=functools.partial(auth.user_of, ctx) if ctx.users else None,
        ssr_mode=False,
        allowed_paths=[],
        max_file_size=ctx.max_upload_bytes,
        show_error=False,
    )
    # Gradio refuses an event's FileData path outside its upload cache only once the Blocks
    # "has launched", which launch() records and mount_gradio_app() does not: unset, any client
    # could name a server file (a secret, another user's dataset) as the dataset upload and
    # on_upload would copy it in. The flag gates nothing else in Gradio 6.31 (tests S6).
    blocks.has_launched = True
    if ctx.users:
        api.add_middleware(auth.LoginGate, ctx=ctx)
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
