"""The heterogeneous model equals the family model, survives in-place shrinking, and round-trips."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tiny import FAMILIES, tiny_model
from torch import nn

from efficientllm.modeling import (
    EfficientLLMConfig,
    EfficientLLMForCausalLM,
    config_from_family,
    sync_config_,
)
from efficientllm.shape import LayerShape, ModelShape

IDS = torch.randint(0, 96, (2, 11), generator=torch.Generator().manual_seed(7))


# ---- helpers shared with test_export.py ------------------------------------------------------
@dataclass(frozen=True)
class LayerPlan:
    """Which KV groups, how many heads per group and how many FFN channels one layer keeps."""

    groups: Sequence[int]
    heads_per_group: int
    ffn: int


def _rows_(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight.data = lin.weight.data[idx]
    if lin.bias is not None:
        lin.bias.data = lin.bias.data[idx]
    lin.out_features = len(idx)


def _cols_(lin: nn.Linear, idx: torch.Tensor) -> None:
    lin.weight.data = lin.weight.data[:, idx]
    lin.in_features = len(idx)


def _head_channels(heads: Sequence[int], hd: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])


def shrink_(
    model: EfficientLLMForCausalLM,
    *,
    hidden: int,
    plans: Sequence[LayerPlan],
    drop_layer: int | None,
    eps: float,
    head_eps: float | None = None,
    seed: int = 0,
) -> None:
    """Slice a model in place the way the pruner does, then ``sync_config_``."""
    g = torch.Generator().manual_seed(seed)
    inner, cfg = model.model, model.config
    hd, per = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    with torch.no_grad():
        h_idx = torch.randperm(inner.embed_tokens.embedding_dim, generator=g)[:hidden].sort().values
        inner.embed_tokens.weight.data = inner.embed_tokens.weight.data[:, h_idx]
        inner.embed_tokens.embedding_dim = hidden
        if model.lm_head.weight is inner.embed_tokens.weight:
            model.lm_head.in_features = hidden
        else:
            _cols_(model.lm_head, h_idx)
        norms = [inner.norm]
        norms += [
            n for ly in inner.layers for n in (ly.input_layernorm, ly.post_attention_layernorm)
        ]
        for norm in norms:
            norm.weight.data = norm.weight.data[h_idx]
            norm.variance_epsilon = eps
        for ly, plan in zip(inner.layers, plans, strict=True):
            attn, mlp = ly.self_attn, ly.mlp
            q_heads = [grp * per + j for grp in plan.groups for j in range(plan.heads_per_group)]
            for lin in (
                attn.q_proj,
                attn.k_proj,
                attn.v_proj,
                mlp.gate_proj,
                mlp.up_proj,
            ):
                _cols_(lin, h_idx)
            _rows_(attn.q_proj, _head_channels(q_heads, hd))
            _rows_(attn.k_proj, _head_channels(plan.groups, hd))
            _rows_(attn.v_proj, _head_channels(plan.groups, hd))
            _cols_(attn.o_proj, _head_channels(q_heads, hd))
            _rows_(attn.o_proj, h_idx)
            attn.num_key_value_groups = plan.heads_per_group
            f_idx = (
                torch.randperm(mlp.gate_proj.out_features, generator=g)[: plan.ffn].sort().values
            )
            _rows_(mlp.gate_proj, f_idx)
            _rows_(mlp.up_proj, f_idx)
            _cols_(mlp.down_proj, f_idx)
            _rows_(mlp.down_proj, h_idx)
            if head_eps is not None and hasattr(attn, "q_norm"):
                attn.q_norm.variance_epsilon = head_eps
                attn.k_norm.variance_epsilon = head_eps
        if drop_layer is not None:
            del inner.layers[drop_layer]
    sync_config_(model)


def hetero_model(name: str = "llama_gqa_tied", **kw: object) -> EfficientLLMForCausalLM:
    """3 layers -> 2, hidden 48 -> 40 (not divisible by the head count), widths per layer."""
    model = EfficientLLMForCausalLM.from_family(tiny_model(name)).eval()
    kv = model.config.num_key_value_heads
    per = model.config.num_attention_heads // kv
    plans = [
        LayerPlan([0], per, 30),
        LayerPlan(list(range(kv)), per - 1, 20),
        LayerPlan([kv - 1], 1, 11),
    ]
    shrink_(model, hidden=40, plans=plans, drop_layer=1, eps=3e-6, **kw)
    return model


def uniform_model(name: str = "llama_mha") -> EfficientLLMForCausalLM:
    """Uniformly shrunk (2 of 4 heads, FFN 30, hidden 40, one layer dropped)."""
    model = EfficientLLMForCausalLM.from_family(tiny_model(name)).eval()
    kv = model.config.num_key_value_heads
    per = model.config.num_attention_heads // kv
    plans = [LayerPlan(list(range(kv // 2 or 1)), max(per // 2, 1), 30)] * 3
    shrink_(model, hidden=40, plans=plans, drop_layer=0, eps=2e-6)
    return model


def shape_of(cfg: EfficientLLMConfig) -> ModelShape:
    """The parameter-count shape described by a config (no modules involved)."""
    bias, fam = bool(getattr(cfg, "attention_bias", False)), cfg.base_model_type
    return ModelShape(
        family=fam,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        head_dim=cfg.head_dim,
        layers=tuple(
            LayerShape(num_heads=h, num_kv_heads=k, intermediate_size=f)
            for h, k, f in zip(
                cfg.layer_num_attention_heads,
                cfg.layer_num_key_value_heads,
                cfg.layer_intermediate_size,
                strict=True,
            )
        ),
        tie_word_embeddings=cfg.tie_word_embeddings,
        qkv_bias=bias or fam == "qwen2",
        o_bias=bias,
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
        qk_norm=fam == "qwen3",
    )


def numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@torch.no_grad()
def greedy_both(model: nn.Module, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    ids = IDS[:, :4]
    mask = torch.ones_like(ids)
    kw = {
        "max_new_tokens": n,
        "do_sample": False,
        "attention_mask": mask,
        "pad_token_id": 0,
    }
    return model.generate(ids, use_cache=True, **kw), model.generate(ids, use_cache=False, **kw)


# ---- tests -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(FAMILIES))
@torch.no_grad()
def test_from_family_matches_vanilla(name: str) -> None:
    fam = tiny_model(name)
    ref = fam(IDS, labels=IDS)
    keys = set(fam.state_dict())
    model = EfficientLLMForCausalLM.from_family(fam)
    out = model(IDS, labels=IDS)
    assert max_diff(out.logits, ref.logits) <= 1e-6
    assert abs(float(out.loss) - float(ref.loss)) <= 1e-6
    assert set(model.state_dict()) == keys
    assert numel(model) == shape_of(model.config).num_params() == numel(fam)
    cached, uncached = greedy_both(model)
    assert cached.shape == (2, 10)
    assert torch.equal(cached, uncached)


def test_config_builds_indivisible_hidden() -> None:
    """hidden 40 with 6 query heads: the family config would reject it, ours must not."""
    fam_cfg = tiny_model("llama_gqa_tied").config
    cfg = config_from_family(
        fam_cfg,
        layer_num_attention_heads=[6, 3],
        layer_num_key_value_heads=[2, 1],
        layer_intermediate_size=[17, 5],
    )
    cfg.hidden_size = 40
    model = EfficientLLMForCausalLM(cfg).eval()
    assert model.model.layers[0].self_attn.q_proj.weight.shape == (48, 40)
    assert model.model.layers[1].mlp.down_proj.weight.shape == (40, 5)
    assert numel(model) == shape_of(cfg).num_params()
    assert model(IDS).logits.shape == (2, 11, 96)
    lc = cfg.layer_config(0)
    assert (lc.num_attention_heads, lc.num_key_value_heads, lc.hidden_size) == (
        6,
        2,
        40,
    )


@pytest.mark.parametrize("name", ["llama_gqa_tied", "llama_bias", "qwen2", "qwen3"])
@torch.no_grad()
def test_shrunk_model_syncs_and_roundtrips(name: str, tmp_path: Path) -> None:
    model = hetero_model(name, head_eps=1e-5)
    cfg = model.config
    kv = tiny_model(name).config.num_key_value_heads
    per = tiny_model(name).config.num_attention_heads // kv
    assert cfg.hidden_size == 40 and cfg.num_hidden_layers == 2
    assert cfg.layer_num_attention_heads == [per, 1]
    assert cfg.layer_num_key_value_heads == [1, 1]
    assert cfg.layer_intermediate_size == [30, 11]
    assert cfg.num_attention_heads == per and cfg.intermediate_size == 30
    assert cfg.rms_norm_eps == 3e-6
    assert cfg.head_norm_eps == (1e-5 if name == "qwen3" else 3e-6)
    if getattr(cfg, "layer_types", None) is not None:
        assert len(cfg.layer_types) == 2 and len(model.model.config.layer_types) == 2
    assert model.model.config.hidden_size == 40 and model.model.config.num_hidden_layers == 2
    layer_cfgs = [ly.self_attn.config for ly in model.model.layers]
    assert layer_cfgs[0] is not layer_cfgs[1]
    assert [c.num_attention_heads for c in layer_cfgs] == [per, 1]
    assert [ly.self_attn.layer_idx for ly in model.model.layers] == [0, 1]
    assert all(ly.mlp.config is ly.self_attn.config for ly in model.model.layers)
    assert numel(model) == shape_of(cfg).num_params()

    ref = model(IDS).logits
    assert ref.shape == (2, 11, 96) and torch.isfinite(ref).all()
    cached, uncached = greedy_both(model)
    assert torch.equal(cached, uncached)

    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix in (".bin", ".pt", ".pkl")]
    loaded = EfficientLLMForCausalLM.from_pretrained(tmp_path).eval()
    assert max_diff(loaded(IDS).logits, ref) <= 1e-5
    assert numel(loaded) == numel(model)
    assert torch.equal(greedy_both(loaded)[0], cached)


@torch.no_grad()
def test_forward_options() -> None:
    from transformers import DynamicCache

    model = hetero_model()
    full = model(IDS).logits
    assert max_diff(model(IDS, logits_to_keep=1).logits, full[:, -1:]) <= 1e-6
    # prefill then one step with the deprecated kwarg name equals the full forward
    with pytest.warns(FutureWarning, match="past_key_values"):
        first = model(
            IDS[:, :-1], past_key_values=DynamicCache(config=model.config), use_cache=True
        )
    step = model(IDS[:, -1:], cache=first.cache, use_cache=True).logits
    assert max_diff(step[:, -1], full[:, -1]) <= 1e-5
    model.set_attn_implementation("eager")
    assert model.model.layers[1].self_attn.config._attn_implementation == "sdpa"  # lazy
    eager = model(IDS).logits
    assert model.model.layers[1].self_attn.config._attn_implementation == "eager"
    assert max_diff(eager, full) <= 1e-5
    loss = model(IDS, labels=IDS).loss
    assert loss is not None and torch.isfinite(loss)


@torch.no_grad()
def test_sliding_layer_types_follow_layer_removal() -> None:
    fam = tiny_model("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    model = EfficientLLMForCausalLM.from_family(fam).eval()
    assert model.config.layer_types == ["full_attention"] + ["sliding_attention"] * 2
    shrink_(model, hidden=40, plans=[LayerPlan([0], 3, 30)] * 3, drop_layer=1, eps=1e-6)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    assert [ly.self_attn.sliding_window for ly in model.model.layers] == [None, 4]
    assert model.model.has_sliding_layers
    cached, uncached = greedy_both(model, n=10)
    assert torch.equal(cached, uncached)


def test_sync_rejects_mixed_hidden_eps() -> None:
    model = hetero_model()
    model.model.norm.variance_epsilon = 1e-3
    with pytest.raises(ValueError, match="eps"):
        sync_config_(model)
