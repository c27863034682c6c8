"""Zeroing a group gives the same logits as removing it; counts stay exact; optimizer follows."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from tiny import FAMILIES, tiny_model

from efficientllm.model_io import shape_from_config
from efficientllm.modeling import EfficientLLMForCausalLM
from efficientllm.pruning.groups import (
    Group,
    coupled_slices,
    group_cost,
    query_heads_of,
    shape_after,
)
from efficientllm.pruning.prune import prune_

TOL = 1e-5


def _hetero(name: str, seed: int = 0):
    model = EfficientLLMForCausalLM.from_family(tiny_model(name, seed=seed)).eval()
    return model, shape_from_config(model.config.to_dict())


def _zero_(model, shape, group: Group) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for s in coupled_slices(shape, group):
            if s.param.endswith("*"):
                for _n, p in model.model.layers[group.layer].named_parameters():
                    p.zero_()
                continue
            p = params[s.param]
            p.index_fill_(s.dim, torch.tensor(s.index, dtype=torch.long), 0.0)


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _all_groups(shape) -> list[Group]:
    rng = random.Random(0)
    out = [Group("hidden", None, (0,)), Group("hidden", None, (3, 7, shape.hidden_size - 1))]
    for li, ly in enumerate(shape.layers):
        out.append(Group("ffn", li, (rng.randrange(ly.intermediate_size),)))
        out.append(Group("ffn", li, tuple(rng.sample(range(ly.intermediate_size), 5))))
        if ly.num_kv_heads > 1:
            out += [Group("kvgroup", li, (kv,)) for kv in range(ly.num_kv_heads)]
        if ly.heads_per_group > 1:
            heads = tuple(rng.choice(query_heads_of(kv, ly)) for kv in range(ly.num_kv_heads))
            out.append(Group("qhead", li, heads))
    out.append(Group("layer", 1))
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_zeroing_equals_removing_every_group(family: str) -> None:
    base, shape = _hetero(family)
    ids = torch.randint(0, shape.vocab_size, (2, 17), generator=torch.Generator().manual_seed(1))
    assert sum(p.numel() for p in base.parameters()) == shape.num_params()
    for group in _all_groups(shape):
        zeroed = copy.deepcopy(base)
        _zero_(zeroed, shape, group)
        pruned = copy.deepcopy(base)
        new_shape = prune_(pruned, shape, [group])
        diff = (_logits(zeroed, ids) - _logits(pruned, ids)).abs().max().item()
        assert diff <= TOL, f"{family} {group}: max abs diff {diff:.2e}"
        n = sum(p.numel() for p in pruned.parameters())
        assert n == new_shape.num_params() == shape_after(shape, group).num_params()
        assert shape.num_params() - n == group_cost(shape, group), group
        assert new_shape == shape_from_config(pruned.config.to_dict())


@pytest.mark.parametrize("family", ["llama_gqa_tied", "qwen3", "llama_bias"])
def test_many_groups_at_once_then_generate(family: str) -> None:
    model, shape = _hetero(family)
    ids = torch.randint(0, shape.vocab_size, (1, 9), generator=torch.Generator().manual_seed(2))
    zeroed = copy.deepcopy(model)
    ly = shape.layers[0]
    groups = [
        Group("hidden", None, (1, 2, 5)),
        Group("ffn", 0, (0, 1, 2)),
        Group("ffn", 2, (10,)),
        Group("kvgroup", 1, (0,)),
    ]
    if ly.heads_per_group > 1:
        groups.append(
            Group("qhead", 0, tuple(query_heads_of(kv, ly)[-1] for kv in range(ly.num_kv_heads)))
        )
    for g in groups:
        _zero_(zeroed, shape, g)
    new_shape = prune_(model, shape, groups)
    assert not new_shape.is_uniform
    diff = (_logits(zeroed, ids) - _logits(model, ids)).abs().max().item()
    assert diff <= TOL
    cached = model.generate(ids, max_new_tokens=6, do_sample=False)
    uncached = model.generate(ids, max_new_tokens=6, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_optimizer_state_is_sliced_and_training_continues() -> None:
    model, shape = _hetero("llama_gqa_tied")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, shape.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))
    model(ids, labels=ids).loss.backward()
    opt.step()
    gate = model.model.layers[0].mlp.gate_proj.weight
    emb = model.model.embed_tokens.weight
    before_gate = opt.state[gate]["exp_avg_sq"].clone()
    before_emb = opt.state[emb]["exp_avg"].clone()
    groups = [Group("ffn", 0, (0, 4)), Group("hidden", None, (2,))]
    prune_(model, shape, groups, optimizer=opt)
    keep_ffn = [i for i in range(before_gate.shape[0]) if i not in (0, 4)]
    keep_hid = [i for i in range(emb.shape[1] + 1) if i != 2]
    assert torch.equal(opt.state[gate]["exp_avg_sq"], before_gate[keep_ffn][:, keep_hid])
    assert torch.equal(opt.state[emb]["exp_avg"], before_emb[:, keep_hid])
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    for p in model.parameters():  # every state tensor matches its parameter
        for v in opt.state[p].values():
            if torch.is_tensor(v) and v.dim() > 0:
                assert v.shape == p.shape
    opt.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)


def test_layer_removal_drops_optimizer_params() -> None:
    model, shape = _hetero("mistral")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, shape.vocab_size, (1, 8))
    model(ids, labels=ids).loss.backward()
    opt.step()
    n_before = len(opt.param_groups[0]["params"])
    new_shape = prune_(model, shape, [Group("layer", 0)], optimizer=opt)
    assert new_shape.num_layers == shape.num_layers - 1
    assert len(opt.param_groups[0]["params"]) == n_before - 9  # 2 norms + q,k,v,o + 3 mlp
    assert [ly.self_attn.layer_idx for ly in model.model.layers] == list(
        range(new_shape.num_layers)
    )
    model(ids, labels=ids).loss.backward()
    opt.step()


def test_invalid_groups_are_refused() -> None:
    model, shape = _hetero("llama_gqa_tied")
    ly = shape.layers[0]
    bad = [
        Group("qhead", 0, (0,)),  # needs one head per KV group
        Group("qhead", 0, (0, 1)),  # head 1 is in KV group 0, not 1
        Group("ffn", 0, tuple(range(ly.intermediate_size))),  # empties the FFN
        Group("hidden", None, (shape.hidden_size,)),  # out of range
        Group("kvgroup", 9, (0,)),
    ]
    for g in bad:
        with pytest.raises(ValueError):
            prune_(model, shape, [g])
    assert sum(p.numel() for p in model.parameters()) == shape.num_params()  # nothing changed
