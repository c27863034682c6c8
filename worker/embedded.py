"""The app's embedded default: a local worker subprocess, no Redis and no PostgreSQL.

``start_local_worker()`` migrates the SQLite job DB, starts ``python -m worker`` with the broker
on kombu's SQLAlchemy transport (``<data>/broker.sqlite``) and stops it when the app exits.
Stopping is SIGTERM (warm shutdown), then SIGKILL of the process group after a grace period: a
job cut short resumes from its last checkpoint at the next start (lease expiry + reaper).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

from worker.settings import Settings, get_settings

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


class LocalWorker:
    """Handle of a worker subprocess (its own process group)."""

    def __init__(self, proc: subprocess.Popen[bytes], settings: Settings) -> None:
        self.proc, self.settings = proc, settings

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, grace_s: float = 10.0) -> int | None:
        """Warm shutdown, then kill the whole group after ``grace_s``; returns the exit code."""
        if self.alive():
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                log.warning("worker %d did not stop in %.0f s; killing it", self.pid, grace_s)
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
            except ProcessLookupError:
                pass
        return self.proc.returncode


def worker_env(settings: Settings, base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a worker subprocess: ``base`` (os.environ) overlaid by ``settings``;
    unset broker/DB URLs are removed so the child takes the same embedded defaults."""
    env = dict(os.environ if base is None else base)
    for key in ("REDIS_URL", "DATABASE_URL", "FAULT", "FAULT_STEP_DELAY_S"):
        env.pop(key, None)
    env.update(settings.env())
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


def _die_with_parent() -> None:
    """Linux: the worker gets SIGTERM (a warm shutdown) if the app dies without stopping it."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


def start_local_worker(
    settings: Settings | None = None,
    *,
    embedded: bool = True,
    log_path: str | Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> LocalWorker:
    """Start ``python -m worker`` as a subprocess and stop it at interpreter exit.

    ``embedded=True`` drops ``REDIS_URL``/``DATABASE_URL``: SQLite DB and broker in the data dir.
    """
    from db.engine import upgrade_to_head

    settings = settings or get_settings()
    if embedded:
        settings = replace(settings, redis_url=None, database_url=None)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    upgrade_to_head(settings.db_url)
    env = worker_env(settings)
    env.update(extra_env or {})
    out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker"],
            cwd=str(ROOT),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
    finally:
        if log_path:
            out.close()  # type: ignore[union-attr]
    handle = LocalWorker(proc, settings)
    atexit.register(handle.stop)
    log.info("local worker started (pid %d, data %s)", proc.pid, settings.data_dir)
    return handle
