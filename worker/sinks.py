"""The worker's event sink: trainer events -> DB (batched, throttled) -> Redis notification.

Steps arrive many times a second on small models; each DB write is a transaction, so events are
buffered and written at most every ``flush_s`` (by the emitting thread or a small timer thread),
and at once for the events a user waits for. After each write a small JSON notification is
published on ``efficientllm:job:<id>`` so that a UI can poll right away; Redis being down is
logged and never fails training. A DB error keeps the batch for the next try.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from db import repo
from efficientllm.training.events import Event

log = logging.getLogger(__name__)

IMPORTANT = frozenset(
    {"started", "pruned", "eval", "checkpoint", "exported", "finished", "failed", "stopped"}
)
MAX_BUFFER = 50_000  # events kept while the DB is unreachable (the oldest are dropped beyond)
REDIS_RETRY_S = 10.0


def channel(job_id: str) -> str:
    """The Redis pub/sub channel of one job."""
    return f"efficientllm:job:{job_id}"


class Notifier:
    """Best-effort Redis publisher; after an error it stays quiet for ``REDIS_RETRY_S``."""

    def __init__(self, url: str | None) -> None:
        self.url = url
        self._client: Any = None
        self._down_until = 0.0

    def publish(self, job_id: str, message: dict[str, Any]) -> bool:
        if not self.url or time.monotonic() < self._down_until:
            return False
        try:
            if self._client is None:
                import redis

                self._client = redis.Redis.from_url(
                    self.url, socket_timeout=1.0, socket_connect_timeout=1.0
                )
            self._client.publish(channel(job_id), json.dumps(message))
            return True
        except Exception as err:  # never fail training because Redis is down
            log.warning("redis notification failed (%s); retrying in %.0f s", err, REDIS_RETRY_S)
            self._down_until = time.monotonic() + REDIS_RETRY_S
            self._client = None
            return False

    def close(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()
            self._client = None


class DbSink:
    """An ``EventSink`` writing a job's events with ``db.repo.record_events``; thread-safe."""

    def __init__(
        self,
        sm: sessionmaker[Session],
        *,
        job_id: str,
        flush_s: float = 0.5,
        redis_url: str | None = None,
    ) -> None:
        self.sm, self.job_id, self.flush_s = sm, job_id, flush_s
        self.notifier = Notifier(redis_url)
        self.last_seq = 0
        self.written = 0
        self._buf: list[dict[str, Any]] = []
        self._lock = threading.RLock()
        self._last_flush = time.monotonic()
        self._closed = threading.Event()
        self._timer = threading.Thread(target=self._tick, name=f"events-{job_id}", daemon=True)
        self._timer.start()

    def emit(self, event: Event) -> None:
        d = event.to_dict()
        with self._lock:
            self._buf.append(d)
            if len(self._buf) > MAX_BUFFER:
                del self._buf[: len(self._buf) - MAX_BUFFER]
            due = time.monotonic() - self._last_flush >= self.flush_s
            if d.get("type") in IMPORTANT or due:
                self.flush()

    def flush(self) -> bool:
        """Write the buffered events now; False (events kept) if the DB refused."""
        with self._lock:
            self._last_flush = time.monotonic()
            if not self._buf:
                return True
            batch = list(self._buf)
            try:
                self.last_seq = repo.record_events(self.sm, job_id=self.job_id, events=batch)
                ckpts = [int(e.get("step", 0)) for e in batch if e.get("type") == "checkpoint"]
                if ckpts:
                    repo.set_checkpoint(self.sm, job_id=self.job_id, step=max(ckpts))
            except Exception:
                log.exception(
                    "job %s: writing %d events failed; will retry", self.job_id, len(batch)
                )
                return False
            del self._buf[: len(batch)]
            self.written += len(batch)
        last = batch[-1]
        self.notifier.publish(
            self.job_id,
            {
                "job_id": self.job_id,
                "seq": self.last_seq,
                "type": last.get("type"),
                "step": last.get("step"),
                "types": sorted({str(e.get("type")) for e in batch}),
            },
        )
        return True

    def _tick(self) -> None:
        while not self._closed.wait(self.flush_s):
            with self._lock:
                stale = self._buf and time.monotonic() - self._last_flush >= self.flush_s
            if stale:
                self.flush()

    def close(self) -> None:
        """Stop the timer and write what is left (best effort, a few tries)."""
        self._closed.set()
        self._timer.join(timeout=self.flush_s + 5)
        for _ in range(3):
            if self.flush():
                break
            time.sleep(0.5)
        self.notifier.close()

    def publish_status(self, status: str) -> None:
        """Tell listeners the job reached ``status`` (after the DB says so)."""
        self.notifier.publish(self.job_id, {"job_id": self.job_id, "status": status})
