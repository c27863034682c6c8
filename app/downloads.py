"""``GET /api/jobs/{job_id}/artifact``: a job's export as a zip (``?format=gguf``: its GGUF
file for llama.cpp), for its owner only.

The files are chosen by the server: the job's ``export`` Artifact rows, relative to the
artifacts root (the data directory). Not found, not owned, not finished, or a path that resolves
outside the root (``..``, absolute, a planted symlink) all answer the same 404; logged out (login
on) is a 401 from the :func:`app.auth.requirer` dependency. Gradio's own file
routes are never used for this (no ``allowed_paths``).
"""

from __future__ import annotations

import logging
import os
import posixpath
import re
import tempfile
import zipfile
from pathlib import Path

from fastapi import APIRouter, Depends, HTTPException
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from app import auth
from app.context import AppContext
from db import repo

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


def export_files(ctx: AppContext, *, job_id: str, owner: str) -> list[tuple[Path, str]]:
    """(file, name in the zip) for every recorded export file of ``owner``'s job; [] = 404.

    Only files named by the job's ``export`` Artifact rows are served; each must resolve (links
    followed) to a regular file inside the artifacts root, or the whole download is refused.
    """
    if not _JOB_ID.match(job_id):
        return []
    with ctx.session() as s:
        if repo.get_job(s, job_id=job_id, owner=owner) is None:
            return []
        rels = [a.path for a in repo.artifacts(s, job_id=job_id, kind="export")]
    if not rels:
        return []
    common = posixpath.commonpath([posixpath.dirname(r) for r in rels])
    out = []
    for rel in rels:
        path = inside(ctx.data_dir, rel)
        if path is None or not path.is_file():
            log.warning("job %s: export file %r is missing or outside the root", job_id, rel)
            return []
        out.append((path, posixpath.join("export", posixpath.relpath(rel, common or "."))))
    return out


def gguf_file(ctx: AppContext, *, job_id: str, owner: str) -> Path | None:
    """The recorded GGUF file of ``owner``'s job (artifact kind ``gguf``), or None = 404."""
    if not _JOB_ID.match(job_id):
        return None
    with ctx.session() as s:
        if repo.get_job(s, job_id=job_id, owner=owner) is None:
            return None
        rels = [a.path for a in repo.artifacts(s, job_id=job_id, kind="gguf")]
    if not rels:
        return None
    path = inside(ctx.data_dir, rels[-1])
    if path is None or not path.is_file():
        log.warning("job %s: GGUF file %r is missing or outside the root", job_id, rels[-1])
        return None
    return path


def _zip(files: list[tuple[Path, str]], dest: Path) -> None:
    with zipfile.ZipFile(dest, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for path, arcname in files:
            zf.write(path, arcname=arcname)


def router(ctx: AppContext) -> APIRouter:
    """The download route, bound to the app context."""
    api = APIRouter()

    @api.get("/api/jobs/{job_id}/artifact")
    def download(
        job_id: str, format: str = "zip", user: str = Depends(auth.requirer(ctx))
    ) -> FileResponse:
        if format == "gguf":
            gguf = gguf_file(ctx, job_id=job_id, owner=user)
            if gguf is None:
                raise _not_found()
            return FileResponse(
                gguf,
                media_type="application/octet-stream",
                filename=f"efficientllm-{job_id[:8]}-{gguf.name}",
            )
        if format != "zip":
            raise HTTPException(status_code=400, detail="format must be zip or gguf")
        files = export_files(ctx, job_id=job_id, owner=user)
        if not files:
            raise _not_found()
        tmp_dir = ctx.data_dir / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f"{job_id}-", suffix=".zip", dir=tmp_dir)
        os.close(fd)
        try:
            _zip(files, Path(name))
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
