"""Pure Plotly figure builders: plain dicts and lists in, ``go.Figure`` out (no DB, no Gradio).

Shapes are ``ModelShape.to_dict()`` dicts: ``{"hidden_size", "head_dim", "vocab_size",
"layers": [{"num_heads", "num_kv_heads", "intermediate_size"}, ...]}``. Metric points are
``{"tokens", "loss", "params", "target_params"}``; evals ``{"tokens", "ppl", "label"}``;
pruning events ``{"tokens", "shape", "saliency": {kind: mean normalised saliency}}`` (kinds as
in ``efficientllm.curves``; older events' ``head`` is read as ``qhead``).
"""

from __future__ import annotations

from typing import Any

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from efficientllm.choices import GROUP_KINDS as KINDS
from efficientllm.curves import saliency_curves

Shape = dict[str, Any]
WIDTHS = (
    ("num_heads", "query heads"),
    ("num_kv_heads", "KV heads"),
    ("intermediate_size", "FFN width"),
)
SOURCE_COLOR = "rgba(150,150,150,0.45)"
COLORS = {"qhead": "#1f77b4", "kvgroup": "#ff7f0e", "ffn": "#2ca02c", "hidden": "#d62728"}
COLORS["layer"] = "#9467bd"


def params_text(n: int | None) -> str:
    """134515008 -> '134.52M' (None -> '?')."""
    if n is None:
        return "?"
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def shape_summary(shape: Shape, source: Shape | None = None) -> str:
    """'hidden 512 of 576 · 30 of 30 layers' (or without the source)."""
    d, n = shape.get("hidden_size", 0), len(shape.get("layers", []))
    if source is None:
        return f"hidden {d} · {n} layers"
    return f"hidden {d} of {source['hidden_size']} · {n} of {len(source['layers'])} layers"


def arch_figure(
    shape: Shape, source: Shape | None = None, *, title: str = "", params: int | None = None
) -> go.Figure:
    """Per-layer query heads, KV heads and FFN width (bars) against the source (grey bars)."""
    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        subplot_titles=[label for _, label in WIDTHS],
    )
    layers = shape.get("layers", [])
    for row, (key, label) in enumerate(WIDTHS, start=1):
        if source is not None:
            src = source.get("layers", [])
            fig.add_trace(
                go.Bar(
                    name=f"source {label}",
                    x=list(range(len(src))),
                    y=[ly[key] for ly in src],
                    marker_color=SOURCE_COLOR,
                    showlegend=row == 1,
                    legendgroup="source",
                ),
                row=row,
                col=1,
            )
        fig.add_trace(
            go.Bar(name=label, x=list(range(len(layers))), y=[ly[key] for ly in layers]),
            row=row,
            col=1,
        )
    head = title or "architecture"
    count = f" · {params_text(params)} params" if params is not None else ""
    fig.update_layout(
        title=f"{head} · {shape_summary(shape, source)}{count}",
        barmode="group",
        bargap=0.15,
        height=520,
        margin={"l": 50, "r": 20, "t": 80, "b": 40},
        legend={"orientation": "h", "y": -0.08},
    )
    fig.update_xaxes(title_text="layer", row=3, col=1)
    return fig


def params_figure(points: list[dict[str, Any]]) -> go.Figure:
    """Parameters and the target trajectory over training tokens."""
    fig = go.Figure()
    x = [p["tokens"] for p in points]
    fig.add_trace(go.Scatter(name="parameters", x=x, y=[p.get("params") for p in points]))
    fig.add_trace(
        go.Scatter(
            name="target",
            x=x,
            y=[p.get("target_params") for p in points],
            line={"dash": "dash"},
        )
    )
    fig.update_layout(title="parameters vs target", xaxis_title="tokens", height=320)
    return fig


def loss_figure(points: list[dict[str, Any]], evals: list[dict[str, Any]]) -> go.Figure:
    """Training loss (left axis) and validation perplexity (right axis) over tokens."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(
        go.Scatter(
            name="training loss",
            x=[p["tokens"] for p in points],
            y=[p.get("loss") for p in points],
        ),
        secondary_y=False,
    )
    fig.add_trace(
        go.Scatter(
            name="validation perplexity",
            x=[e["tokens"] for e in evals],
            y=[e.get("ppl") for e in evals],
            mode="lines+markers",
            text=[e.get("label", "") for e in evals],
        ),
        secondary_y=True,
    )
    fig.update_layout(title="loss and perplexity", xaxis_title="tokens", height=320)
    fig.update_yaxes(title_text="loss", secondary_y=False)
    fig.update_yaxes(title_text="perplexity", secondary_y=True)
    return fig


def pruned_fractions(shape: Shape, source: Shape) -> dict[str, float]:
    """Share of each group kind removed so far (units, summed over layers)."""

    def total(s: Shape, key: str) -> int:
        return sum(ly[key] for ly in s["layers"])

    def frac(now: float, was: float) -> float:
        return 1.0 - now / was if was else 0.0

    return {
        "qhead": frac(total(shape, "num_heads"), total(source, "num_heads")),
        "kvgroup": frac(total(shape, "num_kv_heads"), total(source, "num_kv_heads")),
        "ffn": frac(total(shape, "intermediate_size"), total(source, "intermediate_size")),
        "hidden": frac(shape["hidden_size"], source["hidden_size"]),
        "layer": frac(len(shape["layers"]), len(source["layers"])),
    }


def saliency_figure(events: list[dict[str, Any]], source: Shape | None) -> go.Figure:
    """Pruned fraction (top) and mean normalised saliency (bottom) per group kind over tokens."""
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.1,
        subplot_titles=["pruned fraction", "mean normalised saliency"],
    )
    x = [e["tokens"] for e in events]
    fracs = [pruned_fractions(e["shape"], source) for e in events] if source else []
    curves = [saliency_curves(e.get("saliency")) for e in events]
    for kind in KINDS:
        color = {"color": COLORS[kind]}
        if fracs:
            fig.add_trace(
                go.Scatter(
                    name=kind, x=x, y=[f[kind] for f in fracs], line=color, legendgroup=kind
                ),
                row=1,
                col=1,
            )
        sal = [c.get(kind) for c in curves]
        if any(v is not None for v in sal):
            fig.add_trace(
                go.Scatter(
                    name=f"{kind} saliency",
                    x=x,
                    y=sal,
                    line=color,
                    legendgroup=kind,
                    showlegend=not fracs,
                ),
                row=2,
                col=1,
            )
    fig.update_layout(title="what gets pruned", height=420)
    fig.update_xaxes(title_text="tokens", row=2, col=1)
    return fig


def compare_figure(a: Shape, b: Shape, *, names: tuple[str, str] = ("A", "B")) -> go.Figure:
    """Two architectures side by side: per-layer widths of both as grouped bars."""
    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        subplot_titles=[label for _, label in WIDTHS],
    )
    for i, (shape, name) in enumerate(((a, names[0]), (b, names[1]))):
        layers = shape.get("layers", [])
        for row, (key, _label) in enumerate(WIDTHS, start=1):
            fig.add_trace(
                go.Bar(
                    name=name,
                    x=list(range(len(layers))),
                    y=[ly[key] for ly in layers],
                    legendgroup=name,
                    showlegend=row == 1,
                    marker_color=("#1f77b4", "#ff7f0e")[i],
                ),
                row=row,
                col=1,
            )
    fig.update_layout(
        title=f"{names[0]}: {shape_summary(a)}  vs  {names[1]}: {shape_summary(b)}",
        barmode="group",
        height=520,
    )
    fig.update_xaxes(title_text="layer", row=3, col=1)
    return fig


def shape_rows(shape: Shape, source: Shape | None = None) -> list[list[Any]]:
    """Table rows: layer, query heads, KV heads, FFN width (each 'now / source' when known)."""
    rows = []
    src_layers = (source or {}).get("layers", [])
    for i, ly in enumerate(shape.get("layers", [])):
        row: list[Any] = [i]
        for key, _ in WIDTHS:
            src = src_layers[i][key] if i < len(src_layers) else None
            row.append(f"{ly[key]} / {src}" if src is not None else str(ly[key]))
        rows.append(row)
    return rows
