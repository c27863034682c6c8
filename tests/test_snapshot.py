"""Events -> architecture snapshots is one function (``db.snapshot``): the DB's rows and the
Monitor's live state come out the same for the same event stream, resumed attempts included."""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # app/ and db/ are top-level packages next to efficientllm/
    sys.path.insert(0, str(ROOT))

pytest.importorskip("plotly")

from app import monitor  # noqa: E402
from app.context import LOCAL_USER, AppContext  # noqa: E402
from db import repo  # noqa: E402
from db.engine import make_engine, session_factory, upgrade_to_head  # noqa: E402
from db.snapshot import (  # noqa: E402
    Snapshot,
    fold_snapshots,
    merge_snapshot,
    snapshot_from_row,
    snapshot_of,
)


def _shape(ffn: list[int], hidden: int = 32) -> dict[str, Any]:
    layers = [{"num_heads": 4, "num_kv_heads": 2, "intermediate_size": f} for f in ffn]
    return {"hidden_size": hidden, "head_dim": 8, "vocab_size": 256, "layers": layers}


def _started(step: int, resumed_from: int | None = None) -> dict[str, Any]:
    return {"type": "started", "step": step, "tokens": step * 128, "source_params": 20000,
            "budget": 15000, "total_steps": 10, "shape": _shape([64, 64]),
            "resumed_from": resumed_from}  # fmt: skip


def _pruned(step: int, ffn: int, params: int, sal: float) -> dict[str, Any]:
    return {"type": "pruned", "step": step, "tokens": step * 128, "params_before": 20000,
            "params_after": params, "removed": {"ffn": 64 - ffn}, "shape": _shape([ffn, ffn]),
            "saliency": {"qhead": sal, "ffn": 0.5, "hidden": math.nan}}  # fmt: skip


def _step(step: int) -> dict[str, Any]:
    return {"type": "step", "step": step, "tokens": step * 128, "loss": 4.0, "params": 18000}


FINISHED = {"type": "finished", "step": 10, "tokens": 1280, "params": 15000,
            "shape": _shape([40, 40])}  # fmt: skip
BATCHES = [
    [_started(0), _step(1), _step(2)],
    [_pruned(3, 56, 18000, 0.9), _step(3), _step(4), _pruned(5, 48, 16000, 0.8)],
    # the worker died after step 5; attempt 2 resumes from the checkpoint at step 3: the same
    # source again, and step 5's pruning re-reported with other saliency numbers
    [_started(3, resumed_from=3), _step(4), _pruned(5, 48, 16000, 0.7)],
    [_pruned(7, 40, 15000, 0.6), FINISHED, {**FINISHED, "tokens": 1281}],
]


def _empty() -> dict[str, Any]:
    return {"source": None, "snaps": [], "metrics": [], "evals": [], "log": []}


def test_snapshot_of_maps_event_kinds_and_params() -> None:
    src, pruned, fin = (snapshot_of(e) for e in (_started(0), _pruned(3, 56, 18000, 0.9), FINISHED))
    assert src is not None and pruned is not None and fin is not None
    assert (src["kind"], src["params"], src["removed"]) == ("source", 20000, None)
    assert (pruned["kind"], pruned["params"], pruned["removed"]) == ("pruned", 18000, {"ffn": 8})
    assert pruned["saliency"] == {"qhead": 0.9, "ffn": 0.5, "hidden": None}  # JSON-safe
    assert (fin["kind"], fin["step"], fin["tokens"], fin["params"]) == ("final", 10, 1280, 15000)
    assert snapshot_of(_step(1)) is None
    assert snapshot_of({"type": "pruned", "step": 1}) is None  # no shape: no snapshot


def test_merge_keeps_the_first_source_and_replaces_a_re_reported_step() -> None:
    snaps: list[Snapshot] = []
    assert fold_snapshots(snaps, [e for batch in BATCHES for e in batch]) == [0, 1, 2, 3, 4]
    assert [(s["kind"], s["step"]) for s in snaps] == [
        ("source", 0),
        ("pruned", 3),
        ("pruned", 5),
        ("pruned", 7),
        ("final", 10),
    ]
    assert snaps[2]["saliency"] == {"qhead": 0.7, "ffn": 0.5, "hidden": None}  # newest wins
    assert snaps[4]["tokens"] == 1281
    again = snapshot_of(_started(3, resumed_from=3))
    assert again is not None and merge_snapshot(snaps, again) is None


def test_db_rows_and_monitor_state_give_the_same_snapshots(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'jobs.db'}")
    upgrade_to_head(engine)
    sm = session_factory(engine)
    ctx = AppContext(sessions=sm, data_dir=tmp_path, users=None, max_upload_bytes=1)
    job_id = repo.create_job(sm, config={}, owner=LOCAL_USER).id
    live = monitor.load(ctx, job_id=job_id, owner=LOCAL_USER)  # the page opened before the run
    assert live is not None and live["snaps"] == [] and live["source"] is None
    pure = _empty()
    for batch in BATCHES:
        repo.record_events(sm, job_id=job_id, events=batch)
        assert monitor.advance(ctx, live, owner=LOCAL_USER)  # the 1 s poll, from the DB log
        assert monitor.fold(pure, batch)  # the same events, never stored

    rows = [snapshot_from_row(r) for r in repo.snapshots(sm, job_id=job_id)]
    reloaded = monitor.load(ctx, job_id=job_id, owner=LOCAL_USER)  # a page refresh
    assert reloaded is not None
    want: list[Snapshot] = []
    fold_snapshots(want, [e for batch in BATCHES for e in batch])
    assert rows == want
    assert reloaded["snaps"] == want and live["snaps"] == want and pure["snaps"] == want
    assert reloaded["source"] == live["source"] == pure["source"] == _shape([64, 64])
    assert [r.seq for r in repo.snapshots(sm, job_id=job_id)] == [1, 2, 3, 4, 5]
    engine.dispose()
