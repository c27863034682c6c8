"""The offline asset cache: where assets live and how a folder is installed atomically.

An asset is built in a temporary folder beside its final place, the :data:`MARKER` written
last, and moved there with one ``os.replace``; a folder with the marker is complete and reused
at once, so an interrupted run never leaves a half-written folder behind.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

Progress = Callable[[str], None]
"""Receives one human-readable line per step of a long asset build."""

CACHE_ENV = "EFFICIENTLLM_CACHE"
MARKER = "efficientllm-asset.json"
"""Written last into a finished asset folder; its presence means the folder is complete."""

STALE_STAGING_S = 3600.0
"""A temporary folder this old was left by a killed run (a conversion takes about a minute)."""


def cache_root() -> Path:
    """``$EFFICIENTLLM_CACHE`` if set, else ``~/.cache/efficientllm``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "efficientllm"


def resolve_root(cache_dir: Path | str | None) -> Path:
    """``cache_dir`` (``~`` expanded) when given, else :func:`cache_root`."""
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root()


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a finished asset (its :data:`MARKER` exists)."""
    return (folder / MARKER).is_file()


def read_marker(folder: Path) -> dict[str, Any]:
    """The metadata a finished asset folder carries in its :data:`MARKER`."""
    meta: dict[str, Any] = json.loads((folder / MARKER).read_text(encoding="utf-8"))
    return meta


def write_marker(folder: Path, meta: dict[str, Any]) -> None:
    """Write the :data:`MARKER` (do this last: it declares the folder complete)."""
    (folder / MARKER).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


@contextmanager
def staging(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``final``; on success move it to ``final``.

    The caller writes everything, the :data:`MARKER` last. If another process finished the same
    asset first, its folder is kept and ours discarded. On any error the temporary folder is
    removed and ``final`` is left untouched.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(final)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if not is_complete(tmp):  # pragma: no cover - programming error
            raise RuntimeError(f"asset staged in {tmp} has no {MARKER}")
        _share(tmp)
        if final.exists() and not is_complete(final):
            log.warning("removing incomplete asset folder %s", final)
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            if not is_complete(final):
                raise
            log.info("%s was completed by another process; keeping it", final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def remove_stale_staging(final: Path) -> None:
    """Remove temporary folders of ``final`` older than :data:`STALE_STAGING_S` (a concurrent
    run's fresh folder is left alone)."""
    now = time.time()
    for old in final.parent.glob(f".{final.name}.tmp-*"):
        try:
            if now - old.stat().st_mtime > STALE_STAGING_S:
                log.info("removing %s, left by an interrupted run", old)
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass


def _umask() -> int:
    """The process umask, read without changing it (``os.umask`` would race with threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _share(folder: Path) -> None:
    """Give the finished folder ordinary permissions (mkdtemp and some writers use 0700/0600)."""
    umask = _umask()
    os.chmod(folder, 0o777 & ~umask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~umask)


def say(progress: Progress | None, message: str) -> None:
    """Log ``message`` and pass it to ``progress`` when one is given."""
    log.info("%s", message)
    if progress is not None:
        progress(message)
