"""Draw a run's story from its events.jsonl: per-layer widths (source vs final) and the size,
loss and perplexity over tokens. For the README; the web app draws the live version.

    python bench/plot_run.py runs/cpu-demo/events.jsonl docs/cpu-demo.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(events_path: str, out: str) -> None:
    ev = [json.loads(line) for line in Path(events_path).read_text().splitlines() if line.strip()]
    start = next(e for e in ev if e["type"] == "started")
    final = [e for e in ev if e["type"] in ("pruned", "finished")][-1]["shape"]
    src = start["shape"]
    steps = [e for e in ev if e["type"] == "step"]
    evals = [e for e in ev if e["type"] == "eval"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 7.5))
    n = len(src["layers"])
    x = list(range(n))
    for ax, key, label in (
        (axes[0][0], "intermediate_size", "FFN channels"),
        (axes[0][1], "num_heads", "query heads (KV heads hatched)"),
    ):
        ax.bar(x, [ly[key] for ly in src["layers"]], color="#d9d9d9", label="source")
        ax.bar(x, [ly[key] for ly in final["layers"]], color="#3b7dd8", label="after pruning")
        if key == "num_heads":
            ax.bar(
                x,
                [ly["num_kv_heads"] for ly in final["layers"]],
                color="none",
                edgecolor="#0b2e5e",
                hatch="//",
                label="KV heads",
            )
        ax.set_xlabel("layer")
        ax.set_title(label)
        ax.legend(loc="upper right", fontsize=8)
    axes[0][0].text(
        0.01,
        0.97,
        f"hidden width {src['hidden_size']} -> {final['hidden_size']}",
        transform=axes[0][0].transAxes,
        va="top",
        fontsize=9,
    )
    tok = [s["tokens"] / 1e3 for s in steps]
    ax = axes[1][0]
    ax.plot(tok, [s["params"] / 1e6 for s in steps], label="parameters")
    ax.plot(tok, [s["target_params"] / 1e6 for s in steps], "--", label="target trajectory")
    ax.set_xlabel("training tokens (k)")
    ax.set_ylabel("parameters (M)")
    ax.set_title("size follows the trajectory to the budget")
    ax.legend(fontsize=8)
    ax = axes[1][1]
    ax.plot(tok, [s["loss"] for s in steps], color="#888", label="train loss")
    ax.set_xlabel("training tokens (k)")
    ax.set_ylabel("train loss")
    ax2 = ax.twinx()
    ax2.plot(
        [e["tokens"] / 1e3 for e in evals],
        [e["ppl"] for e in evals],
        "o-",
        color="#c0392b",
        label="held-out perplexity",
    )
    for e in evals:
        ax2.annotate(
            f"{e['ppl']:.0f}",
            (e["tokens"] / 1e3, e["ppl"]),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
            color="#c0392b",
        )
    ax2.set_ylabel("held-out perplexity")
    ax.set_title("loss and held-out perplexity")
    before, after = start["source_params"] / 1e6, steps[-1]["params"] / 1e6
    fig.suptitle(f"{before:.1f}M -> {after:.1f}M parameters, pruning-aware pretraining")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
