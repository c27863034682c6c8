"""Exact counting, budgets, plans and decisions (pure Python except where a model is built)."""

from __future__ import annotations

import pytest
import torch
from tiny import FAMILIES, tiny_config, tiny_model

from efficientllm.arch import get_adapter, supported_model_types
from efficientllm.errors import BudgetInfeasibleError, ConfigError, UnsupportedArchitectureError
from efficientllm.model_io import shape_from_config
from efficientllm.pruning.budget import check_budget, parse_budget, plan, smallest_shape
from efficientllm.pruning.decide import decide
from efficientllm.pruning.groups import Group, group_cost, shape_after, unit_cost
from efficientllm.shape import LayerShape

SMOLLM2_135M = dict(  # the demo model's config.json (assets.md)
    model_type="llama",
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    vocab_size=49152,
    tie_word_embeddings=True,
    head_dim=64,
)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_count_from_config_equals_built_model(family: str) -> None:
    cfg = tiny_config(family).to_dict()
    shape = shape_from_config(cfg)
    model = tiny_model(family)
    assert shape.num_params() == sum(p.numel() for p in model.parameters())


def test_count_of_the_demo_model_config() -> None:
    assert shape_from_config(SMOLLM2_135M).num_params() == 134_515_008  # assets.md


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_unit_costs_equal_shape_differences(family: str) -> None:
    shape = shape_from_config(tiny_config(family).to_dict())
    shape = shape.with_layers(
        [
            shape.layers[0],
            LayerShape(
                num_heads=shape.layers[0].num_kv_heads,
                num_kv_heads=shape.layers[0].num_kv_heads,
                intermediate_size=7,
            ),
            shape.layers[2],
        ]
    )
    for g in [
        Group("hidden", None, (0,)),
        Group("ffn", 1, (0,)),
        Group("layer", 2),
        Group("kvgroup", 0, (0,)) if shape.layers[0].num_kv_heads > 1 else None,
    ]:
        if g is None:
            continue
        assert group_cost(shape, g) == shape.num_params() - shape_after(shape, g).num_params()
    assert unit_cost(shape, "ffn", 1) * 3 == group_cost(shape, Group("ffn", 1, (0, 1, 2)))


@pytest.mark.parametrize(
    "text,expected",
    [
        ("67M", 67_000_000),
        ("0.5B", 500_000_000),
        ("67000000", 67_000_000),
        ("1.2e8", 120_000_000),
        ("50%", 67_257_504),
        (" 250k ", 250_000),
        (67_000_000, 67_000_000),
    ],
)
def test_parse_budget(text, expected) -> None:
    assert parse_budget(text, 134_515_008) == expected


@pytest.mark.parametrize("text", ["", "abc", "-5M", "0", "150%", "0%", "12 parsecs", True])
def test_parse_budget_rejects(text) -> None:
    with pytest.raises(ConfigError):
        parse_budget(text, 1000)


@pytest.mark.parametrize("granularity", ["uniform", "global"])
def test_plan_demo_model_67m_within_half_percent(granularity) -> None:
    source = shape_from_config(SMOLLM2_135M)
    p = plan(source, 67_000_000, granularity=granularity)
    assert p.num_params <= 67_000_000
    assert p.gap <= 0.005, p.gap
    if granularity == "uniform":
        assert p.shape.is_uniform
        assert p.shape.hidden_size % p.shape.layers[0].num_heads == 0  # vanilla-exportable
    # building the planned shape gives exactly the predicted count (meta device: no memory)
    from transformers import LlamaConfig

    from efficientllm.modeling import EfficientLLMForCausalLM, config_from_family

    cfg = config_from_family(
        LlamaConfig(**{k: v for k, v in SMOLLM2_135M.items() if k != "model_type"})
    )
    cfg.hidden_size = p.shape.hidden_size
    cfg.layer_num_attention_heads = [ly.num_heads for ly in p.shape.layers]
    cfg.layer_num_key_value_heads = [ly.num_kv_heads for ly in p.shape.layers]
    cfg.layer_intermediate_size = [ly.intermediate_size for ly in p.shape.layers]
    with torch.device("meta"):
        model = EfficientLLMForCausalLM(cfg)
    assert sum(t.numel() for t in model.parameters()) == p.num_params


def test_budget_errors_say_what_is_reachable() -> None:
    source = shape_from_config(SMOLLM2_135M)
    low = smallest_shape(source).num_params()
    with pytest.raises(BudgetInfeasibleError, match="not below the source") as err:
        check_budget(source, 200_000_000)
    assert err.value.reachable == (low, source.num_params() - 1)
    with pytest.raises(BudgetInfeasibleError, match="smallest legal shape"):
        plan(source, low - 1)
    plan(source, low)  # the smallest shape itself is reachable


def test_unsupported_model_type_lists_the_supported_ones() -> None:
    with pytest.raises(UnsupportedArchitectureError) as err:
        get_adapter("gpt2")
    for name in supported_model_types():
        assert name in str(err.value)
    assert set(supported_model_types()) >= {"llama", "mistral", "qwen2", "qwen3"}


def _random_scores(model):
    from efficientllm.pruning.saliency import compute_unit_scores

    torch.manual_seed(0)
    return compute_unit_scores(model, scorer="random", generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("granularity", ["uniform", "global"])
@pytest.mark.parametrize("family", ["llama_gqa_tied", "qwen2", "llama_mha"])
def test_decide_reaches_target_and_prune_matches(granularity, family) -> None:
    from efficientllm.modeling import EfficientLLMForCausalLM
    from efficientllm.pruning.prune import apply_drops_

    model = EfficientLLMForCausalLM.from_family(tiny_model(family))
    shape = shape_from_config(model.config.to_dict())
    target = int(shape.num_params() * 0.6)
    d = decide(
        _random_scores(model),
        shape,
        target,
        granularity=granularity,
        hidden_multiple=1,
        ffn_multiple=1,
        tolerance=0.02,
    )
    assert d.shape.num_params() <= target
    assert d.shape.num_params() >= target * 0.98 or granularity == "uniform"
    if granularity == "uniform":
        assert d.shape.is_uniform
    new = apply_drops_(model, shape, d.drops)
    assert new == d.shape
    assert sum(p.numel() for p in model.parameters()) == d.shape.num_params()
    ids = torch.randint(0, shape.vocab_size, (1, 8))
    assert torch.isfinite(model(ids).logits).all()


def test_decide_raises_when_nothing_is_left() -> None:
    from efficientllm.modeling import EfficientLLMForCausalLM

    model = EfficientLLMForCausalLM.from_family(tiny_model("llama_gqa_tied"))
    shape = shape_from_config(model.config.to_dict())
    with pytest.raises(BudgetInfeasibleError):
        decide(_random_scores(model), shape, 10, kinds=("ffn",))


@pytest.mark.parametrize("granularity", ["global", "uniform"])
def test_decide_ffn_multiple_is_per_layer(granularity) -> None:
    """One narrow layer (width < 2 * ffn_multiple, so removed one channel at a time) must not
    switch the wide layers to one-channel removals: they stay multiples of ffn_multiple."""
    from efficientllm.pruning.saliency import UnitScores

    shape = shape_from_config(tiny_config("llama_gqa_tied").to_dict())
    ly = shape.layers[0]
    widths = [64, 10, 64]  # ffn_multiple 8: 10 < 16 is narrow, 64 is wide
    shape = shape.with_layers(
        [
            LayerShape(num_heads=ly.num_heads, num_kv_heads=ly.num_kv_heads, intermediate_size=w)
            for w in widths
        ]
    )
    g = torch.Generator().manual_seed(0)
    scores = UnitScores(
        q_head=[torch.rand(ly.num_heads, generator=g) for _ in widths],
        kv_head=[torch.rand(ly.num_kv_heads, generator=g) for _ in widths],
        ffn=[torch.rand(w, generator=g) for w in widths],
        hidden=torch.rand(shape.hidden_size, generator=g),
        layer=torch.rand(len(widths), generator=g),
    )
    per_channel = group_cost(shape, Group("ffn", 0, (0,)))
    target = shape.num_params() - 20 * per_channel  # a few blocks of 8 from the wide layers
    d = decide(scores, shape, target, granularity=granularity, kinds=("ffn",), ffn_multiple=8)
    assert d.shape.num_params() <= target
    new = [x.intermediate_size for x in d.shape.layers]
    assert new[0] < 64 or new[2] < 64  # the wide layers did shrink ...
    assert new[0] % 8 == 0 and new[2] % 8 == 0, new  # ... in blocks of ffn_multiple
    assert all(len(r.groups[0].units) == 8 for r in d.removals if r.groups[0].layer != 1)
