"""SQLite contention between processes (reliability checklist R18), the embedded default's DB.

Two OS processes, each with its own engine on one SQLite file (WAL), for ``--duration`` seconds:

* ``worker``: what a training job writes, at ``--write-hz`` (20): a heartbeat and an event batch
  (one step) per tick through ``db.repo``, timing each write (heartbeat + batch);
* ``web``: what the Monitor reads, at ``--read-hz`` (50): the job row, the events after its
  cursor and the job list; plus a reaper pass every 0.2 s.

Counted: ``database is locked`` (and any other) errors per process, the write latency histogram
(p50/p95/p99/max) and the reads done. The checklist's goal: 0 errors, p99 write < 200 ms.

    python -m bench.sqlite_contention                 # 30 s
    python -m bench.sqlite_contention --duration 10

Writes bench/results/sqlite_contention/results.json and results.md and prints the table.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

OUT = ROOT / "bench" / "results" / "sqlite_contention"


def _step(step: int) -> dict[str, Any]:
    from efficientllm.training.events import StepMetrics

    return StepMetrics(
        step=step, tokens=step, phase="prune", loss=1.0, lr=1e-3, params=1, target_params=1,
        tokens_per_s=1.0,
    ).to_dict()  # fmt: skip


def _paced(hz: float, start: float, until: float, body: Any) -> None:
    """From ``start`` to ``until`` (monotonic), call ``body(i)`` ``hz`` times a second on a
    fixed schedule (no drift)."""
    period, i = 1.0 / hz, 0
    time.sleep(max(0.0, start - time.monotonic()))
    while time.monotonic() < until:
        body(i)
        i += 1
        time.sleep(max(0.0, start + i * period - time.monotonic()))


def worker_proc(url: str, job_id: str, hz: float, span: tuple[float, float], out: Any) -> None:
    from db import repo
    from db.engine import make_engine, session_factory

    sm = session_factory(make_engine(url))
    lease = repo.Lease("bench-worker", 1)
    lat: list[float] = []
    errors: list[str] = []

    def tick(i: int) -> None:
        t = time.perf_counter()
        try:
            repo.heartbeat(sm, job_id=job_id, worker_id=lease.owner, attempt=1, ttl_s=60)
            repo.record_events(sm, job_id=job_id, events=[_step(i + 1)], lease=lease)
        except Exception as err:  # counted, not fatal: the point is how often it happens
            errors.append(f"{type(err).__name__}: {err}"[:200])
        lat.append((time.perf_counter() - t) * 1000)

    _paced(hz, *span, tick)
    out.put({"role": "worker", "write_ms": lat, "errors": errors})


def web_proc(url: str, job_id: str, hz: float, span: tuple[float, float], out: Any) -> None:
    from db import repo
    from db.engine import make_engine, session_factory

    sm = session_factory(make_engine(url))
    cursor, errors, reads, read_ms = [0], [], [0], []
    next_reap = [0.0]

    def tick(i: int) -> None:
        t = time.perf_counter()
        try:
            repo.get_job(sm, job_id=job_id)
            batch = repo.events_after(sm, job_id=job_id, cursor=cursor[0])
            cursor[0] = batch[-1].seq if batch else cursor[0]
            repo.list_jobs(sm, owner="local")
            if time.monotonic() >= next_reap[0]:
                repo.reap_orphans(sm)
                next_reap[0] = time.monotonic() + 0.2
            reads[0] += 1
        except Exception as err:
            errors.append(f"{type(err).__name__}: {err}"[:200])
        read_ms.append((time.perf_counter() - t) * 1000)

    _paced(hz, *span, tick)
    out.put({"role": "web", "reads": reads[0], "read_ms": read_ms, "errors": errors,
             "events_seen": cursor[0]})  # fmt: skip


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))] if s else float("nan")


def run(args: argparse.Namespace) -> dict[str, Any]:
    from db import repo
    from db.engine import make_engine, session_factory, upgrade_to_head

    tmp = Path(tempfile.mkdtemp(prefix="sqlite-contention-"))
    url = f"sqlite:///{tmp / 'jobs.db'}"
    upgrade_to_head(url)
    sm = session_factory(make_engine(url))
    job_id = repo.create_job(sm, config={"bench": True}).id
    assert repo.claim_job(sm, job_id=job_id, worker_id="bench-worker", ttl_s=3600)
    sm.kw["bind"].dispose()
    ctx = mp.get_context("spawn")  # fresh interpreters: two processes, as worker and web are
    out = ctx.Queue()
    start = time.monotonic() + 5  # time for both interpreters to start; then the same window
    span = (start, start + args.duration)
    procs = [
        ctx.Process(target=worker_proc, args=(url, job_id, args.write_hz, span, out)),
        ctx.Process(target=web_proc, args=(url, job_id, args.read_hz, span, out)),
    ]
    for p in procs:
        p.start()
    got = {r["role"]: r for r in (out.get(timeout=args.duration + 120) for _ in procs)}
    for p in procs:
        p.join(timeout=30)
    shutil.rmtree(tmp, ignore_errors=True)
    w, r = got["worker"], got["web"]
    return {
        "duration_s": args.duration,
        "write_hz": args.write_hz,
        "read_hz": args.read_hz,
        "writes": len(w["write_ms"]),
        "reads": r["reads"],
        "events_seen_by_web": r["events_seen"],
        "errors": {"worker": w["errors"], "web": r["errors"]},
        "locked_errors": sum("locked" in e for e in w["errors"] + r["errors"]),
        "write_ms": {
            q: pct(w["write_ms"], p)
            for q, p in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))
        },  # fmt: skip
        "read_ms": {
            q: pct(r["read_ms"], p)
            for q, p in (("p50", 50), ("p95", 95), ("p99", 99), ("max", 100))
        },  # fmt: skip
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_avg_after": os.getloadavg()[0],
    }


def markdown(res: dict[str, Any]) -> str:
    w, r = res["write_ms"], res["read_ms"]
    errs = len(res["errors"]["worker"]) + len(res["errors"]["web"])
    return "\n".join([
        f"SQLite (WAL), 2 processes, {res['duration_s']:g} s: worker writes at "
        f"{res['write_hz']:g} Hz, web reads at {res['read_hz']:g} Hz (+ reaper every 0.2 s); "
        f"load average after: {res['load_avg_after']:.1f}.",
        "",
        "| | count | errors | `locked` | p50 ms | p95 ms | p99 ms | max ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| worker write (heartbeat + event batch) | {res['writes']} | "
        f"{len(res['errors']['worker'])} | {res['locked_errors']} | {w['p50']:.1f} | "
        f"{w['p95']:.1f} | {w['p99']:.1f} | {w['max']:.1f} |",
        f"| web read (job, events after cursor, job list) | {res['reads']} | "
        f"{len(res['errors']['web'])} | | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | "
        f"{r['max']:.1f} |",
        "",
        f"Goal (R18): 0 errors (got {errs}), p99 write < 200 ms (got {w['p99']:.1f} ms).",
    ])  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=30.0)
    ap.add_argument("--write-hz", type=float, default=20.0)
    ap.add_argument("--read-hz", type=float, default=50.0)
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    res = run(args)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    md = markdown(res)
    (args.out / "results.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
