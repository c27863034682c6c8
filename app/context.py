"""What the app's modules share: the :class:`AppContext` (DB sessions, data dir, users, limits).

It imports no other module of ``app``, so the views, the handlers, the routes and the monitor
all depend on it and never on each other's builders (no import cycles inside ``app``).
"""

from __future__ import annotations

import logging
import os
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

import db

LOCAL_USER = "local"
DEFAULT_MAX_UPLOAD_MB = 200
DEFAULT_SESSION_HOURS = 12
DEFAULT_MAX_ACTIVE_JOBS = 4
DEFAULT_QUEUE_MAX_SIZE = 256
log = logging.getLogger(__name__)


@dataclass
class AppContext:
    """What the views and routes share: DB sessions, the data dir, users and limits."""

    sessions: sessionmaker[Session]
    data_dir: Path
    users: dict[str, str] | None
    """username -> password; None: no login, every job belongs to ``local``."""
    max_upload_bytes: int
    queue: str = "gpu"
    secret_key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)
    """Signs the session cookies (``EFFICIENTLLM_SECRET_KEY``; unset: random per process, so a
    restart logs everyone out)."""
    session_max_age_s: float = DEFAULT_SESSION_HOURS * 3600
    """How long a login lasts (``EFFICIENTLLM_SESSION_HOURS``)."""
    models_dir: Path | None = None
    """With login on: the only folder local models may be read from (``EFFICIENTLLM_MODELS_DIR``,
    default ``<data>/models``); the model fields accept hub ids and folders inside it. None (login
    off): any hub id or local path, as before."""
    max_active_jobs: int | None = None
    """With login on: queued + running jobs one user may have
    (``EFFICIENTLLM_MAX_ACTIVE_JOBS_PER_USER``, 0 = none); None (login off): no limit."""
    queue_max_size: int | None = DEFAULT_QUEUE_MAX_SIZE
    """Events Gradio's queue holds waiting (``EFFICIENTLLM_QUEUE_MAX_SIZE``, 0 = unbounded);
    one more is refused with HTTP 503 "Queue is full" (the page shows it) instead of piling up
    memory and latency under a flood."""

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A fresh session for one unit of work."""
        with self.sessions() as s:
            yield s

    def owner(self, username: str | None) -> str:
        """The job owner for a (possibly anonymous) Gradio user."""
        return username if self.users and username else LOCAL_USER


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
        max_active = settings.max_active_jobs_per_user
    except ImportError:  # pragma: no cover - worker/ not installed: same defaults
        data, url, queue = db.engine.data_dir(), db.default_url(), "gpu"
        max_active = DEFAULT_MAX_ACTIVE_JOBS
    data = Path(data).resolve()
    data.mkdir(parents=True, exist_ok=True)
    engine = db.make_engine(url)
    db.upgrade_to_head(engine)
    env = os.environ
    mb = int(env.get("EFFICIENTLLM_MAX_UPLOAD_MB") or DEFAULT_MAX_UPLOAD_MB)
    waiting = int(env.get("EFFICIENTLLM_QUEUE_MAX_SIZE") or DEFAULT_QUEUE_MAX_SIZE)
    users = parse_users(env.get("EFFICIENTLLM_USERS"))
    ctx = AppContext(
        sessions=db.session_factory(engine),
        data_dir=data,
        users=users,
        max_upload_bytes=mb * 2**20,
        queue=queue,
        queue_max_size=waiting or None,
    )
    if users:
        secret = env.get("EFFICIENTLLM_SECRET_KEY", "").strip()
        if secret:
            ctx.secret_key = secret.encode("utf-8")
        else:
            log.warning("EFFICIENTLLM_SECRET_KEY is unset: a random key; a restart logs out all")
        hours = float(env.get("EFFICIENTLLM_SESSION_HOURS") or DEFAULT_SESSION_HOURS)
        ctx.session_max_age_s = hours * 3600
        models = env.get("EFFICIENTLLM_MODELS_DIR", "").strip()
        ctx.models_dir = Path(models).resolve() if models else data / "models"
        ctx.max_active_jobs = max_active or None
    return ctx
