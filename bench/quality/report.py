"""results.json, results.md, perplexity.html (Plotly) and perplexity.png for a benchmark run.

``python -m bench.quality.report DIR`` renders the Markdown and figures again from
``DIR/results.json`` (e.g. after a change to the report itself; the numbers are not touched).
"""

from __future__ import annotations

import json
from pathlib import Path

COLORS = {
    "a": "#d62728",
    "a_best": "#9400d3",
    "a_kd": "#e377c2",
    "a_cont": "#bcbd22",
    "a_cubic": "#8c564b",
    "a_ema": "#17becf",
    "a_nokd": "#ff9896",
    "b": "#1f77b4",
    "b_kd": "#00008b",
    "c": "#7f7f7f",
    "d": "#2ca02c",
    "e": "#ff7f0e",
}


def _flops(x: int | None) -> str:
    return f"{x:.2e}" if x else "–"


def markdown(res: dict) -> str:
    s, arms = res["setup"], res["arms"]
    lines = [
        f"### Quality benchmark, scale `{s['scale']}`",
        "",
        "Command: " + " then ".join(f"`{c}`" for c in s.get("commands", [s["command"]])) + "  ",
        f"Machine: {s['machine']}  ",
        f"Source: {s['source_desc']} ({s['source_params']:,} params); budget {s['budget']} "
        f"-> {s['budget_params']:,} params  ",
        f"Data: train = {', '.join(s['split']['train'])}; held-out = "
        f"{', '.join(s['split']['heldout'])} (split by book)  ",
        f"Every arm: {s['arm_tokens']:,} training tokens (pruning + recovery counted together), "
        f"batch {s['batch_size']}x{s['block_len']}, peak LR {s['lr']}, seed {s['seed']}  ",
        f"Perplexity: {s['ppl_protocol']}; multiple choice: lm-eval {s['lm_eval_version']}, "
        f"offline `next_sentence` task ({s['mc_items']} items from the held-out book, "
        "true next sentence among 4, 0-shot, chance 25%)",
        "",
        "| arm | method | params | train tokens | calib. tokens | held-out ppl | acc | acc_norm "
        "| teacher FLOPs | wall time |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    src = res.get("source_eval")
    if src:
        mc = src["mc"]
        lines.append(
            f"| source | before pruning (reference) | {s['source_params']:,} | – | – | "
            f"{src['ppl']:.2f} | {mc['acc']:.3f} ± {mc['acc_stderr']:.3f} | "
            f"{mc['acc_norm']:.3f} | – | – |"
        )
    for key, a in arms.items():
        mc = a["mc"]
        lines.append(
            f"| {key} | {a['method']} | {a['params']:,} | {a['train_tokens']:,} | "
            f"{a.get('oneshot', {}).get('calibration_tokens', 0):,} | "
            f"{a['ppl']:.2f} | {mc['acc']:.3f} ± {mc['acc_stderr']:.3f} | "
            f"{mc['acc_norm']:.3f} | {_flops(a.get('teacher_flops'))} | "
            f"{a['seconds'] / 60:.1f} min |"
        )
    lines += ["", "Final shapes:", ""]
    for key, a in arms.items():
        lines.append(f"- {key}: {a['shape_summary']}")
    if s.get("source_meta"):
        m = s["source_meta"]
        lines += [
            "",
            f"Source pretraining (cached; not part of the arms): {m['tokenizer']}; "
            f"{m['params']:,} params, {m['tokens']:,} tokens, LR {m['lr']}, "
            f"{m['seconds'] / 60:.1f} min.",
        ]
    lines += ["", f"Total wall time: {res['seconds'] / 60:.1f} min.", ""]
    return "\n".join(lines)


def figure(res: dict):
    import plotly.graph_objects as go

    fig = go.Figure()
    for key, a in res["arms"].items():
        xs = [t for t, _ in a["curve"]]
        ys = [p for _, p in a["curve"]]
        fig.add_trace(
            go.Scatter(
                x=xs,
                y=ys,
                mode="lines+markers",
                name=f"{key}: {a['method']}",
                line={"color": COLORS.get(key)},
            )
        )
    fig.update_layout(
        title=f"Held-out perplexity vs training tokens (scale {res['setup']['scale']})",
        xaxis_title="training tokens (pruning + recovery)",
        yaxis_title="held-out perplexity (log)",
        yaxis_type="log",
        template="plotly_white",
        legend={"orientation": "h", "y": -0.2},
    )
    return fig


def png(res: dict, path: Path) -> None:
    """The same curves as a static image (matplotlib; Plotly's image export needs Chrome): all
    arms on the left, the right panel zoomed to the pruned arms (from-scratch c starts far up)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 5.5), dpi=120)
    # the zoom: the arms that end within 2x of the best, over the last 60% of the tokens
    # (one-shot arms start far up; far-off arms such as c would flatten the rest)
    end = max((t for a in res["arms"].values() for t, _ in a["curve"]), default=0)
    best = min((a["curve"][-1][1] for a in res["arms"].values() if a["curve"]), default=0)
    near = [a for a in res["arms"].values() if a["curve"] and a["curve"][-1][1] <= 2 * best]
    pruned = [p for a in near for t, p in a["curve"] if t >= 0.4 * end]
    for ax, zoom in zip(axes, (False, True), strict=True):
        for key, a in res["arms"].items():
            xs = [t for t, _ in a["curve"]]
            ys = [p for _, p in a["curve"]]
            label = f"{key}: {a['method']}"
            ax.plot(xs, ys, marker="o", ms=3, color=COLORS.get(key), label=label)
        ax.set_yscale("log")
        ax.set_xlabel("training tokens (pruning + recovery)")
        ax.grid(alpha=0.3, which="both")
        if zoom and pruned:
            ax.set_ylim(min(pruned) * 0.97, max(pruned) * 1.03)
            ax.set_xlim(0.4 * end * 0.95, end * 1.02)
            ax.set_title("zoom: arms within 2x of the best, last 60% of tokens")
        else:
            ax.set_ylabel("held-out perplexity (log)")
            ax.set_title(f"Held-out perplexity vs training tokens (scale {res['setup']['scale']})")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05 + 0.035 * ((len(labels) + 1) // 2), 1, 1))
    fig.savefig(path)
    plt.close(fig)


def scrub(res: dict, replacements: dict[str, str]) -> dict:
    """The results with machine-specific path prefixes replaced (they go into commits)."""
    text = json.dumps(res)
    for prefix, label in sorted(replacements.items(), key=lambda kv: -len(kv[0])):
        text = text.replace(json.dumps(prefix)[1:-1], label)
    return json.loads(text)


def write(res: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "json": out / "results.json",
        "md": out / "results.md",
        "html": out / "perplexity.html",
        "png": out / "perplexity.png",
    }
    paths["json"].write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    paths["md"].write_text(markdown(res), encoding="utf-8")
    figure(res).write_html(paths["html"], include_plotlyjs="cdn")
    png(res, paths["png"])
    return paths


def rerender(out: Path) -> dict[str, Path]:
    """Write the files of ``out`` again from its ``results.json`` (arm names filled from keys)."""
    res = json.loads((out / "results.json").read_text(encoding="utf-8"))
    for key, arm in res["arms"].items():
        arm.setdefault("name", key)
    return write(res, out)


if __name__ == "__main__":
    import sys

    for arg in sys.argv[1:]:
        print(", ".join(str(p) for p in rerender(Path(arg)).values()))
