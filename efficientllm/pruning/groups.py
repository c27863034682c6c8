"""Minimal parameter groups: the smallest sets of slices that can be removed together.

A group names *what* goes (kind, layer, unit indices in the current model); ``coupled_slices``
lists every parameter slice it couples, ``group_cost`` its exact parameter count, and
``shape_after`` the shape once it is removed. See method.md, "Minimal parameter groups".

Kinds (GQA-correct; head_dim never changes):
- ``qhead``: one query head from *every* KV group of a layer (``units`` = one head index per KV
  group, in KV-group order), so each group keeps the same number of query heads.
- ``kvgroup``: one KV head with all the query heads that read it (``units`` = (kv index,)).
- ``ffn``: FFN channels of a layer (rows of gate/up, columns of down).
- ``hidden``: hidden (stem) channels: embedding and lm_head columns, every RMSNorm entry, the input
  columns of q/k/v/gate/up and the output rows of o/down in every layer.
- ``layer``: a whole decoder block (optional; the paper never drops layers).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from efficientllm.choices import GroupKind
from efficientllm.shape import LayerShape, ModelShape


@dataclass(frozen=True)
class Group:
    """A removable unit. Indices refer to the model as it is *before* the removal."""

    kind: GroupKind
    layer: int | None
    units: tuple[int, ...] = ()

    def __str__(self) -> str:
        where = "" if self.layer is None else f" L{self.layer}"
        return f"{self.kind}{where} {list(self.units)}"


@dataclass(frozen=True)
class Slice:
    """``param`` (a name in ``model.named_parameters()``) restricted to ``index`` along ``dim``."""

    param: str
    dim: int
    index: tuple[int, ...]


Unit = Literal["q", "kv", "ffn"]

PROJECTIONS: dict[str, tuple[Unit, int]] = {
    "self_attn.q_proj": ("q", 0),
    "self_attn.k_proj": ("kv", 0),
    "self_attn.v_proj": ("kv", 0),
    "self_attn.o_proj": ("q", 1),
    "mlp.gate_proj": ("ffn", 0),
    "mlp.up_proj": ("ffn", 0),
    "mlp.down_proj": ("ffn", 1),
}
"""The one table of which slices a group touches: each linear of a decoder block -> (the unit
whose slices it carries, the weight dim that indexes that unit). Query heads (``q``) and KV heads
(``kv``) are ``head_dim`` consecutive features each. The other dim of every projection is the
hidden width; a bias (dim 0 only) goes with whichever of the two its dim 0 is. ``coupled_slices``,
physical removal (``prune``), saliency and compensation all read this table."""


def hidden_dim(projection: str) -> int:
    """The weight dim of ``projection`` that is the model's hidden width."""
    return 1 - PROJECTIONS[projection][1]


def unit_projections(unit: Unit, dim: int | None = None) -> list[str]:
    """The projections carrying ``unit`` (those indexing it along ``dim`` only, if given)."""
    return [n for n, (u, d) in PROJECTIONS.items() if u == unit and dim in (None, d)]


def consumer(unit: Unit) -> str:
    """The projection that reads ``unit`` as its input (o_proj for query heads, down_proj for
    FFN channels): the layer that OBS compensation updates when the unit goes."""
    (name,) = unit_projections(unit, dim=1)
    return name


def hidden_readers() -> dict[str, list[str]]:
    """The projections reading the hidden state, grouped by the module whose input they share
    (``self_attn``: q/k/v, ``mlp``: gate/up)."""
    out: dict[str, list[str]] = {}
    for name in PROJECTIONS:
        if hidden_dim(name) == 1:
            out.setdefault(name.partition(".")[0], []).append(name)
    return out


def head_rows(heads: tuple[int, ...] | list[int], head_dim: int) -> tuple[int, ...]:
    """Row indices of the given heads in a [heads*head_dim, ...] projection."""
    return tuple(h * head_dim + i for h in heads for i in range(head_dim))


def query_heads_of(kv: int, ly: LayerShape) -> tuple[int, ...]:
    """The query heads that read KV head ``kv`` (HF's repeat_kv: head h uses kv h // G)."""
    g = ly.heads_per_group
    return tuple(range(kv * g, (kv + 1) * g))


def validate_group(shape: ModelShape, group: Group) -> None:
    """Raise ``ValueError`` if ``group`` is not a legal minimal group of ``shape``."""
    if group.kind == "hidden":
        if not group.units or max(group.units) >= shape.hidden_size or min(group.units) < 0:
            raise ValueError(f"{group}: hidden channels out of range 0..{shape.hidden_size - 1}")
        if len(set(group.units)) >= shape.hidden_size:
            raise ValueError(f"{group}: would remove every hidden channel")
        return
    if group.layer is None or not 0 <= group.layer < shape.num_layers:
        raise ValueError(f"{group}: layer out of range 0..{shape.num_layers - 1}")
    ly = shape.layers[group.layer]
    if group.kind == "layer":
        if shape.num_layers < 2:
            raise ValueError(f"{group}: cannot remove the last layer")
    elif group.kind == "ffn":
        if not group.units or max(group.units) >= ly.intermediate_size or min(group.units) < 0:
            raise ValueError(f"{group}: FFN channels out of range")
        if len(set(group.units)) >= ly.intermediate_size:
            raise ValueError(f"{group}: would remove every FFN channel")
    elif group.kind == "kvgroup":
        if len(group.units) != 1 or not 0 <= group.units[0] < ly.num_kv_heads:
            raise ValueError(f"{group}: needs exactly one KV head index")
        if ly.num_kv_heads < 2:
            raise ValueError(f"{group}: cannot remove the last KV group")
    elif group.kind == "qhead":
        if len(group.units) != ly.num_kv_heads:
            raise ValueError(f"{group}: needs one query head per KV group ({ly.num_kv_heads})")
        for kv, h in enumerate(group.units):
            if h not in query_heads_of(kv, ly):
                raise ValueError(f"{group}: head {h} is not in KV group {kv}")
        if ly.heads_per_group < 2:
            raise ValueError(f"{group}: each KV group has one query head left")
    else:  # pragma: no cover - Literal guards this
        raise ValueError(f"unknown group kind {group.kind!r}")


def shape_after(shape: ModelShape, group: Group) -> ModelShape:
    """The shape once ``group`` is removed (``group`` must be valid)."""
    if group.kind == "hidden":
        return shape.with_hidden(shape.hidden_size - len(set(group.units)))
    assert group.layer is not None
    layers = list(shape.layers)
    ly = layers[group.layer]
    if group.kind == "layer":
        del layers[group.layer]
    elif group.kind == "ffn":
        layers[group.layer] = LayerShape(
            num_heads=ly.num_heads,
            num_kv_heads=ly.num_kv_heads,
            intermediate_size=ly.intermediate_size - len(set(group.units)),
        )
    elif group.kind == "kvgroup":
        layers[group.layer] = LayerShape(
            num_heads=ly.num_heads - ly.heads_per_group,
            num_kv_heads=ly.num_kv_heads - 1,
            intermediate_size=ly.intermediate_size,
        )
    elif group.kind == "qhead":
        layers[group.layer] = LayerShape(
            num_heads=ly.num_heads - ly.num_kv_heads,
            num_kv_heads=ly.num_kv_heads,
            intermediate_size=ly.intermediate_size,
        )
    return shape.with_layers(layers)


def unit_cost(shape: ModelShape, kind: GroupKind, layer: int | None = None) -> int:
    """Exact parameters freed by removing ONE unit of ``kind`` (one FFN channel, one hidden
    channel, one qhead group, one KV group, one layer) from ``shape``. Analytic, O(layers)."""
    d, hd = shape.hidden_size, shape.head_dim
    if kind == "hidden":
        n = shape.vocab_size * (1 if shape.tie_word_embeddings else 2) + 1
        for ly in shape.layers:
            n += 2 + 2 * ly.num_heads * hd + 2 * ly.num_kv_heads * hd + 3 * ly.intermediate_size
            n += int(shape.o_bias) + int(shape.mlp_bias)
        return n
    assert layer is not None
    ly = shape.layers[layer]
    per_qhead = 2 * hd * d + hd * int(shape.qkv_bias)  # q rows (+bias) + o columns
    if kind == "ffn":
        return 3 * d + 2 * int(shape.mlp_bias)
    if kind == "qhead":
        return ly.num_kv_heads * per_qhead
    if kind == "kvgroup":
        return 2 * hd * d + 2 * hd * int(shape.qkv_bias) + ly.heads_per_group * per_qhead
    if kind == "layer":
        return shape.layer_params(layer)
    raise ValueError(f"unknown group kind {kind!r}")


def group_cost(shape: ModelShape, group: Group) -> int:
    """Exact parameter count removed with ``group``."""
    n = len(set(group.units)) if group.kind in ("ffn", "hidden") else 1
    return n * unit_cost(shape, group.kind, group.layer)


def coupled_slices(shape: ModelShape, group: Group) -> list[Slice]:
    """Every parameter slice that ``group`` couples (names as in ``model.named_parameters()`` of
    the family/heterogeneous model; with tied embeddings lm_head is the embedding itself)."""
    validate_group(shape, group)
    u = tuple(sorted(set(group.units)))
    if group.kind == "hidden":
        out = [Slice("model.embed_tokens.weight", 1, u), Slice("model.norm.weight", 0, u)]
        if not shape.tie_word_embeddings:
            out.append(Slice("lm_head.weight", 1, u))
        for i in range(shape.num_layers):
            p = f"model.layers.{i}."
            out += [
                Slice(p + n, 0, u)
                for n in ("input_layernorm.weight", "post_attention_layernorm.weight")
            ]
            for proj in PROJECTIONS:
                out.append(Slice(p + proj + ".weight", hidden_dim(proj), u))
                if hidden_dim(proj) == 0 and _has_bias(shape, proj):
                    out.append(Slice(p + proj + ".bias", 0, u))
        return out
    assert group.layer is not None
    p = f"model.layers.{group.layer}."
    ly = shape.layers[group.layer]
    if group.kind == "layer":
        return [Slice(p + "*", 0, ())]
    if group.kind == "ffn":
        return _unit_slices(shape, p, "ffn", u)
    heads = u if group.kind == "qhead" else query_heads_of(u[0], ly)
    out = _unit_slices(shape, p, "q", head_rows(heads, shape.head_dim))
    if group.kind == "kvgroup":
        out += _unit_slices(shape, p, "kv", head_rows(u, shape.head_dim))
    return out


def _has_bias(shape: ModelShape, projection: str) -> bool:
    if projection in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        return shape.qkv_bias
    if projection == "self_attn.o_proj":
        return shape.o_bias
    return shape.mlp_bias


def _unit_slices(shape: ModelShape, prefix: str, unit: Unit, index: tuple[int, ...]) -> list[Slice]:
    """The slices of features ``index`` of ``unit`` in the block at ``prefix``."""
    out = []
    for proj in unit_projections(unit):
        dim = PROJECTIONS[proj][1]
        out.append(Slice(prefix + proj + ".weight", dim, index))
        if dim == 0 and _has_bias(shape, proj):
            out.append(Slice(prefix + proj + ".bias", 0, index))
    return out
