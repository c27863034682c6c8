"""Server-side cost of one Monitor tick: redraw only what changed vs redraw everything.

One job with a SmolLM2-135M-sized history (30 layers; ``--steps`` step events, ``--prunes``
pruning events with saliency, three evals) in a temp SQLite DB; one Monitor state picked as the
page does (``Handlers.on_pick``). Then, alternating so that both see the same machine load, one
new event of each kind is written and one tick is timed two ways:

* **partial** (the app): ``Handlers.on_tick``: the full read, then only the outputs whose data
  changed (``app.handlers.drawn_from``), the rest ``gr.skip()``;
* **full** (before): ``monitor.advance`` then ``Handlers.render`` of all eleven outputs, as the
  tick did before.

Each timing includes Gradio's serialisation of what is sent (``gr.Plot.postprocess``: the
Plotly figure to JSON, the dominant part) and reports the bytes sent. Not included: Gradio's
queue and HTTP transport and the browser's drawing (both also shrink with fewer figures sent).

    python bench/monitor_tick.py              # ~30 s
    python bench/monitor_tick.py --reps 5

Prints a Markdown table and writes bench/results/monitor_tick.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

LAYERS, HEADS, KV, FFN, HIDDEN = 30, 9, 3, 1536, 576  # SmolLM2-135M
KINDS = ("step", "pruned", "nothing new")


def shape(ffn: int) -> dict[str, Any]:
    layer = {"num_heads": HEADS, "num_kv_heads": KV, "intermediate_size": ffn}
    return {"hidden_size": HIDDEN, "head_dim": 64, "vocab_size": 49152, "layers": [layer] * LAYERS}


class Job:
    """A job's event stream, written to the DB as the worker would (one event per call)."""

    def __init__(self, sm: Any, job_id: str) -> None:
        self.sm, self.job_id, self.step, self.ffn = sm, job_id, 0, FFN

    def write(self, kind: str) -> None:
        from db import repo

        if kind == "nothing new":
            return
        self.step += 1
        at = {"step": self.step, "tokens": self.step * 4096}
        e: dict[str, Any] = {"type": "step", **at, "loss": 3.0 + 1 / self.step,
                             "params": 134_000_000 - self.step, "target_params": 10**8}  # fmt: skip
        if kind == "pruned":
            self.ffn -= 8
            e = {"type": "pruned", **at, "params_before": 1, "params_after": 1,
                 "removed": {"ffn": 8 * LAYERS}, "shape": shape(self.ffn),
                 "saliency": {"qhead": 0.3, "ffn": 0.5, "layer": 0.1}}  # fmt: skip
        repo.record_events(self.sm, job_id=self.job_id, events=[e])


def sent(out: list[Any]) -> tuple[int, int]:
    """(outputs sent, bytes) of a tick's outputs: Plotly figures as Gradio serialises them."""
    import gradio as gr

    plot, n, size = gr.Plot(), 0, 0
    for o in out[:-1]:  # the last output is the gr.State: it stays on the server
        if o == gr.skip():
            continue
        n += 1
        if hasattr(o, "to_json"):
            data = plot.postprocess(o)
            size += len(data.model_dump_json()) if data is not None else 0
        elif isinstance(o, gr.Slider):
            size += len(json.dumps([o.maximum, o.value]))
        else:
            size += len(json.dumps(o))
    return n, size


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=1000, help="step events already in the DB")
    parser.add_argument("--prunes", type=int, default=20, help="pruning events already there")
    parser.add_argument("--reps", type=int, default=15, help="ticks per kind and way")
    parser.add_argument(
        "--out", type=Path, default=ROOT / "bench" / "results" / "monitor_tick.json"
    )
    args = parser.parse_args(argv)

    import gradio as gr

    from app import monitor
    from app.context import LOCAL_USER, AppContext
    from app.handlers import Handlers
    from db import repo
    from db.engine import make_engine, session_factory, upgrade_to_head

    tmp = Path(tempfile.mkdtemp(prefix="monitor-tick-"))
    engine = make_engine(f"sqlite:///{tmp / 'jobs.db'}")
    upgrade_to_head(engine)
    sm = session_factory(engine)
    ctx = AppContext(sessions=sm, data_dir=tmp, users=None, max_upload_bytes=1)
    job_id = repo.create_job(sm, config={}, owner=LOCAL_USER).id
    started = {"type": "started", "step": 0, "tokens": 0, "shape": shape(FFN),
               "source_params": 134_515_008, "budget": 10**8, "total_steps": 10**6}  # fmt: skip
    repo.record_events(sm, job_id=job_id, events=[started])
    job = Job(sm, job_id)
    every = max(args.steps // max(args.prunes, 1), 1)
    for i in range(args.steps):
        job.write("pruned" if i % every == every - 1 else "step")
    for label in ("start", "after_pruning", "final"):
        repo.record_events(sm, job_id=job_id, events=[{"type": "eval", "step": job.step,
                           "tokens": job.step * 4096, "ppl": 20.0, "label": label}])  # fmt: skip

    h, req = Handlers(ctx), SimpleNamespace(username=None, session_hash="bench")
    st = {way: h.on_pick(job_id, req)[-1] for way in ("partial", "full")}  # a tab each

    def partial() -> list[Any]:
        return h.on_tick(st["partial"], req)

    def full() -> list[Any]:
        if not monitor.advance(ctx, st["full"], owner=LOCAL_USER):
            return [gr.skip()] * (len(h.render(st["full"], ())) + 1)
        return [*h.render(st["full"]), st["full"]]

    ways: dict[str, Callable[[], list[Any]]] = {"partial": partial, "full": full}
    times: dict[tuple[str, str], list[float]] = {(w, k): [] for w in ways for k in KINDS}
    payload: dict[tuple[str, str], tuple[int, int]] = {}
    for rep in range(args.reps):
        for kind in KINDS:
            job.write(kind)  # both tabs see this one new event
            for way in sorted(ways, reverse=rep % 2 == 1):  # the first read after a write pays
                tick = ways[way]  # for SQLite's page cache: each way goes first every other time
                st[way]["read_at"] = -math.inf  # a full read is due: a tick after 1 s does one
                t0 = time.perf_counter()
                out = tick()
                payload[way, kind] = sent(out)
                times[way, kind].append(time.perf_counter() - t0)
    engine.dispose()

    rows: list[dict[str, Any]] = []
    for kind in KINDS:
        med = {w: statistics.median(times[w, kind]) for w in ways}
        rows.append(
            {
                "event": kind,
                "full_ms": round(med["full"] * 1000, 1),
                "partial_ms": round(med["partial"] * 1000, 1),
                "ratio": round(med["partial"] / med["full"], 3),
                "full_sent": payload["full", kind],
                "partial_sent": payload["partial", kind],
            }
        )
    result: dict[str, Any] = {
        "rows": rows,
        "reps": args.reps,
        "history": {"steps": args.steps, "prunes": args.prunes, "layers": LAYERS},
        "loadavg": os.getloadavg(),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "command": "python bench/monitor_tick.py " + " ".join(argv or sys.argv[1:]),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print("| tick after | full redraw ms | partial ms | ratio | sent full | sent partial |")
    print("|---|---:|---:|---:|---|---|")
    for r in rows:
        f, p = r["full_sent"], r["partial_sent"]
        sizes = f"{f[0]} outputs, {f[1] / 1e3:.0f} kB | {p[0]} outputs, {p[1] / 1e3:.0f} kB"
        print(f"| {r['event']} | {r['full_ms']} | {r['partial_ms']} | {r['ratio']} | {sizes} |")
    print(f"medians of {args.reps} ticks each; load average {result['loadavg'][0]:.2f}")


if __name__ == "__main__":
    main()
