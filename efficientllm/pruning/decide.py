"""Which groups to remove next: the saliency ranking turned into a list of groups.

Greedy and exact: while the (simulated) count is above the target, take the candidate with the
lowest normalised saliency S(G)/|G| (loss increase per parameter removed) over all group kinds,
remove it from the simulation and repeat. Costs are recomputed from the shrinking shape.

Candidates per kind, in one layer (``global``) or in every layer together (``uniform``, which
keeps all layers equally wide):
- ``ffn``: the ``ffn_multiple`` least salient channels (fewer when the width is not aligned);
- ``qhead``: the least salient query head of every KV group;
- ``kvgroup``: the least salient KV group together with its query heads;
- ``hidden``: the ``hidden_multiple`` least salient hidden channels (one width for all layers);
- ``layer``: the least salient whole block (only when ``allow_layer_removal``).
A candidate whose removal would land more than ``tolerance`` below the target is skipped in favour
of the next smaller one, so a run ends close to its budget instead of far below it.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field

from efficientllm.errors import BudgetInfeasibleError
from efficientllm.pruning.budget import Granularity, effective_multiple
from efficientllm.pruning.groups import Group, GroupKind, group_cost, shape_after
from efficientllm.shape import ModelShape


@dataclass
class Drops:
    """Everything removed, in the ORIGINAL model's indices: apply with ``prune.apply_drops_``."""

    q: dict[int, set[int]] = field(default_factory=dict)
    kv: dict[int, set[int]] = field(default_factory=dict)
    ffn: dict[int, set[int]] = field(default_factory=dict)
    hidden: set[int] = field(default_factory=set)
    layers: set[int] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(
            self.hidden
            or self.layers
            or any(self.q.values())
            or any(self.kv.values())
            or any(self.ffn.values())
        )


@dataclass(frozen=True)
class Removal:
    """One decision: groups removed together, their summed score and exact cost."""

    kind: GroupKind
    groups: tuple[Group, ...]
    score: float
    cost: int

    @property
    def normalised(self) -> float:
        return self.score / max(self.cost, 1)


class _State:
    """Per-unit scores of the current (simulated) model, indexed by *original* positions."""

    def __init__(self, scores) -> None:
        tolist = lambda t: [float(x) for x in t.detach().cpu().reshape(-1)]  # noqa: E731
        self.q = [tolist(t) for t in scores.q_head]
        self.kv = [tolist(t) for t in scores.kv_head]
        self.ffn = [tolist(t) for t in scores.ffn]
        self.hidden = tolist(scores.hidden)
        self.layer = tolist(scores.layer)
        # alive lists map current index -> original index
        self.q_alive = [list(range(len(x))) for x in self.q]
        self.kv_alive = [list(range(len(x))) for x in self.kv]
        self.ffn_rank = [_Ranked(x) for x in self.ffn]
        self.hidden_rank = _Ranked(self.hidden)
        self.layer_alive = list(range(len(self.layer)))
        self.drops = Drops()


class _Ranked:
    """Units of one width (an FFN or the hidden stream) ranked once by score. Removal always
    takes the lowest alive units, so the ranking is consumed from the front: O(k log n) a pick."""

    def __init__(self, values: list[float]) -> None:
        self.values = values
        self.order = sorted(range(len(values)), key=lambda i: (values[i], i))
        self.ptr = 0
        self.alive = list(range(len(values)))  # original indices, ascending

    def lowest(self, k: int) -> tuple[list[int], float]:
        """Current indices and summed score of the k lowest alive units."""
        picked = self.order[self.ptr : self.ptr + k]
        return sorted(bisect_left(self.alive, o) for o in picked), sum(
            self.values[o] for o in picked
        )

    def remove(self, current: Sequence[int], into: set[int]) -> None:
        originals = [self.alive[i] for i in current]
        assert sorted(originals) == sorted(self.order[self.ptr : self.ptr + len(current)])
        self.ptr += len(current)
        for o in sorted(originals, reverse=True):
            del self.alive[bisect_left(self.alive, o)]
        into.update(originals)


def _layer_candidate(
    st: _State, shape: ModelShape, kind: GroupKind, li: int, orig: int, ffn_multiple: int
) -> tuple[Group, float] | None:
    ly = shape.layers[li]
    if kind == "ffn":
        width = ly.intermediate_size
        mf = effective_multiple(width, ffn_multiple)  # per layer: a narrow one affects only itself
        k = width % mf or mf
        if width - k < 1:
            return None
        idx, score = st.ffn_rank[orig].lowest(k)
        return Group("ffn", li, tuple(idx)), score
    if kind == "qhead":
        g = ly.heads_per_group
        if g < 2:
            return None
        units, score = [], 0.0
        for kv in range(ly.num_kv_heads):
            heads = list(range(kv * g, (kv + 1) * g))
            best = min(heads, key=lambda h: (st.q[orig][st.q_alive[orig][h]], h))
            units.append(best)
            score += st.q[orig][st.q_alive[orig][best]]
        return Group("qhead", li, tuple(units)), score
    if kind == "kvgroup":
        if ly.num_kv_heads < 2:
            return None
        g = ly.heads_per_group

        def kv_score(kv: int) -> float:
            heads = range(kv * g, (kv + 1) * g)
            q = sum(st.q[orig][st.q_alive[orig][h]] for h in heads)
            return st.kv[orig][st.kv_alive[orig][kv]] + q

        best = min(range(ly.num_kv_heads), key=lambda kv: (kv_score(kv), kv))
        return Group("kvgroup", li, (best,)), kv_score(best)
    if kind == "layer":
        if shape.num_layers < 2:
            return None
        return Group("layer", li), st.layer[orig]
    raise ValueError(kind)


def _candidates(
    st: _State,
    shape: ModelShape,
    granularity: Granularity,
    kinds: Sequence[GroupKind],
    mh: int,
    ffn_multiple: int,
) -> list[Removal]:
    out: list[Removal] = []
    for kind in kinds:
        if kind == "hidden":
            k = shape.hidden_size % mh or mh
            if shape.hidden_size - k < 1:
                continue
            idx, score = st.hidden_rank.lowest(k)
            g = Group("hidden", None, tuple(idx))
            out.append(Removal("hidden", (g,), score, group_cost(shape, g)))
            continue
        per_layer = []
        for li, orig in enumerate(st.layer_alive):
            c = _layer_candidate(st, shape, kind, li, orig, ffn_multiple)
            if c is not None:
                per_layer.append(Removal(kind, (c[0],), c[1], group_cost(shape, c[0])))
        if kind == "layer" or granularity == "global":
            out += per_layer
        elif per_layer and len(per_layer) == shape.num_layers:
            out.append(
                Removal(
                    kind,
                    tuple(r.groups[0] for r in per_layer),
                    sum(r.score for r in per_layer),
                    sum(r.cost for r in per_layer),
                )
            )
    return out


def _pop(alive: list[int], indices, into: set[int]) -> None:
    for i in sorted(indices, reverse=True):
        into.add(alive.pop(i))


def _apply(st: _State, shape: ModelShape, removal: Removal) -> ModelShape:
    d = st.drops
    for g in removal.groups:
        if g.kind == "hidden":
            st.hidden_rank.remove(g.units, d.hidden)
        else:
            assert g.layer is not None  # validated: every other kind names its layer
            orig = st.layer_alive[g.layer]
            ly = shape.layers[g.layer]
            if g.kind == "ffn":
                st.ffn_rank[orig].remove(g.units, d.ffn.setdefault(orig, set()))
            elif g.kind == "qhead":
                _pop(st.q_alive[orig], g.units, d.q.setdefault(orig, set()))
            elif g.kind == "kvgroup":
                kv, gsize = g.units[0], ly.heads_per_group
                heads = range(kv * gsize, (kv + 1) * gsize)
                _pop(st.q_alive[orig], heads, d.q.setdefault(orig, set()))
                _pop(st.kv_alive[orig], [kv], d.kv.setdefault(orig, set()))
            elif g.kind == "layer":
                _pop(st.layer_alive, [g.layer], d.layers)
        shape = shape_after(shape, g)
    return shape


def decide(
    scores,
    shape: ModelShape,
    target: int,
    *,
    granularity: Granularity = "global",
    kinds: Sequence[GroupKind] = ("qhead", "kvgroup", "ffn", "hidden"),
    hidden_multiple: int = 8,
    ffn_multiple: int = 8,
    tolerance: float = 0.005,
    max_steps: int = 1_000_000,
) -> Decision:
    """The removals that bring ``shape`` to at most ``target`` parameters. ``scores`` is a
    ``saliency.UnitScores`` of the model with this shape."""
    st = _State(scores)
    mh = effective_multiple(shape.hidden_size, hidden_multiple)
    removals: list[Removal] = []
    for _ in range(max_steps):
        count = shape.num_params()
        if count <= target:
            return Decision(removals=removals, drops=st.drops, shape=shape)
        cands = sorted(
            _candidates(st, shape, granularity, kinds, mh, ffn_multiple),
            key=lambda r: (r.normalised, r.cost),
        )
        if not cands:
            raise BudgetInfeasibleError(
                f"nothing left to remove at {count:,} parameters; target {target:,} is below "
                "the smallest legal shape for these group kinds"
            )
        floor = target * (1 - tolerance)
        fitting = [r for r in cands if count - r.cost >= floor]
        choice = fitting[0] if fitting else min(cands, key=lambda r: (r.cost, r.normalised))
        removals.append(choice)
        shape = _apply(st, shape, choice)
    raise RuntimeError("decide() did not converge")  # pragma: no cover


@dataclass(frozen=True)
class Decision:
    """What ``decide`` chose: the removals in order (indices of each refer to the model after
    the previous ones), all of them as ``drops`` in the original indices, and the new shape."""

    removals: list[Removal]
    drops: Drops
    shape: ModelShape

    def summary(self) -> dict[str, int]:
        """Units removed per kind, e.g. {"ffn": 480, "hidden": 64}."""
        out: dict[str, int] = {}
        for r in self.removals:
            n = sum(max(len(g.units), 1) if g.kind in ("ffn", "hidden") else 1 for g in r.groups)
            out[r.kind] = out.get(r.kind, 0) + n
        return out
