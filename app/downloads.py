"""``GET /api/jobs/{job_id}/artifact``: a job's export as a zip, for its owner only.

The path is chosen by the server: the job's newest ``export`` Artifact row, relative to the
artifacts root (the data directory). Not found, not owned, not finished, or a path that resolves
outside the root (``..``, absolute, a planted symlink) all answer the same 404. Gradio's own file
routes are never used for this (no ``allowed_paths``).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from db import repo

if TYPE_CHECKING:
    from app.main import AppContext

log = logging.getLogger(__name__)
_JOB_ID = re.compile(r"^[0-9a-f]{32}$")


def _not_found() -> HTTPException:
    return HTTPException(status_code=404, detail="not found")


def inside(root: Path, rel: str) -> Path | None:
    """``root/rel`` fully resolved if it stays inside ``root`` (symlinks followed), else None."""
    root = root.resolve()
    candidate = (root / rel).resolve()
    if candidate == root or root not in candidate.parents:
        return None
    return candidate


def export_path(ctx: AppContext, *, job_id: str, owner: str) -> Path | None:
    """The export folder/file of ``owner``'s job, or None (any reason: the caller says 404)."""
    if not _JOB_ID.match(job_id):
        return None
    with ctx.session() as s:
        job = repo.get_job(s, job_id=job_id, owner=owner)
        if job is None:
            return None
        rows = repo.artifacts(s, job_id=job_id, kind="export")
    if not rows:
        return None
    path = inside(ctx.data_dir, rows[-1].path)
    return path if path is not None and path.exists() else None


def _zip(src: Path, root: Path, dest: Path) -> None:
    """Write ``src`` (a file, or a folder's regular files) into ``dest``; skip escaping links."""
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        if src.is_file():
            zf.write(src, arcname=src.name)
            return
        for dirpath, _dirs, files in os.walk(src):
            for name in sorted(files):
                f = Path(dirpath) / name
                real = f.resolve()
                if not real.is_file() or (root not in real.parents):
                    log.warning("skipping %s in a download: outside the artifacts root", f)
                    continue
                zf.write(real, arcname=str(Path(src.name) / f.relative_to(src)))


def router(ctx: AppContext) -> APIRouter:
    """The download route, bound to the app context."""
    api = APIRouter()

    @api.get("/api/jobs/{job_id}/artifact")
    def download(job_id: str, request: Request) -> FileResponse:
        user = ctx.user_of(request)
        if user is None:
            raise _not_found()
        path = export_path(ctx, job_id=job_id, owner=user)
        if path is None:
            raise _not_found()
        tmp_dir = ctx.data_dir / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{job_id}-", suffix=".zip", dir=tmp_dir)
        os.close(fd)
        try:
            _zip(path, ctx.data_dir.resolve(), Path(name))
        except OSError:
            os.unlink(name)
            log.exception("could not zip the export of job %s", job_id)
            raise HTTPException(status_code=500, detail="could not prepare the download") from None
        return FileResponse(
            name,
            media_type="application/zip",
            filename=f"efficientllm-{job_id[:8]}-export.zip",
            background=BackgroundTask(os.unlink, name),
        )

    return api
