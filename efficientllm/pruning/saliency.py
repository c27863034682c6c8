"""Saliency of the minimal parameter groups (see docs/method.md, "Saliency").

Element scores ``s`` are computed once per parameter and reduced, with vectorised sums, to one
score per prunable unit: query head, KV head, FFN channel, hidden (stem) channel and layer.
``compute_unit_scores`` runs every training step, after ``backward()`` and before the optimizer
step; gradients must be unscaled (AMP) and already all-reduced.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from efficientllm.choices import SCORERS, Fisher, SaliencyMode, Scorer
from efficientllm.errors import ConfigError
from efficientllm.pruning.groups import PROJECTIONS, unit_cost
from efficientllm.shape import ModelShape
from efficientllm.types import LlamaLike

Gen = torch.Generator | None
Optimizer = torch.optim.Optimizer
log = logging.getLogger(__name__)


# ---- element scorers ------------------------------------------------------------------------
def taylor1(w: Tensor, g: Tensor) -> Tensor:
    """First-order Taylor saliency ``|w·g|`` (float32)."""
    return torch.mul(w.float(), g.float()).abs_()


def taylor_mix(w: Tensor, g: Tensor, fisher: Tensor | None = None, scale: float = 1.0) -> Tensor:
    """``|w·g − ½·F·w²|``, F = ``scale·fisher`` (the Fisher diagonal; ``g²`` when None)."""
    w, g = w.float(), g.float()
    out = g * g if fisher is None else fisher.float() * scale
    return out.mul_(w).mul_(-0.5).add_(g).mul_(w).abs_()  # w·(g − ½·F·w), few temporaries


def magnitude(w: Tensor) -> Tensor:
    """``|w|`` (needs no gradient)."""
    return w.float().abs()


def random(w: Tensor, generator: Gen = None) -> Tensor:
    """Uniform [0, 1) noise of ``w``'s shape, drawn from ``generator`` (a baseline)."""
    dev = generator.device if generator is not None else w.device
    return torch.rand(w.shape, generator=generator, device=dev).to(w.device)


def normalise(score: float | Tensor, cost: int | Tensor) -> float | Tensor:
    """Saliency per removed parameter, ``score / cost``.

    Group kinds differ ~100x in size (FFN channel << head << hidden channel); dividing each
    group's summed saliency by its parameter count makes them comparable in one global ranking.
    """
    if bool((torch.as_tensor(cost) <= 0).any()):
        raise ValueError(f"normalise: cost must be a positive parameter count, got {cost}")
    if isinstance(cost, Tensor):
        score = torch.as_tensor(score, dtype=torch.float32, device=cost.device)
    return score / cost


# ---- unit scores ----------------------------------------------------------------------------
@dataclass
class UnitScores:
    """Summed element saliency per prunable unit (float32). Lists are indexed by layer."""

    q_head: list[Tensor]
    """[H_l] per layer: q_proj rows (+ bias) and o_proj columns of each query head."""
    kv_head: list[Tensor]
    """[KV_l] per layer: k_proj and v_proj rows (+ biases) of each KV head."""
    ffn: list[Tensor]
    """[I_l] per layer: gate/up rows (+ biases) and down_proj column of each channel."""
    hidden: Tensor
    """[D]: every parameter slice that hidden channel c touches (embedding counted once)."""
    layer: Tensor
    """[L]: every parameter of each decoder block."""

    def widths(self) -> list[tuple[int, int, int]]:
        """(H_l, KV_l, I_l) per layer."""
        lens = (map(len, ts) for ts in (self.q_head, self.kv_head, self.ffn))
        return list(zip(*lens, strict=True))

    def map(self, fn: Callable[[Tensor], Tensor]) -> UnitScores:
        """A new ``UnitScores`` with ``fn`` applied to every tensor."""
        q, kv, ffn = ([fn(t) for t in ts] for ts in (self.q_head, self.kv_head, self.ffn))
        return UnitScores(q, kv, ffn, hidden=fn(self.hidden), layer=fn(self.layer))

    def clone(self) -> UnitScores:
        return self.map(torch.clone)

    def tensors(self) -> list[Tensor]:
        """All tensors in a fixed order (for element-wise arithmetic)."""
        return [*self.q_head, *self.kv_head, *self.ffn, self.hidden, self.layer]


def mean_normalised_saliency(scores: UnitScores, shape: ModelShape) -> dict[str, float]:
    """Mean saliency per parameter of each group kind (the paper's trajectory plot), keyed by
    the curve names the Monitor plots."""
    per_qhead = 2 * shape.head_dim * shape.hidden_size
    out: dict[str, float] = {  # keys: SALIENCY_KINDS
        "qhead": float(torch.cat(scores.q_head).mean()) / per_qhead,
        "ffn": float(torch.cat(scores.ffn).mean()) / unit_cost(shape, "ffn", 0),
        "hidden": float(scores.hidden.mean()) / unit_cost(shape, "hidden"),
    }
    return out


def _element_scorer(
    scorer: str, optimizer: Optimizer | None, fisher: str, generator: Gen
) -> Callable[[nn.Parameter], Tensor]:
    """A function computing ``s`` (float32) for one parameter with the chosen scorer."""
    if scorer not in SCORERS:
        raise ConfigError(f"unknown saliency scorer {scorer!r}; use one of {list(SCORERS)}")
    if fisher not in ("grad2", "adam"):
        raise ConfigError(f"unknown fisher source {fisher!r}; use 'grad2' or 'adam'")
    if scorer == "taylor_mix" and fisher == "adam" and optimizer is None:
        raise ConfigError("taylor_mix with fisher='adam' needs the optimizer; pass optimizer=")
    adam = optimizer if fisher == "adam" else None
    groups = {id(p): grp for grp in (adam.param_groups if adam else []) for p in grp["params"]}

    def score(p: nn.Parameter) -> Tensor:
        w, g = p.detach(), p.grad
        if scorer == "magnitude":
            return magnitude(w)
        if scorer == "random":
            return random(w, generator)
        if g is None:  # e.g. unused in this step's forward
            return torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        if scorer == "taylor1":
            return taylor1(w, g)
        state = adam.state.get(p) if adam is not None else None
        if not state or "exp_avg_sq" not in state:  # grad2, or no optimizer state yet
            return taylor_mix(w, g)
        # bias-corrected exp_avg_sq: an EMA estimate of E[g²]
        beta2 = float(groups[id(p)]["betas"][1]) if id(p) in groups else 0.999
        step = max(float(state.get("step", 1)), 1.0)
        return taylor_mix(w, g, state["exp_avg_sq"], scale=1.0 / (1.0 - beta2**step))

    return score


# projection short name -> (unit it belongs to, whether that unit indexes its output rows)
_ROLES = {name.rpartition(".")[2]: (u, dim == 0) for name, (u, dim) in PROJECTIONS.items()}


def _layer_scores(block: LlamaLike, score: Callable[[nn.Parameter], Tensor], hidden: Tensor):
    """(q, kv, ffn, total) of one decoder block; adds its hidden-channel sums to ``hidden``."""
    attn, dev = block.self_attn, hidden.device
    hd = int(attn.head_dim)
    units = {
        "q": torch.zeros(attn.q_proj.weight.shape[0] // hd, device=dev),
        "kv": torch.zeros(attn.k_proj.weight.shape[0] // hd, device=dev),
        "ffn": torch.zeros(block.mlp.gate_proj.weight.shape[0], device=dev),
    }
    total = torch.zeros((), device=dev)
    for name, p in block.named_parameters():
        s = score(p)
        short = name.rpartition(".")[0].rpartition(".")[2]
        unit, by_rows = _ROLES.get(short, (None, False))
        if s.dim() == 2:
            rows, cols = s.sum(1), s.sum(0)  # per output / per input feature
            total += rows.sum()
            if unit is not None:
                acc = units[unit]  # a head is hd consecutive features: reshape and sum
                acc += (rows if by_rows else cols).view(len(acc), -1).sum(1)
                hidden += cols if by_rows else rows
            continue
        total += s.sum()
        if unit is not None and by_rows:  # q/k/v/gate/up bias
            units[unit] += s.view(len(units[unit]), -1).sum(1)
        elif unit is not None or short.endswith("layernorm"):  # o/down bias, block norms: width D
            hidden += s
        # q_norm / k_norm act on head_dim: shared by all heads, counted in the layer only
    return units["q"], units["kv"], units["ffn"], total


@torch.no_grad()
def compute_unit_scores(
    model: LlamaLike,
    *,
    scorer: Scorer = "taylor1",
    optimizer: Optimizer | None = None,
    fisher: Fisher = "grad2",
    generator: Gen = None,
) -> UnitScores:
    """Unit saliency of a Llama-style causal LM from its current weights and ``.grad``.

    ``taylor1``/``taylor_mix`` read gradients (a parameter without ``.grad`` scores 0);
    ``magnitude``/``random`` do not. ``fisher="adam"`` takes F from the optimizer's
    bias-corrected ``exp_avg_sq`` (falls back to g² for parameters without state yet).
    """
    score = _element_scorer(scorer, optimizer, fisher, generator)
    inner = model.model
    embed = inner.embed_tokens.weight
    hidden = score(embed).sum(0)
    head = model.lm_head.weight
    if head is not embed:  # tied: the same Parameter, counted once
        hidden += score(head).sum(0)
    hidden += score(inner.norm.weight)
    q, kv, ffn, total = zip(*(_layer_scores(b, score, hidden) for b in inner.layers), strict=True)
    return UnitScores(
        q_head=list(q), kv_head=list(kv), ffn=list(ffn), hidden=hidden, layer=torch.stack(total)
    )


def _take(t: Tensor, keep: Tensor) -> Tensor:
    return t[torch.as_tensor(keep, device=t.device)].contiguous()


# ---- accumulation ---------------------------------------------------------------------------
class SaliencyAccumulator:
    """Running unit saliency between pruning events.

    ``window``: plain mean of the updates since the last ``reset()``.
    ``ema``: ``m ← β·m + (1−β)·x`` from ``m = 0``; ``value()`` is bias-corrected,
    ``m / (1 − β^steps)``, so it is an unbiased weighted mean from the first step on.
    The ``select_*``/``remove_layer_`` methods follow physical pruning so the state survives it.
    """

    def __init__(self, mode: SaliencyMode = "window", beta: float = 0.9):
        if mode not in ("window", "ema"):
            raise ConfigError(f"unknown saliency accumulation mode {mode!r}; use 'window' or 'ema'")
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"saliency EMA beta must be in [0, 1), got {beta}")
        self.mode, self.beta, self.steps = mode, float(beta), 0
        self._state: UnitScores | None = None

    def reset(self) -> None:
        """Forget everything (start a new window)."""
        self.steps, self._state = 0, None

    def update(self, scores: UnitScores) -> None:
        """Add one step's scores."""
        decay, w = (self.beta, 1.0 - self.beta) if self.mode == "ema" else (1.0, 1.0)
        if (st := self._state) is None:
            self._state, self.steps = scores.map(lambda t: t.float() * w), 1
            return
        if scores.widths() != st.widths() or scores.hidden.shape != st.hidden.shape:
            raise ValueError(
                "saliency scores do not match the accumulated widths; call select_*_() / "
                "remove_layer_() after pruning, or reset()"
            )
        if st.hidden.device != scores.hidden.device:  # e.g. loaded on CPU, training on GPU
            self._state = st = st.map(lambda t: t.to(scores.hidden.device))
        for acc, x in zip(st.tensors(), scores.tensors(), strict=True):
            acc.mul_(decay).add_(x, alpha=w)
        self.steps += 1

    def value(self) -> UnitScores:
        """The current estimate (a new object)."""
        if self._state is None or self.steps == 0:
            raise RuntimeError("saliency accumulator is empty: call update() first")
        div = self.steps if self.mode == "window" else 1.0 - self.beta**self.steps
        return self._state.map(lambda t: t / div)

    # ---- follow physical pruning (indices or bool masks of what is kept) ----------------------
    def select_heads_(self, layer: int, q_keep: Tensor, kv_keep: Tensor) -> None:
        """Keep query heads ``q_keep`` and KV heads ``kv_keep`` of ``layer``."""
        if (st := self._state) is not None:
            st.q_head[layer] = _take(st.q_head[layer], q_keep)
            st.kv_head[layer] = _take(st.kv_head[layer], kv_keep)

    def select_ffn_(self, layer: int, keep: Tensor) -> None:
        """Keep FFN channels ``keep`` of ``layer``."""
        if (st := self._state) is not None:
            st.ffn[layer] = _take(st.ffn[layer], keep)

    def select_hidden_(self, keep: Tensor) -> None:
        """Keep hidden channels ``keep``."""
        if (st := self._state) is not None:
            st.hidden = _take(st.hidden, keep)

    def remove_layer_(self, layer: int) -> None:
        """Drop decoder block ``layer`` (later blocks shift down by one)."""
        if (st := self._state) is not None:
            for lst in (st.q_head, st.kv_head, st.ffn):
                del lst[layer]
            st.layer = torch.cat([st.layer[:layer], st.layer[layer + 1 :]])

    def state_dict(self) -> dict[str, Tensor]:
        """Flat, safetensors-ready copy: ``q_head.{l}``, ``kv_head.{l}``, ``ffn.{l}``, ``hidden``,
        ``layer`` and 0-d ``steps``, ``beta``, ``ema`` (1 for ema, 0 for window)."""
        sd = {"steps": torch.tensor(self.steps), "ema": torch.tensor(int(self.mode == "ema"))}
        sd["beta"] = torch.tensor(self.beta, dtype=torch.float64)
        if self._state is not None:
            st = self._state.clone()
            for f in ("q_head", "kv_head", "ffn"):
                sd |= {f"{f}.{i}": t for i, t in enumerate(getattr(st, f))}
            sd |= {"hidden": st.hidden, "layer": st.layer}
        return sd

    def load_state_dict(self, sd: dict[str, Tensor]) -> None:
        """Restore exactly what ``state_dict`` saved (mode, beta, steps and per-layer widths)."""
        mode: SaliencyMode = "ema" if int(sd["ema"]) else "window"
        beta = float(sd["beta"])
        if (mode, beta) != (self.mode, self.beta):
            log.info("saliency accumulator: restoring mode=%s beta=%g from checkpoint", mode, beta)
        self.mode, self.beta, self.steps = mode, beta, int(sd["steps"])
        self._state = None
        if "hidden" in sd:  # per-layer widths come from the saved tensors themselves
            n = int(sd["layer"].numel())
            q, kv, ffn = ([sd[f"{f}.{i}"] for i in range(n)] for f in ("q_head", "kv_head", "ffn"))
            self._state = UnitScores(q, kv, ffn, hidden=sd["hidden"], layer=sd["layer"]).clone()
