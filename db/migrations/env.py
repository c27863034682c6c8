"""Alembic environment: online migrations on a given connection or a URL.

The URL is, in order: a connection passed in ``config.attributes["connection"]`` (programmatic
use), ``sqlalchemy.url`` from the config, ``$DATABASE_URL``, the default SQLite file.
Migrations are serialised across processes: a transaction-scoped advisory lock on PostgreSQL,
``BEGIN IMMEDIATE`` (the engine's default) on SQLite.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, text

from db.engine import default_url, make_engine
from db.models import Base

config = context.config
target_metadata = Base.metadata
MIGRATION_LOCK_KEY = 0x6566666C6C6D  # "effllm": the advisory lock id on PostgreSQL


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        compare_type=True,
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = make_engine(config.get_main_option("sqlalchemy.url") or default_url())
    try:
        with engine.connect() as conn:
            _run(conn)
    finally:
        engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline (--sql) migrations are not supported; run them online")
run_migrations_online()
