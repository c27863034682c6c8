"""bench/quality end to end at its `tiny` scale: four arms, equal tokens, the budget, the files,
and the same numbers when rerun with the same seed (the cpu scale's reproducibility claim)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from tiny import tiny_text

ROOT = Path(__file__).resolve().parents[1]


def _prose(seed: int, paragraphs: int) -> str:
    """tiny_text with capitalised sentences, so the next-sentence task can split it."""
    text = tiny_text(seed, paragraphs)
    return re.sub(r"(^|[.!?]\s+)([a-z])", lambda m: m.group(1) + m.group(2).upper(), text)


def _bench(tmp: Path, out: str, *extra: str) -> dict:
    books = tmp / "books"
    if not books.exists():
        books.mkdir()
        for i in range(5):
            (books / f"book{i}.txt").write_text(_prose(200 + i, 60), encoding="utf-8")
        (books / "heldout.txt").write_text(_prose(999, 120), encoding="utf-8")
    train = sorted(str(p) for p in books.glob("book*.txt"))
    cmd = [sys.executable, "-m", "bench.quality", "--scale", "tiny", "--out", str(tmp / out)]
    cmd += ["--cache", str(tmp / "cache"), "--train", *train]
    cmd += ["--heldout", str(books / "heldout.txt"), *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EFFICIENTLLM_CACHE": str(tmp / "cache")}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((tmp / out / "results.json").read_text())


@pytest.mark.slow
def test_tiny_benchmark_is_token_and_size_matched_and_reproducible(tmp_path) -> None:
    res = _bench(tmp_path, "run1")
    arms, setup = res["arms"], res["setup"]
    assert list(arms) == ["a", "b", "c", "d", "e"]
    budget = setup["budget_params"]
    # equal training tokens: pruning phase + recovery for a, continued pretraining for b/c/d
    assert {a["train_tokens"] for a in arms.values()} == {setup["arm_tokens"]}
    # equal size: at or under the budget, close to it; c copies a's architecture exactly
    for key, a in arms.items():
        assert a["params"] == a["params_counted"], key  # the count the JSON shows is real
        assert 0.95 * budget <= a["params"] <= budget, (key, a["params"], budget)
    assert arms["c"]["shape"] == arms["a"]["shape"]
    assert arms["a"]["pruning_events"] > 0 and arms["e"]["pruning_events"] > 0
    assert arms["b"]["pruning_events"] == 0
    assert arms["b"]["oneshot"]["calibration_tokens"] > 0
    # uniform arm: every layer alike; global arm a/b may differ per layer
    d_layers = arms["d"]["shape"]["layers"]
    assert all(layer == d_layers[0] for layer in d_layers)
    for a in arms.values():
        assert a["curve"][0][0] == 0 and a["curve"][-1][0] == setup["arm_tokens"]
        assert a["mc"]["n"] == setup["mc_items"]
        assert 0.0 <= a["mc"]["acc"] <= 1.0
        assert a["ppl"] > 1.0
    source = res["source_eval"]
    assert source["params_counted"] == setup["source_params"] and source["mc"]["n"] > 0
    assert setup["split"] == {
        "train": ["book0", "book1", "book2", "book3", "book4"],
        "heldout": ["heldout"],
        "by": "book",
    }
    out = tmp_path / "run1"
    for name in ("results.md", "perplexity.html", "perplexity.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "results.md").read_text()
    assert "| a |" in md and "| d |" in md and f"{arms['a']['params']:,}" in md
    # same seed, same numbers (the source model comes from the cache the first run filled);
    # --keep re-runs arm a only and keeps the other arms of run1
    again = _bench(tmp_path, "run1", "--arms", "a", "--keep")
    assert list(again["arms"]) == list(arms)
    assert again["arms"]["d"] == arms["d"]
    assert len(again["setup"]["commands"]) == 2
    assert again["arms"]["a"]["ppl"] == pytest.approx(arms["a"]["ppl"], rel=1e-6)
    first, second = arms["a"]["curve"], again["arms"]["a"]["curve"]
    assert [t for t, _ in second] == [t for t, _ in first]
    assert [p for _, p in second] == pytest.approx([p for _, p in first], rel=1e-6)
    assert again["arms"]["a"]["mc"]["acc"] == arms["a"]["mc"]["acc"]


@pytest.mark.slow
def test_tiny_lever_arms_side_by_side_match_a_single_process_run(tmp_path) -> None:
    """a_best and b_kd (distillation from the source), c after a_best, two processes at once:
    equal tokens and params, teacher FLOPs = 2 x source params x tokens, and arm a_best gives
    the same numbers as when it runs alone in one process."""
    res = _bench(tmp_path, "par", "--arms", "a_best,b_kd,c", "--jobs", "2")
    arms, setup = res["arms"], res["setup"]
    assert list(arms) == ["a_best", "b_kd", "c"] and setup["jobs"] == 2
    assert {a["train_tokens"] for a in arms.values()} == {setup["arm_tokens"]}
    budget = setup["budget_params"]
    for a in arms.values():
        assert budget * 0.99 <= a["params"] <= budget
    n, tokens = setup["source_params"], setup["arm_tokens"]
    assert arms["a_best"]["teacher_flops"] == 2 * n * tokens  # KD in both phases
    assert arms["b_kd"]["teacher_flops"] == 2 * n * tokens  # teacher = the unpruned source
    assert arms["c"]["teacher_flops"] == 0
    assert arms["a_best"]["levers"]["distill"]["weight"] == 0.5
    assert arms["c"]["follows"] == "a_best"
    assert arms["c"]["shape"] == arms["a_best"]["shape"]
    alone = _bench(tmp_path, "alone", "--arms", "a_best", "--jobs", "1")["arms"]["a_best"]
    assert alone["ppl"] == pytest.approx(arms["a_best"]["ppl"], rel=1e-9)
    assert alone["curve"] == arms["a_best"]["curve"]
