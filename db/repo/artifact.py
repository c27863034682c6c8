"""Artifacts: the files a job produced, by path relative to the artifacts root."""

from __future__ import annotations

import posixpath

from sqlalchemy import select

from db.models import Artifact, utcnow
from db.repo._session import Lease, SessionLike, lock_leased_job, scope, upsert


def _check_relative(path: str) -> str:
    norm = posixpath.normpath(path.replace("\\", "/"))
    if not path or norm.startswith(("/", "../")) or norm in ("..", ".") or "\x00" in path:
        raise ValueError(f"artifact path must be relative inside the artifacts root: {path!r}")
    return norm


def add_artifact(
    s: SessionLike,
    *,
    job_id: str,
    kind: str,
    path: str,
    size_bytes: int,
    sha256: str,
    lease: Lease | None = None,
) -> Artifact:
    """Record a produced file; idempotent on (job_id, kind, path) (the newest size/hash win).

    ``lease``: the worker's fencing token; LeaseLost (nothing recorded) if it is stale.
    """
    path = _check_relative(path)
    with scope(s) as session:
        if lease is not None:
            lock_leased_job(session, job_id, lease)
        upsert(
            session,
            Artifact,
            {
                "job_id": job_id,
                "kind": kind,
                "path": path,
                "size_bytes": size_bytes,
                "sha256": sha256,
                "created_at": utcnow(),
            },
            keys=("job_id", "kind", "path"),
        )
        session.commit()
        return session.execute(
            select(Artifact)
            .where(Artifact.job_id == job_id, Artifact.kind == kind, Artifact.path == path)
            .execution_options(populate_existing=True)
        ).scalar_one()


def artifacts(s: SessionLike, *, job_id: str, kind: str | None = None) -> list[Artifact]:
    """A job's artifacts, oldest first."""
    stmt = select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.id)
    if kind is not None:
        stmt = stmt.where(Artifact.kind == kind)
    with scope(s) as session:
        return list(session.scalars(stmt))
