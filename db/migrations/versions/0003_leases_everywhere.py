"""leases everywhere: jobs.sent_at (no orphaned queued job), the generations' lease columns,
and the 'gguf' artifact kind (a run's GGUF file)

Revision ID: 0003
Revises: 0002
Create Date: 2025-01-03 00:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TS = sa.DateTime(timezone=True)
KINDS_OLD = "kind IN ('export', 'checkpoint', 'events')"
KINDS_NEW = "kind IN ('export', 'checkpoint', 'events', 'gguf')"
GEN_LEASE = ("lease_expires_at", "heartbeat_at", "started_at", "sent_at", "updated_at")


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("sent_at", TS, nullable=True))
    # rows queued before this revision were sent when they were last updated
    op.execute("UPDATE jobs SET sent_at = updated_at WHERE status = 'queued'")
    with op.batch_alter_table("generations") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(
            sa.Column("max_attempts", sa.Integer(), nullable=False, server_default="3")
        )
        batch.add_column(sa.Column("lease_owner", sa.String(256), nullable=True))
        for name in GEN_LEASE:
            batch.add_column(sa.Column(name, TS, nullable=True))
    op.execute("UPDATE generations SET sent_at = created_at, updated_at = created_at")
    op.create_index(
        op.f("ix_generations_status_lease_expires_at"),
        "generations",
        ["status", "lease_expires_at"],
    )
    _artifact_kinds(KINDS_NEW)


def _artifact_kinds(check: str) -> None:
    with op.batch_alter_table("artifacts") as batch:
        batch.drop_constraint(op.f("ck_artifacts_kind"), type_="check")
        batch.create_check_constraint(op.f("ck_artifacts_kind"), check)


def downgrade() -> None:
    op.execute("DELETE FROM artifacts WHERE kind = 'gguf'")
    _artifact_kinds(KINDS_OLD)
    op.drop_index(op.f("ix_generations_status_lease_expires_at"), table_name="generations")
    with op.batch_alter_table("generations") as batch:
        for name in ("attempt", "max_attempts", "lease_owner", *GEN_LEASE):
            batch.drop_column(name)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("sent_at")
