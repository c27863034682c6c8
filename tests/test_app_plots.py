"""Plot builders: the right traces with the right values for a sample shape sequence."""

from __future__ import annotations

import pytest

pytest.importorskip("plotly")

from app import monitor, plots  # noqa: E402


def layer(h: int, kv: int, ffn: int) -> dict[str, int]:
    return {"num_heads": h, "num_kv_heads": kv, "intermediate_size": ffn}


SOURCE = {"hidden_size": 32, "head_dim": 8, "vocab_size": 96, "layers": [layer(4, 2, 64)] * 3}
STEP1 = {**SOURCE, "layers": [layer(4, 2, 48), layer(2, 1, 64), layer(4, 2, 64)]}
STEP2 = {**SOURCE, "hidden_size": 24, "layers": [layer(2, 2, 40), layer(2, 1, 32), layer(4, 2, 64)]}
EVENTS = [
    {"tokens": 256, "shape": STEP1, "saliency": {"qhead": 0.8, "ffn": 0.5}},
    {"tokens": 512, "shape": STEP2, "saliency": {"qhead": 0.9, "ffn": 0.4, "hidden": 0.3}},
]


def test_arch_figure_bars_per_layer_against_source() -> None:
    fig = plots.arch_figure(STEP2, SOURCE, title="pruned · step 4", params=12345)
    names = [t.name for t in fig.data]
    assert names == [
        "source query heads", "query heads", "source KV heads", "KV heads",
        "source FFN width", "FFN width",
    ]  # fmt: skip
    by_name = {t.name: list(t.y) for t in fig.data}
    assert by_name["query heads"] == [2, 2, 4]
    assert by_name["KV heads"] == [2, 1, 2]
    assert by_name["FFN width"] == [40, 32, 64]
    assert by_name["source FFN width"] == [64, 64, 64]
    assert all(list(t.x) == [0, 1, 2] for t in fig.data)
    title = fig.layout.title.text
    assert "hidden 24 of 32" in title and "3 of 3 layers" in title and "12.35K params" in title


def test_arch_figure_without_source_has_three_traces() -> None:
    fig = plots.arch_figure(SOURCE)
    assert [t.name for t in fig.data] == ["query heads", "KV heads", "FFN width"]


def test_pruned_fractions_per_kind() -> None:
    f = plots.pruned_fractions(STEP2, SOURCE)
    assert f["qhead"] == pytest.approx(1 - 8 / 12)
    assert f["kvgroup"] == pytest.approx(1 - 5 / 6)
    assert f["ffn"] == pytest.approx(1 - 136 / 192)
    assert f["hidden"] == pytest.approx(0.25)
    assert f["layer"] == 0.0


def test_saliency_figure_fraction_and_saliency_traces() -> None:
    fig = plots.saliency_figure(EVENTS, SOURCE)
    by_name = {t.name: t for t in fig.data}
    assert list(by_name["ffn"].x) == [256, 512]
    assert list(by_name["ffn"].y) == pytest.approx([1 - 176 / 192, 1 - 136 / 192])
    assert list(by_name["hidden"].y) == pytest.approx([0.0, 0.25])
    assert list(by_name["qhead saliency"].y) == [0.8, 0.9]
    assert list(by_name["hidden saliency"].y) == [None, 0.3]
    assert "kvgroup saliency" not in by_name  # never reported: no empty trace


def test_saliency_figure_plots_old_head_key_as_qhead() -> None:
    old = [{**e, "saliency": {"head": 0.7, "ffn": 0.5, "hidden": 0.2}} for e in EVENTS]
    by_name = {t.name: t for t in plots.saliency_figure(old, SOURCE).data}
    assert list(by_name["qhead saliency"].y) == [0.7, 0.7]
    assert list(by_name["ffn saliency"].y) == [0.5, 0.5]
    assert "head saliency" not in by_name


def test_params_and_loss_figures() -> None:
    points = [
        {"tokens": 128, "loss": 4.0, "params": 100, "target_params": 100},
        {"tokens": 256, "loss": 3.5, "params": 90, "target_params": 85},
    ]
    evals = [{"tokens": 0, "ppl": 50.0, "label": "start"}, {"tokens": 256, "ppl": 30.0}]
    fig = plots.params_figure(points)
    assert [list(t.y) for t in fig.data] == [[100, 90], [100, 85]]
    fig = plots.loss_figure(points, evals)
    assert list(fig.data[0].y) == [4.0, 3.5]
    assert list(fig.data[1].y) == [50.0, 30.0] and fig.data[1].yaxis == "y2"


def test_compare_figure_and_shape_rows() -> None:
    fig = plots.compare_figure(STEP1, STEP2, names=("a", "b"))
    assert [t.name for t in fig.data] == ["a"] * 3 + ["b"] * 3
    assert list(fig.data[5].y) == [40, 32, 64]
    assert plots.shape_rows(STEP2, SOURCE)[1] == [1, "2 / 4", "1 / 2", "32 / 64"]


def test_monitor_fold_builds_the_snapshot_sequence() -> None:
    state = {"source": None, "snaps": [], "metrics": [], "evals": [], "log": []}
    events = [
        {"type": "started", "step": 0, "tokens": 0, "shape": SOURCE, "source_params": 1000},
        {"type": "step", "step": 1, "tokens": 128, "loss": 4.0, "params": 1000},
        {"type": "pruned", "step": 2, "tokens": 256, "shape": STEP1, "params_after": 900,
         "removed": {"ffn": 16}, "saliency": {"ffn": 0.5}},
        {"type": "eval", "step": 2, "tokens": 256, "ppl": 31.0, "label": "after_pruning"},
    ]  # fmt: skip
    assert monitor.fold(state, events)
    assert [s["kind"] for s in state["snaps"]] == ["source", "pruned"]
    assert state["snaps"][1]["params"] == 900 and state["source"] == SOURCE
    assert state["metrics"][0]["loss"] == 4.0 and state["evals"][0]["ppl"] == 31.0
    assert "pruned 16 ffn -> 900 params" in state["log"][1]
