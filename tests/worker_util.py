"""Helpers for the worker tests: a private redis-server, worker subprocesses, DB URLs per
backend, tiny job configs and bounded waits."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, text

PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
T = TypeVar("T")

# crash-recovery timings from docs/reliability.md
TEST_TIMINGS = dict(
    lease_ttl_s=5.0, heartbeat_s=1.0, reaper_s=1.0, visibility_timeout_s=10.0, event_flush_s=0.3
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(pred: Callable[[], T], timeout: float, what: str, interval: float = 0.1) -> T:
    """Poll ``pred`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


@dataclass
class RedisServer:
    """A throwaway ``redis-server`` on 127.0.0.1 (AOF on, data in a temp dir)."""

    port: int
    proc: subprocess.Popen[bytes]

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


@contextlib.contextmanager
def redis_server(tmp: Path) -> Iterator[RedisServer]:
    exe = shutil.which("redis-server")
    if exe is None:
        import pytest

        pytest.skip("redis-server is not installed")
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes"]
        + ["--dir", str(tmp), "--save", "", "--maxmemory-policy", "noeviction"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    server = RedisServer(port, proc)
    try:
        wait_for(lambda: _pings(server), 10, "redis-server to answer")
        yield server
    finally:
        server.stop()


def _pings(server: RedisServer) -> bool:
    try:
        return bool(server.client().ping())
    except Exception:
        return False


def pg_unreachable() -> str | None:
    """Why PostgreSQL cannot be used here, or None."""
    try:
        eng = create_engine(PG_URL, connect_args={"connect_timeout": 3})
        with eng.connect() as conn:
            conn.execute(text("SELECT 1"))
        eng.dispose()
        return None
    except Exception as exc:
        return f"PostgreSQL at {PG_URL} is not reachable: {exc.__class__.__name__}"


@contextlib.contextmanager
def pg_schema() -> Iterator[str]:
    """A URL pointing at a fresh PostgreSQL schema, dropped afterwards."""
    schema = f"w_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield f"{PG_URL}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE pid <> pg_backend_pid() AND query LIKE :q"
                ),
                {"q": f"%{schema}%"},
            )
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@dataclass
class Stack:
    """One worker subprocess with its settings, Celery app (for sending) and DB sessions."""

    settings: Any
    worker: Any
    app: Any
    sm: Any
    log: Path

    def submit(self, config: dict[str, Any], **kw: Any) -> str:
        from worker.submit import submit_job

        return submit_job(self.sm, config=config, celery=self.app, **kw)

    def job(self, job_id: str) -> Any:
        from db import repo

        return repo.get_job(self.sm, job_id=job_id)

    def wait_status(self, job_id: str, statuses: set[str], timeout: float) -> Any:
        return wait_for(
            lambda: (j := self.job(job_id)) is not None and j.status in statuses and j,
            timeout,
            f"job {job_id} to reach {sorted(statuses)} (worker log: {self.log})",
            interval=0.1,
        )

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        self.worker.stop(grace_s=5)
        with contextlib.suppress(Exception):
            self.app.close()
        with contextlib.suppress(Exception):
            self.sm.kw["bind"].dispose()


def start_stack(
    data: Path,
    *,
    redis_url: str | None,
    db_url: str | None,
    step_delay_s: float = 0.1,
    fault: str | None = None,
    max_attempts: int = 3,
    queue: str = "gpu",
) -> Stack:
    """A worker subprocess for tests (APP_ENV=test, the short timings above)."""
    from db.engine import make_engine, session_factory
    from worker.celery_app import make_app
    from worker.embedded import start_local_worker
    from worker.settings import Settings

    data.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        redis_url=redis_url,
        database_url=db_url,
        data_dir=data,
        max_attempts=max_attempts,
        queue=queue,
        app_env="test",
        fault=fault,
        step_delay_s=step_delay_s,
        **TEST_TIMINGS,
    )
    log = data / "worker.log"
    worker = start_local_worker(
        settings, embedded=False, log_path=log, extra_env={"LOGLEVEL": "INFO"}
    )
    sm = session_factory(make_engine(settings.db_url))
    return Stack(settings=settings, worker=worker, app=make_app(settings), sm=sm, log=log)


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def lease_pid(lease_owner: str) -> int:
    """The PID part of a ``host:pid`` lease owner."""
    return int(lease_owner.rsplit(":", 1)[1])


def tiny_job_config(src: Path, docs: list[Path], **train: Any) -> dict[str, Any]:
    """A tiny-debug run config (40 steps, checkpoints every 5 steps, deterministic CPU)."""
    from efficientllm.presets import build_config

    cfg = build_config(
        preset="tiny-debug",
        overrides={
            "model": {"source": str(src)},
            "data": {"train": [str(p) for p in docs]},
            "train": {"deterministic": True, "checkpoint_every": 5, "device": "cpu", **train},
        },
    )
    return cfg.to_dict()
