"""Helpers for the worker tests: a private redis-server, worker subprocesses, DB URLs per
backend, tiny job configs and bounded waits."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import create_engine, text, update

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
    argv: tuple[str, ...] = ()
    """The command line it was started with (``restart`` runs it again: same port, same AOF)."""

    def url(self, db: int = 0) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> Any:
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, db=db, socket_timeout=2)

    def shutdown(self) -> None:
        """``redis-cli -p PORT shutdown``: Redis writes its AOF and exits (what an operator or
        a container restart does); waits until the process is gone."""
        exe = shutil.which("redis-cli")
        if exe:
            subprocess.run([exe, "-p", str(self.port), "shutdown"], timeout=10, check=False)
        else:
            with contextlib.suppress(Exception):
                self.client().shutdown()
        self.proc.wait(timeout=10)

    def restart(self) -> None:
        """Start the same server again (same port and data dir) and wait until it answers."""
        assert self.proc.poll() is not None, "stop or shut it down first"
        self.proc = subprocess.Popen(
            list(self.argv), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(lambda: _pings(self), 10, "redis-server to answer again")

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
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--appendonly", "yes"]
    argv += ["--dir", str(tmp), "--save", "", "--maxmemory-policy", "noeviction"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = RedisServer(port, proc, tuple(argv))
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


@functools.cache
def pg_unreachable() -> str | None:
    """Why PostgreSQL cannot be used here, or None (checked once per process)."""
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

    def wait_started(self, job_id: str, timeout: float, what: str) -> Any:
        """Wait until ``job_id`` has been claimed once (``started_at`` set); its row."""
        return wait_for(
            lambda: (j := self.job(job_id)) is not None and j.started_at is not None and j,
            timeout,
            f"{what} (worker log: {self.log})",
            interval=0.05,
        )

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def start_worker(self) -> Any:
        """Start a (new) worker subprocess on these settings, appending to the same log."""
        from worker.embedded import start_local_worker

        self.worker = start_local_worker(
            self.settings, embedded=False, log_path=self.log, extra_env={"LOGLEVEL": "INFO"}
        )
        return self.worker

    def kill_worker_group(self) -> None:
        """SIGKILL the whole worker: its process group (main, pool child, reaper companion)."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.worker.pid, signal.SIGKILL)
        self.worker.proc.wait(timeout=10)

    def wait_reaper_started(self, timeout: float, after: int = 0) -> float:
        """Wait until the log shows ``reaper started`` past byte ``after``; monotonic time."""
        wait_for(
            lambda: b"reaper started" in self.log.read_bytes()[after:],
            timeout,
            f"the worker's reaper to start (worker log: {self.log})",
            interval=0.05,
        )
        return time.monotonic()

    def stop(self) -> None:
        if self.worker is not None:
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
    start: bool = True,
    **overrides: Any,
) -> Stack:
    """A worker subprocess for tests (APP_ENV=test, the short timings above).

    ``start=False``: only migrate the DB (rows can be planted); call ``Stack.start_worker()``.
    ``overrides``: further ``Settings`` fields (e.g. ``time_limit_s``, or other timings).
    """
    from db.engine import make_engine, session_factory, upgrade_to_head
    from worker.celery_app import make_app
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
        **{**TEST_TIMINGS, **overrides},
    )
    log = data / "worker.log"
    upgrade_to_head(settings.db_url)
    sm = session_factory(make_engine(settings.db_url))
    stack = Stack(settings=settings, worker=None, app=make_app(settings), sm=sm, log=log)
    if start:
        stack.start_worker()
    return stack


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie awaiting its reaping parent counts as dead)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def dead_pid() -> int:
    """The PID of a process that has exited (for a lease owner whose worker is gone)."""
    proc = subprocess.Popen(["true"])
    proc.wait(timeout=10)
    return proc.pid


def plant_orphan(
    sm: Any, config: dict[str, Any], *, attempt: int, max_attempts: int, stale_s: float = 60
) -> str:
    """Insert a ``running`` job as a dead worker leaves it: lease owner ``host:<dead pid>``,
    heartbeat ``stale_s`` ago, lease expired; no broker message is sent for it."""
    from db import repo
    from db.models import Job, utcnow
    from worker.submit import validate_config

    job = repo.create_job(
        sm, config=validate_config(config), name="orphan", max_attempts=max_attempts
    )
    beat = utcnow() - timedelta(seconds=stale_s)
    with sm() as s:
        s.execute(
            update(Job)
            .where(Job.id == job.id)
            .values(
                status="running",
                attempt=attempt,
                lease_owner=f"{socket.gethostname()}:{dead_pid()}",
                started_at=beat,
                heartbeat_at=beat,
                lease_expires_at=beat + timedelta(seconds=TEST_TIMINGS["lease_ttl_s"]),
            )
        )
        s.commit()
    return job.id


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
