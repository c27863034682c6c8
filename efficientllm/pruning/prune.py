"""Physical removal of minimal groups, in place.

Parameters keep their identity (``p.data`` is replaced by a slice), so an optimizer that holds
them keeps working; its per-parameter state (AdamW ``exp_avg``/``exp_avg_sq``) is sliced the same
way. All groups of one call are removed together; their indices refer to the model before the call.

Hidden channels and RMSNorm: removing channel c of a d-wide stream changes every RMSNorm's mean
over d. With ``rescale_norms`` (default) the pruner multiplies each hidden RMSNorm's weight by
sqrt(d/d') and its eps by d/d', which makes the pruned model compute exactly what the model with
channel c zeroed computed (zeroing == removing, up to float error).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from efficientllm.pruning.decide import Drops
from efficientllm.pruning.groups import (
    PROJECTIONS,
    Group,
    Unit,
    head_rows,
    hidden_dim,
    query_heads_of,
    unit_projections,
    validate_group,
)
from efficientllm.shape import LayerShape, ModelShape
from efficientllm.types import LlamaLike

log = logging.getLogger(__name__)


def _keep(n: int, drop: Iterable[int]) -> torch.Tensor:
    dropped = set(drop)
    return torch.tensor([i for i in range(n) if i not in dropped], dtype=torch.long)


class _Slicer:
    """Slices parameters (once each, even when tied) together with grads and optimizer state."""

    def __init__(self, optimizer: torch.optim.Optimizer | None):
        self.optimizer = optimizer
        self.done: set[tuple[int, int]] = set()

    def __call__(self, p: nn.Parameter | None, dim: int, keep: torch.Tensor) -> None:
        if p is None or (id(p), dim) in self.done:
            return
        self.done.add((id(p), dim))
        old_shape = p.shape
        idx = keep.to(p.device)
        p.data = p.data.index_select(dim, idx).contiguous()
        if p.grad is not None:
            p.grad = p.grad.index_select(dim, idx).contiguous()
        state: dict[str, Any] = self.optimizer.state.get(p, {}) if self.optimizer else {}
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == old_shape:
                state[key] = value.index_select(dim, keep.to(value.device))

    def scale_(self, p: nn.Parameter, factor: float) -> None:
        """w <- factor*w; Adam moments follow the reparametrisation (g scales by 1/factor)."""
        p.data.mul_(factor)
        if p.grad is not None:
            p.grad.div_(factor)
        state = self.optimizer.state.get(p, {}) if self.optimizer else {}
        if torch.is_tensor(state.get("exp_avg")):
            state["exp_avg"].div_(factor)
        if torch.is_tensor(state.get("exp_avg_sq")):
            state["exp_avg_sq"].div_(factor * factor)


def _set_linear(lin: nn.Linear) -> None:
    lin.out_features, lin.in_features = lin.weight.shape


def _cut_unit_(block: LlamaLike, unit: Unit, keep: torch.Tensor, cut: _Slicer) -> None:
    """Keep features ``keep`` of ``unit`` in every projection of ``block`` (an attention or MLP
    module) that carries it, as ``groups.PROJECTIONS`` says."""
    prefix = "self_attn." if unit in ("q", "kv") else "mlp."
    for name in unit_projections(unit):
        lin, dim = block.get_submodule(name.removeprefix(prefix)), PROJECTIONS[name][1]
        cut(lin.weight, dim, keep)
        if dim == 0:
            cut(lin.bias, 0, keep)
        _set_linear(lin)


def _prune_attention_(attn: LlamaLike, q_drop: set[int], kv_drop: set[int], cut: _Slicer) -> None:
    hd = attn.head_dim
    n_heads = attn.q_proj.out_features // hd
    n_kv = attn.k_proj.out_features // hd
    q_keep = _keep(n_heads * hd, head_rows(sorted(q_drop), hd))
    kv_keep = _keep(n_kv * hd, head_rows(sorted(kv_drop), hd))
    _cut_unit_(attn, "q", q_keep, cut)
    _cut_unit_(attn, "kv", kv_keep, cut)
    new_heads, new_kv = n_heads - len(q_drop), n_kv - len(kv_drop)
    attn.num_key_value_groups = new_heads // new_kv


def _prune_mlp_(mlp: LlamaLike, drop: set[int], cut: _Slicer) -> None:
    keep = _keep(mlp.gate_proj.out_features, drop)
    _cut_unit_(mlp, "ffn", keep, cut)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = mlp.gate_proj.out_features


def _hidden_norms(model: LlamaLike) -> list[LlamaLike]:
    norms = [model.model.norm]
    for layer in model.model.layers:
        norms += [layer.input_layernorm, layer.post_attention_layernorm]
    return norms


def _prune_hidden_(model: LlamaLike, drop: set[int], cut: _Slicer, rescale_norms: bool) -> None:
    emb = model.model.embed_tokens
    d_old = emb.embedding_dim
    keep = _keep(d_old, drop)
    d_new = len(keep)
    cut(emb.weight, 1, keep)
    emb.embedding_dim = d_new
    cut(model.lm_head.weight, 1, keep)  # no-op when tied (same Parameter)
    _set_linear(model.lm_head)
    for norm in _hidden_norms(model):
        cut(norm.weight, 0, keep)
        if rescale_norms:
            cut.scale_(norm.weight, math.sqrt(d_old / d_new))
            norm.variance_epsilon *= d_old / d_new
    for layer in model.model.layers:
        for name in PROJECTIONS:
            lin, dim = layer.get_submodule(name), hidden_dim(name)
            cut(lin.weight, dim, keep)
            if dim == 0:
                cut(lin.bias, 0, keep)
            _set_linear(lin)
        if hasattr(layer.mlp, "hidden_size"):
            layer.mlp.hidden_size = d_new


def _drop_from_optimizer(optimizer: torch.optim.Optimizer | None, module: LlamaLike) -> None:
    if optimizer is None:
        return
    gone = {id(p) for p in module.parameters()}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) not in gone]
    for p in list(optimizer.state):
        if id(p) in gone:
            del optimizer.state[p]


def drops_from_groups(shape: ModelShape, groups: Iterable[Group]) -> Drops:
    """Validate explicit groups (indices of the current model) and merge them into ``Drops``."""
    d = Drops()
    for g in groups:
        validate_group(shape, g)
        if g.kind == "hidden":
            d.hidden.update(g.units)
            continue
        assert g.layer is not None  # validated: every other kind names its layer
        if g.kind == "layer":
            d.layers.add(g.layer)
        elif g.kind == "ffn":
            d.ffn.setdefault(g.layer, set()).update(g.units)
        elif g.kind == "qhead":
            d.q.setdefault(g.layer, set()).update(g.units)
        else:
            d.kv.setdefault(g.layer, set()).update(g.units)
            d.q.setdefault(g.layer, set()).update(query_heads_of(g.units[0], shape.layers[g.layer]))
    return d


def prune_(model: LlamaLike, shape: ModelShape, groups: Iterable[Group], **kwargs) -> ModelShape:
    """Remove ``groups`` (indices of the current model) in place; see ``apply_drops_``."""
    return apply_drops_(model, shape, drops_from_groups(shape, groups), **kwargs)


def apply_drops_(
    model: LlamaLike,
    shape: ModelShape,
    drops: Drops,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    accumulator: Any | None = None,
    rescale_norms: bool = True,
) -> ModelShape:
    """Remove everything in ``drops`` from ``model`` (an ``EfficientLLMForCausalLM`` whose shape
    is ``shape``) in place; slice ``optimizer`` state and ``accumulator`` vectors alike.
    Returns the new shape (checked against the modules). No autograd graph of the model may be
    alive (``del loss`` after ``backward``): its cached gradient accumulators keep old shapes."""
    from efficientllm.modeling import sync_config_

    new_shape = _check_result(shape, drops)
    cut = _Slicer(optimizer)
    layers = model.model.layers
    for i in sorted(set(drops.q) | set(drops.kv)):
        if drops.q.get(i) or drops.kv.get(i):
            _prune_attention_(
                layers[i].self_attn, drops.q.get(i, set()), drops.kv.get(i, set()), cut
            )
    for i, drop in drops.ffn.items():
        if drop:
            _prune_mlp_(layers[i].mlp, drop, cut)
    if drops.hidden:
        _prune_hidden_(model, drops.hidden, cut, rescale_norms)
    for i in sorted(drops.layers, reverse=True):
        _drop_from_optimizer(optimizer, layers[i])
        del layers[i]
    sync_config_(model)
    if accumulator is not None:
        _select_accumulator(accumulator, shape, drops)
    got = sum(p.numel() for p in model.parameters())
    if got != new_shape.num_params():  # an adapter/shape mismatch must never pass silently
        raise RuntimeError(
            f"pruned model has {got:,} parameters, shape says {new_shape.num_params():,}"
        )
    log.debug("pruned -> %s (%s params)", new_shape.describe(), f"{got:,}")
    return new_shape


def _check_result(shape: ModelShape, drops: Drops) -> ModelShape:
    """Validate the combined removal (GQA balance, nothing emptied) and return the new shape."""
    hidden = shape.hidden_size - len(drops.hidden)
    if hidden < 1:
        raise ValueError("the removal would leave no hidden channel")
    layers = []
    q_drop, ffn = drops.q, drops.ffn
    for i, ly in enumerate(shape.layers):
        if i in drops.layers:
            continue
        heads = ly.num_heads - len(q_drop.get(i, ()))
        kv = ly.num_kv_heads - len(drops.kv.get(i, ()))
        if kv < 1 or heads < kv:
            raise ValueError(f"layer {i}: the removal leaves no attention head")
        per_group: defaultdict[int, int] = defaultdict(int)
        for h in range(ly.num_heads):
            if h not in q_drop.get(i, ()):
                per_group[h // ly.heads_per_group] += 1
        kept_kv = set(range(ly.num_kv_heads)) - drops.kv.get(i, set())
        if set(per_group) != kept_kv or len(set(per_group.values())) > 1:
            raise ValueError(f"layer {i}: KV groups would keep unequal query heads {per_group}")
        width = ly.intermediate_size - len(ffn.get(i, ()))
        if width < 1:
            raise ValueError(f"layer {i}: the removal leaves no FFN channel")
        layers.append(LayerShape(num_heads=heads, num_kv_heads=kv, intermediate_size=width))
    if not layers:
        raise ValueError("the removal leaves no layer")
    return shape.with_layers(layers).with_hidden(hidden)


def _select_accumulator(acc: Any, shape: ModelShape, drops: Drops) -> None:
    for i, ly in enumerate(shape.layers):
        q, kv = drops.q.get(i, set()), drops.kv.get(i, set())
        if q or kv:
            acc.select_heads_(i, _keep(ly.num_heads, q), _keep(ly.num_kv_heads, kv))
        if drops.ffn.get(i):
            acc.select_ffn_(i, _keep(ly.intermediate_size, drops.ffn[i]))
    if drops.hidden:
        acc.select_hidden_(_keep(shape.hidden_size, drops.hidden))
    for i in sorted(drops.layers, reverse=True):
        acc.remove_layer_(i)
