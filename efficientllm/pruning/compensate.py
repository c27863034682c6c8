"""Variant B: local second-order (OBS / SparseGPT-style) compensation of removed input columns.

Before a removal, every *consuming* linear layer W [out, in] whose input columns Q disappear gets
its remaining columns R updated so that W' X_R approximates W X on that layer's recent inputs X:

    ΔW[:, R] = −W[:, Q] · (H⁻¹[Q, Q])⁻¹ · H⁻¹[Q, R],    H = XᵀX + δ·I,  δ = λ·mean(diag XᵀX).

For a symmetric positive definite H the block-inverse (Schur complement) identity gives
−(H⁻¹[Q, Q])⁻¹ H⁻¹[Q, R] = H[Q, R] · H[R, R]⁻¹, so the update is computed with one Cholesky
solve of the |R|×|R| block (float64) instead of a full inverse; the two are equal (tested). With
λ → 0 it is the least-squares optimum min_W' ||X Wᵀ − X_R W'ᵀ||² (ridge regression for λ > 0).

Consumers (method.md, "Schedule", Variant B):
- FFN channel of layer i: ``mlp.down_proj`` (inputs: the intermediate activations).
- Query head of layer i (a ``qhead`` group, or the query heads of a removed KV group):
  ``self_attn.o_proj`` (inputs: attention output, ``head_dim`` columns per head). Removed K/V rows
  have no consumer column of their own; only the query heads' o_proj columns are compensated.
- Hidden channel: ``q/k/v_proj`` (inputs: ``input_layernorm`` output, one H shared by the three)
  and ``gate/up_proj`` (inputs: ``post_attention_layernorm`` output, one H shared by the two) of
  every layer. Embeddings / lm_head (tied or not) are not consumers.

Typical use during pruning-aware training::

    comp = Compensator()
    comp.attach(model)             # H accumulates during training forwards (grad enabled)
    ...
    comp.compensate_(model, drops)  # before the removal, indices of the current model
    shape = apply_drops_(model, shape, drops, optimizer=opt)
    comp.select_(drops)            # or comp.reset(): H must follow the new widths

Memory: one float32 H of in×in per tracked input (per layer: o_proj heads·hd, down_proj I, and two
of hidden×hidden); pass ``kinds`` to track only what the schedule can remove. Padding tokens and
gradient-checkpoint recomputations are counted like any other token (H is only used up to scale,
apart from the relative damping).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from efficientllm.pruning.decide import Drops
from efficientllm.pruning.groups import consumer, head_rows, hidden_readers
from efficientllm.types import LlamaLike

log = logging.getLogger(__name__)

CompensationKind = Literal["head", "ffn", "hidden"]
ALL_KINDS: tuple[CompensationKind, ...] = ("head", "ffn", "hidden")


@dataclass
class _Stat:
    """Accumulated XᵀX of one tracked linear input (``h`` is None until the first forward)."""

    h: torch.Tensor | None = None
    tokens: int = 0


def _keep(n: int, drop: Iterable[int]) -> list[int]:
    dropped = set(drop)
    return [i for i in range(n) if i not in dropped]


def obs_transfer(h: torch.Tensor, drop: Iterable[int], damp: float = 0.01) -> torch.Tensor | None:
    """The [|Q|, |R|] matrix T with ΔW[:, R] = W[:, Q] @ T (float64, on ``h``'s device).

    ``h`` is the undamped XᵀX [in, in]; ``drop`` the removed columns Q (R = the rest, in order).
    T = −(Hd⁻¹[Q,Q])⁻¹ Hd⁻¹[Q,R] = Hd[Q,R] Hd[R,R]⁻¹ with Hd = h + damp·mean(diag h)·I.
    Returns None when ``h`` holds no signal (all-zero diagonal): nothing to compensate with.
    """
    n = h.shape[0]
    q = torch.tensor(sorted(set(drop)), dtype=torch.long, device=h.device)
    r = torch.tensor(_keep(n, q.tolist()), dtype=torch.long, device=h.device)
    hd = h.to(torch.float64)
    scale = hd.diagonal().mean()
    if not bool(scale > 0) or len(q) == 0 or len(r) == 0:
        return None
    h_rr = hd.index_select(0, r).index_select(1, r)
    h_rr.diagonal().add_(damp * scale)
    h_qr = hd.index_select(0, q).index_select(1, r)  # off-diagonal block: damping does not touch it
    chol, info = torch.linalg.cholesky_ex(h_rr)
    if int(info) == 0:
        t_transposed = torch.cholesky_solve(h_qr.T.contiguous(), chol)
    else:  # numerically singular (e.g. damp=0 with fewer tokens than columns)
        t_transposed = torch.linalg.lstsq(h_rr, h_qr.T).solution
    return t_transposed.T


class Compensator:
    """Accumulates H = XᵀX of the consumer layers' inputs and applies the OBS update before a
    removal. See the module docstring for the consumers and the call order."""

    def __init__(
        self, kinds: Iterable[CompensationKind] = ALL_KINDS, *, dtype: torch.dtype = torch.float32
    ) -> None:
        """``kinds``: which consumers to track ("head", "ffn", "hidden"); ``dtype`` of H
        (float64 only where XᵀX is too ill-conditioned for float32, e.g. tiny random models)."""
        self.kinds = tuple(kinds)
        self.dtype = dtype
        unknown = set(self.kinds) - set(ALL_KINDS)
        if unknown:
            raise ValueError(f"unknown compensation kinds {sorted(unknown)}; use {ALL_KINDS}")
        self._stats: dict[nn.Module, _Stat] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    @classmethod
    def for_group_kinds(cls, kinds: Iterable[str]) -> Compensator:
        """A compensator tracking the consumers of the group kinds that may be removed."""
        kinds = set(kinds)
        tracked: list[CompensationKind] = []
        if {"qhead", "kvgroup"} & kinds:
            tracked.append("head")
        if "ffn" in kinds:
            tracked.append("ffn")
        if "hidden" in kinds:
            tracked.append("hidden")
        return cls(kinds=tracked)

    # -- statistics -----------------------------------------------------------------------------

    def _tracked(self, model: LlamaLike) -> list[nn.Linear]:
        """The linear layers whose inputs are recorded (q_proj stands for q/k/v, gate for up)."""
        out: list[nn.Linear] = []
        for layer in model.model.layers:
            if "head" in self.kinds:
                out.append(layer.get_submodule(consumer("q")))
            if "ffn" in self.kinds:
                out.append(layer.get_submodule(consumer("ffn")))
            if "hidden" in self.kinds:  # one stand-in per shared input
                out += [layer.get_submodule(names[0]) for names in hidden_readers().values()]
        return out

    def _hook(self, module: LlamaLike, args: tuple) -> None:
        if not torch.is_grad_enabled() or not args:  # evaluation / generation forwards
            return
        x = args[0]
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            x = x.detach().reshape(-1, x.shape[-1]).to(self.dtype)
            stat = self._stats.setdefault(module, _Stat())
            if stat.h is None or stat.h.shape[0] != x.shape[1]:  # first call or stale width
                stat.h = torch.zeros(x.shape[1], x.shape[1], dtype=self.dtype, device=x.device)
                stat.tokens = 0
            stat.h.addmm_(x.T, x)
            stat.tokens += x.shape[0]

    def attach(self, model: LlamaLike) -> None:
        """Register forward pre-hooks on the consumer layers of ``model`` (an
        ``EfficientLLMForCausalLM``); H accumulates only in forwards with grad enabled."""
        if self._handles:
            raise RuntimeError("Compensator is already attached; detach() first")
        for lin in self._tracked(model):
            self._handles.append(lin.register_forward_pre_hook(self._hook))

    def detach(self) -> None:
        """Remove the hooks (the statistics are kept)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def reset(self) -> None:
        """Forget every accumulated H (e.g. after a pruning event)."""
        self._stats.clear()

    def stat(self, module: LlamaLike) -> tuple[torch.Tensor | None, int]:
        """(H, tokens) recorded for ``module``'s inputs (None, 0 when nothing was recorded)."""
        s = self._stats.get(module)
        return (None, 0) if s is None else (s.h, s.tokens)

    def all_reduce_(self, model: LlamaLike, sum_: Callable[[torch.Tensor], None]) -> None:
        """Sum every H and token count over data-parallel ranks (``sum_`` reduces a tensor in
        place on every rank), so that all ranks compensate alike; call on every rank before
        ``compensate_``."""
        for module in self._tracked(model):
            s = self._stats.get(module)
            if s is None or s.h is None:
                continue
            sum_(s.h)
            n = torch.tensor([float(s.tokens)], dtype=torch.float64, device=s.h.device)
            sum_(n)
            s.tokens = int(n.item())

    def select_(self, model: LlamaLike, drops: Drops) -> None:
        """Instead of ``reset``: after ``apply_drops_(model, …, drops)``, keep H[R, R] of the
        surviving inputs (exact for heads/FFN channels, an approximation for hidden channels) so
        that a further removal in the same pruning event is compensated too. Statistics of
        removed layers, or whose width cannot be matched, are dropped."""
        n_old = len(model.model.layers) + len(drops.layers)
        old_index = [i for i in range(n_old) if i not in drops.layers]
        kept: dict[nn.Module, _Stat] = {}
        for j, layer in enumerate(model.model.layers):
            i, attn = old_index[j], layer.self_attn
            removed = {
                layer.get_submodule(consumer("q")): head_rows(
                    sorted(drops.q.get(i, ())), attn.head_dim
                ),
                layer.get_submodule(consumer("ffn")): sorted(drops.ffn.get(i, ())),
            }
            for names in hidden_readers().values():
                removed[layer.get_submodule(names[0])] = sorted(drops.hidden)
            for module, cols in removed.items():
                s = self._stats.get(module)
                if s is None or s.h is None:
                    continue
                keep = _keep(s.h.shape[0], cols)
                if len(keep) != module.in_features:
                    continue  # cannot be matched: accumulate afresh
                if len(keep) < s.h.shape[0]:
                    idx = torch.tensor(keep, dtype=torch.long, device=s.h.device)
                    s.h = s.h.index_select(0, idx).index_select(1, idx).contiguous()
                kept[module] = s
        self._stats = kept

    # -- compensation ---------------------------------------------------------------------------

    def _update(
        self,
        name: str,
        tracked: nn.Linear,
        consumers: list[tuple[str, nn.Linear]],
        cols: Iterable[int],
        damp: float,
        done: list[str],
    ) -> None:
        cols = sorted(set(cols))
        if not cols:
            return
        s = self._stats.get(tracked)
        if s is None or s.h is None:
            log.warning("no input statistics for %s: removal left uncompensated", name)
            return
        if s.h.shape[0] != tracked.in_features:
            raise RuntimeError(
                f"stale statistics for {name} ({s.h.shape[0]} vs {tracked.in_features} inputs); "
                "call reset() or select_() after each removal"
            )
        t = obs_transfer(s.h, cols, damp)
        if t is None:
            log.warning("all-zero input statistics for %s: left uncompensated", name)
            return
        for cname, lin in consumers:
            w = lin.weight
            q = torch.tensor(cols, dtype=torch.long, device=w.device)
            r = torch.tensor(_keep(w.shape[1], cols), dtype=torch.long, device=w.device)
            delta = w.index_select(1, q).to(torch.float64) @ t.to(w.device)
            w.index_add_(1, r, delta.to(w.dtype))
            done.append(cname)

    @torch.no_grad()
    def compensate_(self, model: LlamaLike, drops: Drops, *, damp: float = 0.01) -> list[str]:
        """Apply ΔW in place to every consumer of what ``drops`` removes (indices of the current
        model), BEFORE ``apply_drops_``. Layers in ``drops.layers`` are skipped; kinds that are
        not tracked are left alone. Returns the names of the updated linear layers."""
        done: list[str] = []
        for i, layer in enumerate(model.model.layers):
            if i in drops.layers:
                continue
            attn = layer.self_attn
            p = f"model.layers.{i}."
            if "head" in self.kinds:
                heads = set(drops.q.get(i, ()))
                kv = drops.kv.get(i, set())
                if kv:  # the query heads that read a removed KV head go with it
                    group = (attn.q_proj.out_features // attn.head_dim) // (
                        attn.k_proj.out_features // attn.head_dim
                    )
                    heads |= {h for k in kv for h in range(k * group, (k + 1) * group)}
                cols = head_rows(sorted(heads), attn.head_dim)
                o = layer.get_submodule(consumer("q"))
                o_name = p + consumer("q")
                self._update(o_name, o, [(o_name, o)], cols, damp, done)
            if "ffn" in self.kinds:
                d, d_name = layer.get_submodule(consumer("ffn")), p + consumer("ffn")
                channels = tuple(sorted(drops.ffn.get(i, ())))
                self._update(d_name, d, [(d_name, d)], channels, damp, done)
            if "hidden" in self.kinds and drops.hidden:
                for names in hidden_readers().values():  # readers sharing one input: one H
                    mods = [(p + n, layer.get_submodule(n)) for n in names]
                    self._update(mods[0][0], mods[0][1], mods, drops.hidden, damp, done)
        return done
