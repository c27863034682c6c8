"""Engine and session helpers, and programmatic Alembic migration.

SQLite gets WAL, a 5 s busy timeout, foreign keys, and ``BEGIN IMMEDIATE`` transactions: a
deferred transaction that reads and then writes can fail with ``database is locked`` at once
(the busy handler is not consulted when a stale WAL snapshot must be upgraded), while an
immediate one waits for the write lock up front. PostgreSQL gets ``pool_pre_ping``.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 5000
_MIGRATE_LOCK = threading.Lock()  # Alembic's context is process-global


def data_dir() -> Path:
    """``$EFFICIENTLLM_DATA`` or ``./data``, created if missing."""
    path = Path(os.environ.get("EFFICIENTLLM_DATA") or "data")
    path.mkdir(parents=True, exist_ok=True)
    return path


def default_url() -> str:
    """``$DATABASE_URL``, else a SQLite file in the data directory."""
    url = os.environ.get("DATABASE_URL")
    if url:
        return url
    return f"sqlite:///{(data_dir() / 'efficientllm.db').resolve()}"


def _configure_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # we emit BEGIN ourselves (see "begin" below)
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA journal_mode = WAL")
            cur.execute("PRAGMA synchronous = NORMAL")
            cur.execute("PRAGMA foreign_keys = ON")
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """An engine for ``url`` (default: :func:`default_url`) with the settings above."""
    url = url or default_url()
    backend = make_url(url).get_backend_name()
    if backend == "sqlite":
        connect_args = dict(kwargs.pop("connect_args", {}))
        connect_args.setdefault("check_same_thread", False)
        connect_args.setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        engine = create_engine(url, connect_args=connect_args, **kwargs)
        _configure_sqlite(engine)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit (``expire_on_commit=False``)."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def alembic_config(url: str | None = None) -> Any:
    """An Alembic ``Config`` pointing at the migrations inside this package (any cwd)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", (url or default_url()).replace("%", "%%"))
    return cfg


def upgrade_to_head(target: Engine | str | None = None, *, revision: str = "head") -> None:
    """Migrate the database (an engine, a URL, or the default) to ``revision``.

    Safe to call from several processes (and threads) at startup: PostgreSQL serialises it
    with an advisory lock, SQLite with its write lock (see ``migrations/env.py``).
    """
    from alembic import command

    engine = target if isinstance(target, Engine) else make_engine(target)
    cfg = alembic_config(engine.url.render_as_string(hide_password=False))
    with _MIGRATE_LOCK, engine.connect() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    if not isinstance(target, Engine):
        engine.dispose()


def create_all(target: Engine | str | None = None) -> None:
    """Alias of :func:`upgrade_to_head`: the schema is only ever created by migrations."""
    upgrade_to_head(target)
