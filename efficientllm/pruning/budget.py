"""Budgets: parse them, check they are reachable, and plan a shape for one (no torch needed).

``plan`` turns (source shape, budget, granularity, rounding multiples) into a predicted shape whose
exact count is at most the budget and, where the rounding allows, within ``tolerance`` of it.
The shape the trainer actually reaches is chosen by saliency (see ``decide.py``); the plan is
what the UI and CLI show before a run, and the uniform shape the baselines use.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from efficientllm.choices import Granularity
from efficientllm.errors import BudgetInfeasibleError, ConfigError
from efficientllm.shape import LayerShape, ModelShape

DEFAULT_TOLERANCE = 0.005

_SUFFIX = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
_BUDGET_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmbg%]?)\s*$", re.I)


def parse_budget(text: str | int | float, source_params: int | None = None) -> int:
    """``67M``, ``0.5B``, ``67000000``, ``1.2e8`` or a ratio of the source like ``50%``."""
    if isinstance(text, bool):
        raise ConfigError(f"budget {text!r} is not a number")
    if isinstance(text, int | float):
        text = repr(text)
    m = _BUDGET_RE.match(text)
    if not m:
        raise ConfigError(
            f"budget {text!r} is not understood; write e.g. 67M, 0.5B, 67000000 or 50%"
        )
    value, suffix = float(m.group(1)), m.group(2).lower()
    if suffix == "%":
        if source_params is None:
            raise ConfigError(f"budget {text!r} is a ratio, but the source size is unknown")
        if not 0 < value < 100:
            raise ConfigError(f"budget ratio {text!r} must be between 0% and 100%")
        return int(source_params * value / 100)
    n = int(value * _SUFFIX[suffix])
    if n <= 0 or not math.isfinite(value):
        raise ConfigError(f"budget {text!r} must be a positive parameter count")
    return n


def format_params(n: int) -> str:
    """134515008 -> '134.52M'."""
    for unit, scale in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def _round_to(x: float, multiple: int, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, multiple * round(x / multiple))))


def effective_multiple(width: int, multiple: int) -> int:
    """The rounding multiple actually used for a width (1 when the width is smaller)."""
    return multiple if width >= 2 * multiple else 1


def smallest_shape(
    shape: ModelShape,
    *,
    hidden_multiple: int = 8,
    ffn_multiple: int = 8,
    allow_layer_removal: bool = False,
) -> ModelShape:
    """The smallest legal shape: one KV group with one query head, the minimal FFN and hidden
    widths in every layer (and one layer when layers may be removed)."""
    mh = effective_multiple(shape.hidden_size, hidden_multiple)
    mf = min(effective_multiple(ly.intermediate_size, ffn_multiple) for ly in shape.layers)
    n_layers = 1 if allow_layer_removal else shape.num_layers
    layer = LayerShape(num_heads=1, num_kv_heads=1, intermediate_size=mf)
    return shape.with_layers([layer] * n_layers).with_hidden(mh)


def check_budget(shape: ModelShape, budget: int, **multiples) -> None:
    """Raise ``BudgetInfeasibleError`` unless smallest shape <= budget < source."""
    source, low = shape.num_params(), smallest_shape(shape, **multiples).num_params()
    reach = (
        f"reachable budgets for this model: {format_params(low)} ({low:,}) "
        f"up to {format_params(source - 1)} ({source - 1:,})"
    )
    if budget >= source:
        raise BudgetInfeasibleError(
            f"budget {budget:,} is not below the source model's {source:,} parameters; {reach}",
            reachable=(low, source - 1),
        )
    if budget < low:
        raise BudgetInfeasibleError(
            f"budget {budget:,} is below the smallest legal shape ({low:,}); {reach}",
            reachable=(low, source - 1),
        )


@dataclass(frozen=True, kw_only=True)
class Plan:
    """A predicted shape for a budget."""

    source: ModelShape
    shape: ModelShape
    budget: int
    granularity: Granularity
    tolerance: float
    notes: list[str] = field(default_factory=list)

    @property
    def num_params(self) -> int:
        return self.shape.num_params()

    @property
    def gap(self) -> float:
        """(budget - count) / budget: how far below the budget the plan lands (>= 0)."""
        return (self.budget - self.num_params) / self.budget

    def to_dict(self) -> dict:
        return {
            "source_params": self.source.num_params(),
            "budget": self.budget,
            "num_params": self.num_params,
            "gap": self.gap,
            "within_tolerance": self.gap <= self.tolerance,
            "granularity": self.granularity,
            "source": self.source.to_dict(),
            "shape": self.shape.to_dict(),
            "notes": self.notes,
        }


def _heads_for(ly: LayerShape, r: float) -> tuple[int, int]:
    """(heads, kv) closest to ``r`` of the source heads, with balanced KV/query shrinking."""
    best = None
    for kv in range(1, ly.num_kv_heads + 1):
        for g in range(1, ly.heads_per_group + 1):
            err = (
                abs(kv * g - r * ly.num_heads),
                -kv,
                abs(kv / ly.num_kv_heads - g / ly.heads_per_group),
            )
            if best is None or err < best[0]:
                best = (err, kv * g, kv)
    assert best is not None
    return best[1], best[2]


def _fill_ffn(
    shape: ModelShape, d: int, heads: int, kv: int, budget: int, mf: int, max_ffn: int
) -> ModelShape | None:
    """The largest uniform FFN width (a multiple of ``mf``) that keeps the count <= budget."""

    def build(ffn: int) -> ModelShape:
        ly = LayerShape(num_heads=heads, num_kv_heads=kv, intermediate_size=ffn)
        return shape.with_hidden(d).with_layers([ly] * shape.num_layers)

    lo_shape = build(mf)
    if lo_shape.num_params() > budget:
        return None
    per_channel = build(mf + 1).num_params() - lo_shape.num_params()  # one channel, all layers
    room = budget - lo_shape.num_params()
    ffn = min(max_ffn, mf + (room // (per_channel * mf)) * mf)
    return build(ffn)


def plan(
    source: ModelShape,
    budget: int,
    *,
    granularity: Granularity = "uniform",
    hidden_multiple: int = 8,
    ffn_multiple: int = 8,
    tolerance: float = DEFAULT_TOLERANCE,
) -> Plan:
    """Predict a shape of at most ``budget`` parameters (see module docstring).

    Every width shrinks by about the same ratio r (hidden, heads, FFN), rounded to the multiples;
    r is the largest ratio that fits, then the FFN width is filled up to the budget. With
    ``granularity="global"`` the leftover is spent on single FFN blocks in some layers, so the
    count lands closer to the budget (per-layer widths may then differ by one multiple).
    Among equally close candidates the one whose hidden width divides by the head count wins
    (such a uniform shape can be exported as the vanilla family class)."""
    check_budget(source, budget, hidden_multiple=hidden_multiple, ffn_multiple=ffn_multiple)
    ly0 = source.layers[0]
    mh = effective_multiple(source.hidden_size, hidden_multiple)
    mf = effective_multiple(ly0.intermediate_size, ffn_multiple)
    candidates: list[tuple[tuple, ModelShape]] = []
    seen: set[tuple[int, int, int]] = set()
    for step in range(1000, 0, -1):
        r = step / 1000
        d = _round_to(source.hidden_size * r, mh, mh, source.hidden_size)
        heads, kv = _heads_for(ly0, r)
        if (d, heads, kv) in seen:
            continue
        seen.add((d, heads, kv))
        cand = _fill_ffn(source, d, heads, kv, budget, mf, ly0.intermediate_size)
        if cand is None:
            continue
        gap = (budget - cand.num_params()) / budget
        ffn_r = cand.layers[0].intermediate_size / ly0.intermediate_size
        balance = abs(ffn_r - d / source.hidden_size) + abs(
            heads / ly0.num_heads - d / source.hidden_size
        )
        vanilla = d % heads == 0
        key = (gap > tolerance, 0 if vanilla else 1, round(balance, 2), gap)
        candidates.append((key, cand))
    if not candidates:  # pragma: no cover - check_budget guarantees the smallest shape fits
        raise BudgetInfeasibleError(f"no shape fits {budget:,} parameters")
    candidates.sort(key=lambda kc: kc[0])
    best = candidates[0][1]
    notes = []
    if granularity == "global":
        best = _spread_leftover(best, budget, mf, ly0.intermediate_size)
        notes.append(
            "global: the trainer chooses per-layer widths by saliency; this plan shows "
            "a reference shape with the same count"
        )
    result = Plan(
        source=source,
        shape=best,
        budget=budget,
        granularity=granularity,
        tolerance=tolerance,
        notes=notes,
    )
    if result.gap > tolerance:
        notes.append(
            f"rounding to multiples of {mh}/{mf} leaves the count {result.gap:.2%} "
            f"below the budget (tolerance {tolerance:.2%}); use smaller multiples"
        )
    return result


def _spread_leftover(shape: ModelShape, budget: int, mf: int, max_ffn: int) -> ModelShape:
    layers = list(shape.layers)
    for i in range(len(layers)):
        ly = layers[i]
        if ly.intermediate_size + mf > max_ffn:
            continue
        bigger = LayerShape(
            num_heads=ly.num_heads,
            num_kv_heads=ly.num_kv_heads,
            intermediate_size=ly.intermediate_size + mf,
        )
        trial = shape.with_layers(layers[:i] + [bigger] + layers[i + 1 :])
        if trial.num_params() > budget:
            break
        layers[i] = bigger
    return shape.with_layers(layers)
