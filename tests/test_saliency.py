"""Unit saliency against a brute-force reference that masks every parameter explicitly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from efficientllm.errors import ConfigError
from efficientllm.pruning.saliency import (
    SaliencyAccumulator,
    UnitScores,
    compute_unit_scores,
    normalise,
    taylor_mix,
)
from tests.tiny import FAMILIES, tiny_model

RTOL = 1e-5


def backward(model: nn.Module, seed: int = 0, scale: float = 1.0) -> None:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), generator=gen)
    model.zero_grad(set_to_none=True)
    (scale * model(input_ids=ids, labels=ids).loss).backward()


def taylor_elems(model: nn.Module) -> dict[str, Tensor]:
    return {n: (p.detach().double() * p.grad.double()).abs() for n, p in model.named_parameters()}


def unit_mask(model: nn.Module, kind: str, layer: int, i: int) -> dict[str, Tensor]:
    """A 0/1 mask over every (deduplicated) parameter for one unit, written out by hand."""
    masks = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    pre = f"model.layers.{layer}."
    hd = model.model.layers[0].self_attn.head_dim
    rows = slice(i * hd, (i + 1) * hd)
    for n, m in masks.items():
        if kind == "layer":
            if n.startswith(pre):
                m.fill_(1)
        elif kind == "hidden":
            if n.endswith(("embed_tokens.weight", "lm_head.weight")):
                m[:, i] = 1
            elif n.endswith("layernorm.weight") or n == "model.norm.weight":
                m[i] = 1
            elif any(f"{k}_proj.weight" in n for k in ("q", "k", "v", "gate", "up")):
                m[:, i] = 1
            elif n.endswith(("o_proj.weight", "down_proj.weight")):
                m[i, :] = 1
            elif n.endswith(("o_proj.bias", "down_proj.bias")):
                m[i] = 1
        elif not n.startswith(pre):
            continue
        elif kind == "q":
            if "q_proj" in n:
                m[rows] = 1
            elif n.endswith("o_proj.weight"):
                m[:, rows] = 1
        elif kind == "kv":
            if "k_proj" in n or "v_proj" in n:
                m[rows] = 1
        elif kind == "ffn":
            if "gate_proj" in n or "up_proj" in n:
                m[i] = 1
            elif n.endswith("down_proj.weight"):
                m[:, i] = 1
    return masks


def reference(model: nn.Module, elems: dict[str, Tensor], kind: str, layer: int, i: int) -> float:
    masks = unit_mask(model, kind, layer, i)
    return float(sum((elems[n] * m).sum() for n, m in masks.items()))


def check_against_reference(model: nn.Module, us: UnitScores, elems: dict[str, Tensor]) -> None:
    def close(got: Tensor, kind: str, layer: int, i: int) -> None:
        want = reference(model, elems, kind, layer, i)
        assert got.dtype == torch.float32
        assert float(got) == pytest.approx(want, rel=RTOL), (kind, layer, i)

    layers = model.model.layers
    assert len(us.q_head) == len(layers) and us.layer.shape == (len(layers),)
    for li, blk in enumerate(layers):
        hd = blk.self_attn.head_dim
        assert us.q_head[li].shape == (blk.self_attn.q_proj.out_features // hd,)
        assert us.kv_head[li].shape == (blk.self_attn.k_proj.out_features // hd,)
        assert us.ffn[li].shape == (blk.mlp.gate_proj.out_features,)
        for kind, t in (("q", us.q_head[li]), ("kv", us.kv_head[li]), ("ffn", us.ffn[li])):
            for i in range(len(t)):
                close(t[i], kind, li, i)
        close(us.layer[li], "layer", li, 0)
    for c in range(len(us.hidden)):
        close(us.hidden[c], "hidden", 0, c)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_taylor1_matches_brute_force(family: str) -> None:
    model = tiny_model(family)
    backward(model)
    us = compute_unit_scores(model)
    check_against_reference(model, us, taylor_elems(model))


def test_tied_embedding_counted_once() -> None:
    model = tiny_model("llama_gqa_tied")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    backward(model)
    tied = compute_unit_scores(model).hidden
    emb = model.model.embed_tokens.weight
    once = (emb.detach() * emb.grad).abs().sum(0)
    # untie by hand with the same values and gradient: the embedding is then counted twice
    model.lm_head.weight = nn.Parameter(emb.detach().clone())
    model.lm_head.weight.grad = emb.grad.clone()
    untied = compute_unit_scores(model).hidden
    torch.testing.assert_close(untied - tied, once, rtol=1e-4, atol=1e-6)
    assert float(once.sum()) > 0


def test_heterogeneous_widths_match_brute_force() -> None:
    model = tiny_model("llama_gqa_tied")  # 6 q heads / 2 kv groups, head_dim 8, ffn 48
    blk = model.model.layers[1]
    hd, d = blk.self_attn.head_dim, model.config.hidden_size
    keep = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in (0, 1, 3, 4)])  # 2 per group
    q, o = blk.self_attn.q_proj, blk.self_attn.o_proj
    blk.self_attn.q_proj = nn.Linear(d, len(keep), bias=False)
    blk.self_attn.q_proj.weight.data = q.weight.data[keep].clone()
    blk.self_attn.o_proj = nn.Linear(len(keep), d, bias=False)
    blk.self_attn.o_proj.weight.data = o.weight.data[:, keep].clone()
    for name in ("gate_proj", "up_proj"):
        setattr(blk.mlp, name, nn.Linear(d, 40, bias=False))
    blk.mlp.down_proj = nn.Linear(40, d, bias=False)
    gen = torch.Generator().manual_seed(1)
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=gen)
    us = compute_unit_scores(model)
    assert us.widths() == [(6, 2, 48), (4, 2, 40), (6, 2, 48)]
    check_against_reference(model, us, taylor_elems(model))


def test_taylor_mix_adam_uses_exp_avg_sq() -> None:
    model = tiny_model("llama_mha")
    mlp = model.model.layers[0].mlp
    params = (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.95))
    # no optimizer state yet: falls back to g². A scaled loss makes ½·F·w² matter below.
    backward(model, seed=0, scale=1000.0)
    no_state = compute_unit_scores(model, scorer="taylor_mix", optimizer=opt, fisher="adam")
    grad2 = compute_unit_scores(model, scorer="taylor_mix", fisher="grad2")
    torch.testing.assert_close(no_state.ffn[0], grad2.ffn[0])
    g1 = [p.grad.clone() for p in params]
    opt.step()
    backward(model, seed=1)  # a different batch: g2 != g1
    torch.testing.assert_close(opt.state[params[0]]["exp_avg_sq"], 0.05 * g1[0] ** 2)
    us = compute_unit_scores(model, scorer="taylor_mix", optimizer=opt, fisher="adam")
    # by hand: F = exp_avg_sq / (1 - 0.95**1) = g1², s = |w·g2 − ½·F·w²|
    s = [
        (p.detach() * p.grad - 0.5 * g**2 * p.detach() ** 2).abs()
        for p, g in zip(params, g1, strict=True)
    ]
    want = s[0].sum(1) + s[1].sum(1) + s[2].sum(0)
    torch.testing.assert_close(us.ffn[0], want, rtol=RTOL, atol=1e-9)
    other = compute_unit_scores(model, scorer="taylor_mix", fisher="grad2").ffn[0]
    assert not torch.allclose(other, want, rtol=0.1)
    w, g = params[0].detach(), params[0].grad
    torch.testing.assert_close(taylor_mix(w, g), (w * g - 0.5 * g * g * w * w).abs())


def test_magnitude_and_random_need_no_grads() -> None:
    model = tiny_model("llama_bias")
    assert all(p.grad is None for p in model.parameters())
    us = compute_unit_scores(model, scorer="magnitude")
    elems = {n: p.detach().double().abs() for n, p in model.named_parameters()}
    check_against_reference(model, us, elems)

    def draw(seed: int) -> UnitScores:
        gen = torch.Generator().manual_seed(seed)
        return compute_unit_scores(model, scorer="random", generator=gen)

    a, b, c = draw(7), draw(7), draw(8)
    for x, y, z in zip(a.tensors(), b.tensors(), c.tensors(), strict=True):
        assert torch.equal(x, y)
        assert not torch.equal(x, z)


def test_bad_settings_raise() -> None:
    model = tiny_model("llama_mha")
    with pytest.raises(ConfigError):
        compute_unit_scores(model, scorer="taylor2")  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        compute_unit_scores(model, scorer="taylor_mix", fisher="adam")
    with pytest.raises(ConfigError):
        SaliencyAccumulator(mode="sum")  # type: ignore[arg-type]


def test_normalise() -> None:
    assert normalise(6.0, 3) == 2.0
    got = normalise(torch.tensor([6.0, 8.0]), torch.tensor([3, 2]))
    torch.testing.assert_close(got, torch.tensor([2.0, 4.0]))
    with pytest.raises(ValueError):
        normalise(1.0, 0)


def scores(k: float) -> UnitScores:
    """Layer widths (3,1,4) and (2,2,2), hidden 5, 2 layers; every entry ``k * (index + 1)``."""

    def a(n: int) -> Tensor:
        return k * torch.arange(1.0, n + 1)

    return UnitScores(
        q_head=[a(3), a(2)], kv_head=[a(1), a(2)], ffn=[a(4), a(2)], hidden=a(5), layer=a(2)
    )


def test_accumulator_window_and_ema_by_hand() -> None:
    win, ema = SaliencyAccumulator("window"), SaliencyAccumulator("ema", beta=0.5)
    with pytest.raises(RuntimeError):
        win.value()
    for k in (1.0, 2.0, 3.0):
        win.update(scores(k))
        ema.update(scores(k))
    assert win.steps == ema.steps == 3
    # window: (1 + 2 + 3) / 3 = 2
    for got, want in zip(win.value().tensors(), scores(2.0).tensors(), strict=True):
        torch.testing.assert_close(got, want)
    # ema: m3 = .125·1 + .25·2 + .5·3 = 2.125; bias-corrected by 1 − .5³ = .875
    for got, want in zip(ema.value().tensors(), scores(2.125 / 0.875).tensors(), strict=True):
        torch.testing.assert_close(got, want)
    win.reset()
    assert win.steps == 0
    win.update(scores(5.0))
    torch.testing.assert_close(win.value().hidden, scores(5.0).hidden)


def test_accumulator_follows_pruning() -> None:
    acc = SaliencyAccumulator("window")
    acc.update(scores(1.0))
    acc.update(scores(3.0))  # mean = scores(2)
    acc.select_heads_(0, torch.tensor([2, 0]), torch.tensor([0]))
    acc.select_ffn_(0, torch.tensor([1, 3]))
    acc.select_hidden_(torch.tensor([True, False, True, False, True]))
    v = acc.value()
    assert v.q_head[0].tolist() == [6.0, 2.0] and v.kv_head[0].tolist() == [2.0]
    assert v.ffn[0].tolist() == [4.0, 8.0] and v.hidden.tolist() == [2.0, 6.0, 10.0]
    acc.remove_layer_(0)
    v = acc.value()
    assert v.widths() == [(2, 2, 2)] and v.layer.tolist() == [4.0]
    with pytest.raises(ValueError):
        acc.update(scores(1.0))  # stale widths
    new = UnitScores(
        q_head=[torch.ones(2)],
        kv_head=[torch.ones(2)],
        ffn=[torch.ones(2)],
        hidden=torch.ones(3),
        layer=torch.ones(1),
    )
    acc.update(new)
    assert acc.steps == 3
    assert acc.value().hidden.tolist() == pytest.approx([5 / 3, 13 / 3, 21 / 3])


@pytest.mark.parametrize("mode", ["window", "ema"])
def test_state_dict_safetensors_roundtrip(mode: str, tmp_path) -> None:
    acc = SaliencyAccumulator(mode, beta=0.8)  # type: ignore[arg-type]
    for k in (1.0, 4.0):
        acc.update(scores(k))
    acc.select_ffn_(1, torch.tensor([1]))  # per-layer widths now differ
    path = tmp_path / "sal.safetensors"
    save_file(acc.state_dict(), str(path))
    back = SaliencyAccumulator()  # different settings: the checkpoint wins
    back.load_state_dict(load_file(str(path)))
    assert (back.mode, back.beta, back.steps) == (mode, 0.8, 2)
    for x, y in zip(acc.value().tensors(), back.value().tensors(), strict=True):
        assert torch.equal(x, y)
    assert back.state_dict().keys() == acc.state_dict().keys()
    empty = SaliencyAccumulator("ema")
    again = SaliencyAccumulator()
    again.load_state_dict(empty.state_dict())
    assert again.steps == 0 and again.mode == "ema"
