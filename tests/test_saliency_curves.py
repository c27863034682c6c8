"""The saliency curves a real tiny run emits are the ones the Monitor plots (one name for each
kind, ``efficientllm.curves``), and events from older runs still plot."""

from __future__ import annotations

import math
from typing import Any

import pytest

pytest.importorskip("plotly")

from tiny import save_tiny_corpus, save_tiny_source  # noqa: E402

from app import monitor, plots  # noqa: E402
from efficientllm.choices import GROUP_KINDS as KINDS  # noqa: E402
from efficientllm.curves import SALIENCY_KINDS, saliency_curves  # noqa: E402
from efficientllm.presets import build_config  # noqa: E402
from efficientllm.training.events import ListSink  # noqa: E402
from efficientllm.training.trainer import Trainer  # noqa: E402

PLOTTED = ("qhead", "ffn", "hidden")  # what the Monitor's saliency panel must show


@pytest.fixture(scope="module")
def monitor_state(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The Monitor's state after folding every event of a short tiny run (8 steps, 2 prunes)."""
    d = tmp_path_factory.mktemp("curves")
    src, docs = save_tiny_source(d / "src"), save_tiny_corpus(d / "corpus")
    cfg = build_config(
        preset="tiny-debug",
        overrides={
            "model": {"source": str(src)},
            "data": {"train": [str(p) for p in docs]},
            "train": {"total_tokens": 32 * 4 * 8, "checkpoint_every": 0},
            "out_dir": str(d / "run"),
        },
    )
    sink = ListSink()
    Trainer(cfg, sink=sink).run()
    state: dict[str, Any] = {"source": None, "snaps": [], "metrics": [], "evals": [], "log": []}
    monitor.fold(state, [e.to_dict() for e in sink.events])
    return state


def test_the_monitor_plots_every_saliency_curve_the_trainer_emits(monitor_state) -> None:
    pruned = [s for s in monitor_state["snaps"] if s["kind"] == "pruned"]
    assert len(pruned) >= 2
    assert all(set(s["saliency"]) == set(PLOTTED) for s in pruned)
    fig = plots.saliency_figure(pruned, monitor_state["source"])
    by_name = {t.name: t for t in fig.data}
    for kind in PLOTTED:
        trace = by_name[f"{kind} saliency"]
        assert list(trace.x) == [s["tokens"] for s in pruned]
        assert list(trace.y) == [s["saliency"][kind] for s in pruned]
        assert all(math.isfinite(v) and v >= 0 for v in trace.y)


def test_saliency_kinds_are_group_kinds() -> None:
    assert set(SALIENCY_KINDS) == set(PLOTTED) and set(SALIENCY_KINDS) <= set(KINDS)


def test_old_head_key_is_read_as_qhead() -> None:
    assert saliency_curves({"head": 0.7, "ffn": 0.5}) == {"qhead": 0.7, "ffn": 0.5}
    assert saliency_curves({"head": 0.7, "qhead": 0.9}) == {"qhead": 0.9}
    assert saliency_curves(None) == {}
