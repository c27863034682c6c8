"""Load: simulated users polling the Monitor while tiny jobs run through the real worker.

Per backend, ``--jobs`` tiny-debug jobs (a tiny random llama from ``tests/tiny.py``, ``--steps``
training steps) are submitted at once to one real worker subprocess (``python -m worker``, the
embedded default's worker, ``worker.embedded.start_local_worker``), and ``--users`` threads poll
the Monitor for ``--duration`` seconds:

* ``embedded``: SQLite job DB + kombu's SQLAlchemy broker on SQLite (no servers).
* ``redis-pg``: Redis on 127.0.0.1:6379 (a queue private to this run) + PostgreSQL on
  127.0.0.1:5432 database ``test`` (a fresh schema, dropped afterwards).

A user is the Monitor of one browser tab, called in-process exactly as Gradio calls it:
``Handlers.on_pick`` once (the job dropdown), then ``Handlers.on_tick`` on the page's
``gr.Timer`` period (``app.monitor.TICK_S``), with the render of the charts when something
changed. User ``i`` watches job ``i % jobs``. Gradio's HTTP/queue transport is not part of
the measurement (its per-tick cost is the same whatever the handler does). The poll latency is
the duration of one ``on_tick`` call. An error is any exception raised by a handler.

"Nothing lost", checked after the worker is stopped: per job the event seqs are 1..n, each
once; the step events are steps 1..k, each once (k = the job's total for a succeeded job); a
succeeded job has one ``started`` and one ``finished``; the metric rows match the step events;
every user's Monitor state, after one more poll, has the DB's last seq, status, metric steps,
architecture snapshots and event log (the same as a page reload). Jobs still queued or running
at the deadline are reported as such (one worker runs one job at a time).

    python -m bench.load                           # both backends, 120 s each (~6 min)
    python -m bench.load --duration 30 --backends embedded

Writes bench/results/load/results.json and results.md and prints the table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for p in (ROOT, ROOT / "tests"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

OUT_DIR = ROOT / "bench" / "results" / "load"
REDIS_URL = "redis://127.0.0.1:6379/0"
BACKENDS = ("embedded", "redis-pg")
TERMINAL = ("succeeded", "failed", "cancelled")


def stats(xs: list[float]) -> dict[str, Any]:
    """count, p50, p95 (linear interpolation), max; seconds."""
    xs = sorted(xs)
    if not xs:
        return {"count": 0, "p50": None, "p95": None, "max": None}

    def q(p: float) -> float:
        k = (len(xs) - 1) * p
        lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)

    return {"count": len(xs), "p50": round(q(0.5), 4), "p95": round(q(0.95), 4),
            "max": round(xs[-1], 4)}  # fmt: skip


# ---- services -------------------------------------------------------------------------------
@contextlib.contextmanager
def backend_settings(name: str, data: Path, step_delay: float) -> Iterator[Any]:
    """Worker settings for ``name``; the PostgreSQL schema lives as long as the context."""
    from worker.settings import Settings

    common = dict(data_dir=data, app_env="test" if step_delay else "production",
                  step_delay_s=step_delay)  # fmt: skip
    if name == "embedded":
        yield Settings(**common)  # type: ignore[arg-type]
        return
    import redis
    from worker_util import pg_schema, pg_unreachable

    redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()  # fails loudly when down
    if (why := pg_unreachable()) is not None:
        raise RuntimeError(why)
    with pg_schema() as url:
        yield Settings(redis_url=REDIS_URL, database_url=url,
                       queue=f"load-{os.getpid()}-{uuid.uuid4().hex[:6]}", **common)  # type: ignore[arg-type] # fmt: skip


def job_config(src: Path, docs: list[Path], steps: int) -> dict[str, Any]:
    from worker_util import tiny_job_config

    return tiny_job_config(src, docs, total_tokens=32 * 4 * steps, checkpoint_every=5)


class Counters:
    """SQL statements and transactions the pollers' engine issued (SQLAlchemy events)."""

    def __init__(self, engine: Any) -> None:
        from sqlalchemy import event

        self.statements = self.transactions = 0
        self._lock = threading.Lock()
        event.listen(engine, "before_cursor_execute", self._stmt)
        event.listen(engine, "begin", self._begin)

    def _stmt(self, *_: Any) -> None:
        with self._lock:
            self.statements += 1

    def _begin(self, *_: Any) -> None:
        with self._lock:
            self.transactions += 1


# ---- users ----------------------------------------------------------------------------------
class User(threading.Thread):
    """One Monitor tab: pick a job, then call the timer's handler every ``tick_s``."""

    def __init__(self, h: Any, job_id: str, tick_s: float, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.h, self.job_id, self.tick_s, self.stop = h, job_id, tick_s, stop
        self.req = SimpleNamespace(username=None)
        self.state: dict[str, Any] | None = None
        self.polls: list[float] = []
        self.redraws: list[float] = []
        self.errors: list[str] = []
        self.late = 0

    def run(self) -> None:
        from app.handlers import Handlers

        pick, tick = Handlers.on_pick.__wrapped__, Handlers.on_tick.__wrapped__  # unguarded
        try:
            self.state = pick(self.h, self.job_id, self.req)[-1]
        except Exception as err:
            self.errors.append(f"pick: {err!r}")
        t_next = time.monotonic()
        while not self.stop.is_set():
            t_next += self.tick_s
            wait = t_next - time.monotonic()
            if wait < 0:  # a Timer does not queue missed ticks
                self.late += 1
                t_next = time.monotonic()
            elif self.stop.wait(wait):
                break
            t0 = time.perf_counter()
            try:
                out = tick(self.h, self.state, self.req)
            except Exception as err:
                self.errors.append(f"tick: {err!r}")
                continue
            dt = time.perf_counter() - t0
            self.polls.append(dt)
            if out[-1] is self.state:  # redrawn (else gr.skip() updates: nothing changed)
                self.redraws.append(dt)


# ---- checks ---------------------------------------------------------------------------------
def check_jobs(sm: Any, jobs: list[str]) -> tuple[dict[str, Any], list[str]]:
    """Per job: status, event/step counts; and every 'nothing lost' problem found."""
    from sqlalchemy import select

    from db.models import Event, Job, MetricPoint

    info: dict[str, Any] = {}
    problems: list[str] = []
    with sm() as s:
        for j in jobs:
            job = s.get(Job, j)
            rows = s.execute(
                select(Event.seq, Event.type, Event.step)
                .where(Event.job_id == j)
                .order_by(Event.seq)
            ).all()
            seqs = [r.seq for r in rows]
            steps = [r.step for r in rows if r.type == "step"]
            kinds = Counter(r.type for r in rows)
            metric_steps = list(
                s.scalars(
                    select(MetricPoint.step)
                    .where(MetricPoint.job_id == j)
                    .order_by(MetricPoint.step)
                )
            )
            info[j] = {"status": job.status, "events": len(seqs), "steps": len(steps),
                       "total_steps": job.total_steps, "attempt": job.attempt,
                       "error": job.error_message}  # fmt: skip
            if seqs != list(range(1, len(seqs) + 1)):
                problems.append(f"{j[:8]}: event seqs are not 1..{len(seqs)} each once")
            if steps != list(range(1, len(steps) + 1)):
                problems.append(f"{j[:8]}: step events are not 1..{len(steps)} each once")
            if metric_steps != sorted(set(steps)):
                problems.append(f"{j[:8]}: metric rows {len(metric_steps)} != step events")
            if job.status == "succeeded" and (
                len(steps) != job.total_steps or kinds["started"] != 1 or kinds["finished"] != 1
            ):
                problems.append(f"{j[:8]}: succeeded with {len(steps)} steps, {dict(kinds)}")
            if job.status == "queued" and seqs:
                problems.append(f"{j[:8]}: queued with {len(seqs)} events")
    return info, problems


def check_users(ctx: Any, users: list[User], sm: Any) -> list[str]:
    """After one more (full) poll, every user's state equals a fresh load of its job."""
    from app import monitor
    from app.context import LOCAL_USER
    from db import repo

    problems: list[str] = []
    for i, u in enumerate(users):
        if u.state is None:
            problems.append(f"user {i}: no state")
            continue
        while monitor.advance(ctx, u.state, owner=LOCAL_USER, now=math.inf):
            pass
        fresh = monitor.load(ctx, job_id=u.job_id, owner=LOCAL_USER)
        assert fresh is not None
        st = u.state
        db_steps = [p.step for p in repo.metrics(sm, job_id=u.job_id)]
        same = {
            "cursor": st["cursor"] == fresh["cursor"],
            "status": st["job"]["status"] == fresh["job"]["status"],
            "metrics": [m["step"] for m in st["metrics"]] == db_steps,
            "snaps": st["snaps"] == fresh["snaps"],
            "log": st["log"] == fresh["log"],
        }
        if not all(same.values()):
            bad = [k for k, ok in same.items() if not ok]
            problems.append(f"user {i} ({u.job_id[:8]}): differs from a reload in {bad}")
    return problems


# ---- one backend ----------------------------------------------------------------------------
def run_backend(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from tiny import save_tiny_corpus, save_tiny_source

    import db
    from app import monitor
    from app.context import AppContext
    from worker.celery_app import make_app
    from worker.embedded import start_local_worker
    from worker.submit import submit_job

    tmp = Path(tempfile.mkdtemp(prefix=f"load-{name}-"))
    (tmp / "data").mkdir()
    out: dict[str, Any] = {"backend": name}
    try:
        with backend_settings(name, tmp / "data", args.step_delay) as settings:
            src = save_tiny_source(tmp / "src")
            docs = save_tiny_corpus(tmp / "corpus")
            config = job_config(src, docs, args.steps)
            db.upgrade_to_head(settings.db_url)
            engine = db.make_engine(settings.db_url)
            counters = Counters(engine)
            sm = db.session_factory(engine)
            ctx = AppContext(sessions=sm, data_dir=settings.data_dir, users=None,
                             max_upload_bytes=1, queue=settings.queue)  # fmt: skip
            celery = make_app(settings)
            log_path = tmp / "worker.log"
            worker = start_local_worker(
                settings, embedded=name == "embedded", log_path=log_path,
                extra_env={"LOGLEVEL": "INFO"},
            )  # fmt: skip
            try:
                out.update(measure(args, ctx, sm, counters, celery, config, submit_job))
            finally:
                out["worker_exit"] = worker.stop(grace_s=15)
            jobs = out.pop("_jobs")
            users = out.pop("_users")
            info, lost = check_jobs(sm, jobs)
            out["status_at_end"] = dict(Counter(v["status"] for v in info.values()))
            out["jobs"] = info
            out["nothing_lost_problems"] = lost
            out["monitor_agreement_problems"] = check_users(ctx, users, sm)
            out["tick_s"], out["full_refresh_s"] = monitor.TICK_S, monitor.FULL_REFRESH_S
            celery.close()
            engine.dispose()
            if lost or out["errors"]:
                out["worker_log_tail"] = log_path.read_text(errors="replace")[-3000:]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def measure(
    args: argparse.Namespace, ctx: Any, sm: Any, counters: Counters, celery: Any,
    config: dict[str, Any], submit_job: Any,
) -> dict[str, Any]:  # fmt: skip
    """Submit the jobs, run the users for ``args.duration`` seconds, collect the figures."""
    from app import monitor
    from app.handlers import Handlers
    from db import repo

    jobs = [
        submit_job(sm, config=config, owner="local", name=f"load-{i + 1}", celery=celery)
        for i in range(args.jobs)
    ]
    stop = threading.Event()
    h = Handlers(ctx)
    users = [User(h, jobs[i % len(jobs)], monitor.TICK_S, stop) for i in range(args.users)]
    load: list[float] = []
    t0 = time.monotonic()
    s0, x0 = counters.statements, counters.transactions
    for u in users:
        u.start()
    while time.monotonic() - t0 < args.duration:
        load.append(os.getloadavg()[0])
        time.sleep(min(5.0, max(0.0, args.duration - (time.monotonic() - t0))))
    stop.set()
    for u in users:
        u.join(timeout=30)
    elapsed = time.monotonic() - t0
    at_deadline = Counter(repo.get_job(sm, job_id=j).status for j in jobs)  # type: ignore[union-attr]
    polls = [x for u in users for x in u.polls]
    errors = [e for u in users for e in u.errors]
    return {
        "_jobs": jobs,
        "_users": users,
        "users": len(users),
        "n_jobs": len(jobs),
        "steps_per_job": args.steps,
        "duration_s": round(elapsed, 1),
        "polls": len(polls),
        "polls_per_s": round(len(polls) / elapsed, 1),
        "poll_latency": stats(polls),
        "redraw_latency": stats([x for u in users for x in u.redraws]),
        "missed_ticks": sum(u.late for u in users),
        "errors": len(errors),
        "error_samples": errors[:5],
        "db_statements_per_s": round((counters.statements - s0) / elapsed, 1),
        "db_transactions_per_s": round((counters.transactions - x0) / elapsed, 1),
        "status_at_deadline": dict(at_deadline),
        "loadavg_1m": {"mean": round(sum(load) / len(load), 2), "max": round(max(load), 2)},
    }


# ---- report ---------------------------------------------------------------------------------
def markdown(results: list[dict[str, Any]]) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1000:.0f} ms"

    def counts(d: dict[str, int]) -> str:
        return ", ".join(f"{v} {k}" for k, v in sorted(d.items()))

    lines = [
        "| backend | users / jobs | polls | poll p50 | p95 | max | redraw p95 | errors "
        "| DB stmts/s | jobs at the deadline | nothing lost | Monitor = reload | load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---|---|---|---:|",
    ]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['backend']} | skipped: {r['skipped']} |" + " |" * 11)
            continue
        lat = r["poll_latency"]
        lost, agree = r["nothing_lost_problems"], r["monitor_agreement_problems"]
        lines.append(
            "| " + " | ".join([
                r["backend"], f"{r['users']} / {r['n_jobs']}", str(r["polls"]),
                ms(lat["p50"]), ms(lat["p95"]), ms(lat["max"]), ms(r["redraw_latency"]["p95"]),
                str(r["errors"]), str(r["db_statements_per_s"]),
                counts(r["status_at_deadline"]),
                "yes" if not lost else f"**no** ({len(lost)})",
                "yes" if not agree else f"**no** ({len(agree)})",
                f"{r['loadavg_1m']['mean']:.1f}",
            ]) + " |"
        )  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=120.0, help="seconds per backend")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=16, help="training steps per job")
    parser.add_argument("--step-delay", type=float, default=0.0, help="FAULT_STEP_DELAY_S")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    args = parser.parse_args(argv)
    results = []
    for name in args.backends.split(","):
        if name not in BACKENDS:
            parser.error(f"unknown backend {name!r}; choose from {BACKENDS}")
        print(f"{name}: {args.users} users, {args.jobs} jobs, {args.duration:.0f} s", flush=True)
        try:
            results.append(run_backend(name, args))
        except Exception as err:  # a missing service skips that backend, loudly
            traceback.print_exc()
            results.append({"backend": name, "skipped": f"{err.__class__.__name__}: {err}"})
        print(markdown(results[-1:]), flush=True)
    out = {
        "command": "python -m bench.load " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },  # fmt: skip
        "results": results,
    }
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(out, indent=2, default=str) + "\n")
    table = markdown(results)
    (args.out_dir / "results.md").write_text(f"`{out['command']}`\n\n{table}\n")
    print(table)
    print(f"wrote {args.out_dir / 'results.json'}")


if __name__ == "__main__":
    main()
