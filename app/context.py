"""What the app's modules share: the :class:`AppContext` (DB sessions, data dir, users, limits).

It imports no other module of ``app``, so the views, the handlers, the routes and the monitor
all depend on it and never on each other's builders (no import cycles inside ``app``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from sqlalchemy.orm import Session, sessionmaker

import db

LOCAL_USER = "local"
DEFAULT_MAX_UPLOAD_MB = 200


@dataclass
class AppContext:
    """What the views and routes share: DB sessions, the data dir, users and limits."""

    sessions: sessionmaker[Session]
    data_dir: Path
    users: dict[str, str] | None
    """username -> password; None: no login, every job belongs to ``local``."""
    max_upload_bytes: int
    queue: str = "gpu"
    gradio_app: FastAPI | None = None
    """The mounted Gradio app (its login tokens identify users on our own routes)."""

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A fresh session for one unit of work."""
        with self.sessions() as s:
            yield s

    def owner(self, username: str | None) -> str:
        """The job owner for a (possibly anonymous) Gradio user."""
        return username if self.users and username else LOCAL_USER

    def user_of(self, request: Request) -> str | None:
        """The logged-in user behind an HTTP request (None when logged out)."""
        if not self.users:
            return LOCAL_USER
        app = self.gradio_app
        if app is None:
            return None
        cookie_id = getattr(app, "cookie_id", "")
        token = request.cookies.get(f"access-token-{cookie_id}") or request.cookies.get(
            f"access-token-unsecure-{cookie_id}"
        )
        return getattr(app, "tokens", {}).get(token) if token else None


def parse_users(text: str | None) -> dict[str, str] | None:
    """``"alice:pw,bob:pw"`` -> {"alice": "pw", "bob": "pw"}; empty -> None (no login)."""
    if not text or not text.strip():
        return None
    users: dict[str, str] = {}
    for item in text.split(","):
        name, sep, password = item.strip().partition(":")
        if not sep or not name or not password:
            raise ValueError("EFFICIENTLLM_USERS must look like 'alice:password,bob:password'")
        users[name] = password
    return users


def make_context() -> AppContext:
    """The context from the environment (worker.settings when present, else db.engine's)."""
    try:
        from worker.settings import get_settings

        settings = get_settings()
        data, url, queue = settings.data_dir, settings.db_url, settings.queue
    except ImportError:  # pragma: no cover - worker/ not installed: same defaults
        data, url, queue = db.engine.data_dir(), db.default_url(), "gpu"
    data = Path(data).resolve()
    data.mkdir(parents=True, exist_ok=True)
    engine = db.make_engine(url)
    db.upgrade_to_head(engine)
    mb = int(os.environ.get("EFFICIENTLLM_MAX_UPLOAD_MB") or DEFAULT_MAX_UPLOAD_MB)
    return AppContext(
        sessions=db.session_factory(engine),
        data_dir=data,
        users=parse_users(os.environ.get("EFFICIENTLLM_USERS")),
        max_upload_bytes=mb * 2**20,
        queue=queue,
    )
