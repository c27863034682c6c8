"""The worker's event sink: trainer events -> DB (batched, throttled) -> Redis notification.

Steps arrive many times a second on small models; each DB write is a transaction, so events are
buffered and written at most every ``flush_s`` (by the emitting thread or a small timer thread),
and at once for the events a user waits for. After each write a small JSON notification is
published on ``efficientllm:job:<id>`` so that a UI can poll right away; Redis being down is
logged and never fails training. A DB error keeps the batch for the next try.

Exactly once: the sink numbers its events itself (after the job's last stored seq) and writes
each batch in one transaction keyed by (job, seq) (``repo.record_events(first_seq=...)``), so a
retry after a failure whose outcome was unknown (committed, but the answer was lost) stores
nothing twice. Fencing: each batch names the attempt's lease; once the DB refuses it
(``repo.LeaseLost``) the sink drops what it holds, writes nothing more and calls
``on_lease_lost`` (the task stops the trainer).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
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
        lease: repo.Lease | None = None,
        on_lease_lost: Callable[[], None] | None = None,
    ) -> None:
        self.sm, self.job_id, self.flush_s = sm, job_id, flush_s
        self.lease, self.on_lease_lost = lease, on_lease_lost
        self.notifier = Notifier(redis_url)
        self.last_seq = 0
        self.last_step = 0
        """The highest training step among the events emitted so far."""
        self.written = 0
        self.lost = False
        """True once the DB refused our lease: nothing more is written."""
        self._next_seq: int | None = None  # seq of _buf[0]; read from the DB at the first flush
        self._buf: list[dict[str, Any]] = []
        self._lock = threading.RLock()
        self._last_flush = time.monotonic()
        self._closed = threading.Event()
        self._timer = threading.Thread(target=self._tick, name=f"events-{job_id}", daemon=True)
        self._timer.start()

    def emit(self, event: Event) -> None:
        d = event.to_dict()
        self.last_step = max(self.last_step, event.step)
        with self._lock:
            if self.lost:
                return
            self._buf.append(d)
            if len(self._buf) > MAX_BUFFER:
                dropped = len(self._buf) - MAX_BUFFER
                del self._buf[:dropped]
                if self._next_seq is not None:
                    self._next_seq += dropped  # a gap in the log, never a reused seq
            due = time.monotonic() - self._last_flush >= self.flush_s
            if d.get("type") in IMPORTANT or due:
                self.flush()

    def flush(self) -> bool:
        """Write the buffered events now; False (events kept) if the DB refused."""
        with self._lock:
            self._last_flush = time.monotonic()
            if self.lost:
                return False
            if not self._buf:
                return True
            batch = list(self._buf)
            try:
                if self._next_seq is None:
                    self._next_seq = repo.last_event_seq(self.sm, job_id=self.job_id) + 1
                # one transaction: events, metrics, snapshots, progress and checkpoint step
                self.last_seq = repo.record_events(
                    self.sm,
                    job_id=self.job_id,
                    events=batch,
                    first_seq=self._next_seq,
                    lease=self.lease,
                )
            except repo.LeaseLost as err:
                log.warning("job %s: %s; dropping %d events", self.job_id, err, len(batch))
                self.lost = True
                self._buf.clear()
                if self.on_lease_lost is not None:
                    self.on_lease_lost()
                return False
            except Exception:
                log.exception(
                    "job %s: writing %d events failed; will retry", self.job_id, len(batch)
                )
                return False
            del self._buf[: len(batch)]
            self._next_seq += len(batch)
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
            if self.flush() or self.lost:
                break
            time.sleep(0.5)
        self.notifier.close()

    def publish_status(self, status: str) -> None:
        """Tell listeners the job reached ``status`` (after the DB says so)."""
        self.notifier.publish(self.job_id, {"job_id": self.job_id, "status": status})
