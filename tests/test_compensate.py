"""Variant B (OBS compensation): local optimality per consumer, end-to-end gain, hook hygiene."""

from __future__ import annotations

import copy
import random

import pytest
import torch
from tiny import tiny_model

from efficientllm.model_io import shape_from_config
from efficientllm.modeling import EfficientLLMForCausalLM
from efficientllm.pruning.compensate import Compensator, obs_transfer
from efficientllm.pruning.decide import Drops
from efficientllm.pruning.groups import head_rows
from efficientllm.pruning.prune import apply_drops_


def _model(family: str, seed: int = 0):
    model = EfficientLLMForCausalLM.from_family(tiny_model(family, seed=seed)).eval()
    return model, shape_from_config(model.config.to_dict())


def _ids(vocab: int, batch: int = 4, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def _record(model, ids, comps: list[Compensator], modules: dict[str, torch.nn.Linear]):
    """One training-style forward (grad enabled): H accumulates, and each input X is kept."""
    seen: dict[str, torch.Tensor] = {}
    handles = [
        m.register_forward_pre_hook(
            lambda _m, a, n=n: seen.__setitem__(n, a[0].detach().reshape(-1, a[0].shape[-1]))
        )
        for n, m in modules.items()
    ]
    for comp in comps:
        comp.attach(model)
    model(ids)
    for comp in comps:
        comp.detach()
    for h in handles:
        h.remove()
    return seen


def _err(x: torch.Tensor, w: torch.Tensor, w_r: torch.Tensor, keep: list[int]) -> float:
    x = x.double()
    return float((x @ w.double().T - x[:, keep] @ w_r.double().T).pow(2).sum())


# (name, drops, layer, consumers, removed columns) on llama_gqa_tied: 6 heads, 2 KV, hd 8, I=48.
CASES = {
    "ffn": (Drops(ffn={1: {0, 5, 17, 30}}), 1, ["mlp.down_proj"], [0, 5, 17, 30]),
    "qhead": (Drops(q={0: {0, 3}}), 0, ["self_attn.o_proj"], list(head_rows([0, 3], 8))),
    "kvgroup": (
        Drops(kv={2: {1}}, q={2: {3, 4, 5}}),
        2,
        ["self_attn.o_proj"],
        list(head_rows([3, 4, 5], 8)),
    ),
    "hidden": (
        Drops(hidden={2, 9, 20, 33}),
        1,
        [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ],
        [2, 9, 20, 33],
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_consumer_error_shrinks_and_matches_least_squares(case: str) -> None:
    drops, li, names, cols = CASES[case]
    base, shape = _model("llama_gqa_tied")
    ids = _ids(shape.vocab_size)  # 96 tokens > 48 input columns: X has full column rank
    # (q/k/v share q_proj's H and gate/up gate_proj's; every consumer's own input is recorded)
    runs = {  # name -> (H dtype, damping)
        "f32 λ=0.01": (torch.float32, 0.01),
        "f32 λ=0": (torch.float32, 0.0),
        "f64 λ=0": (torch.float64, 0.0),
    }
    weights: dict[str, dict[str, torch.Tensor]] = {}
    xs: dict[str, torch.Tensor] = {}
    for run, (dtype, damp) in runs.items():
        model = copy.deepcopy(base)
        layer = model.model.layers[li]
        comp = Compensator(dtype=dtype)
        xs = _record(model, ids, [comp], {n: layer.get_submodule(n) for n in names})
        done = comp.compensate_(model, drops, damp=damp)
        assert {f"model.layers.{li}.{n}" for n in names} <= set(done)
        assert len(done) == (3 * len(names) if drops.hidden else len(names))
        weights[run] = {n: layer.get_submodule(n).weight.detach() for n in names}
    for n in names:
        x = xs[n].double()
        w = base.model.layers[li].get_submodule(n).weight.detach().double()
        keep = [c for c in range(w.shape[1]) if c not in cols]
        w_lsq = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T
        plain, optimum = _err(x, w, w[:, keep], keep), _err(x, w, w_lsq, keep)
        err = {run: _err(x, w, weights[run][n][:, keep], keep) for run in runs}
        gap = {run: abs(e - optimum) / optimum for run, e in err.items()}
        w_rel = {
            run: float((weights[run][n][:, keep].double() - w_lsq).norm() / w_lsq.norm())
            for run in runs
        }
        assert torch.equal(weights["f32 λ=0.01"][n][:, cols], w[:, cols].float())  # Q untouched
        assert err["f32 λ=0.01"] < plain
        assert err["f32 λ=0"] <= err["f32 λ=0.01"] * (1 + 1e-9)
        cond = float(torch.linalg.cond(x[:, keep]))
        print(
            f"\n[{case}] {n}: cond(X_R) {cond:.0f}; err/plain {err['f32 λ=0.01'] / plain:.4f} "
            f"(λ=0.01), {optimum / plain:.4f} (lstsq); λ=0 vs lstsq: err gap "
            f"f32 {gap['f32 λ=0']:.1e} f64 {gap['f64 λ=0']:.1e}, weights rel "
            f"f32 {w_rel['f32 λ=0']:.1e} f64 {w_rel['f64 λ=0']:.1e}"
        )
        assert gap["f64 λ=0"] < 1e-9 and w_rel["f64 λ=0"] < 1e-6  # the formula is the optimum
        # float32 H: exact up to cond(X)²·eps (the o_proj inputs have cond(X) ~ 1e3 here)
        assert gap["f32 λ=0"] < (1e-4 if cond < 100 else 1e-3)
        if cond < 100:
            assert w_rel["f32 λ=0"] < 1e-4


def test_solve_equals_obs_formula() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 30, generator=g, dtype=torch.float64)
    h = x.T @ x
    q, damp = [1, 7, 8, 22], 0.01
    r = [i for i in range(30) if i not in q]
    hinv = torch.linalg.inv(h + damp * h.diagonal().mean() * torch.eye(30, dtype=torch.float64))
    literal = torch.linalg.inv(hinv[q][:, q]) @ hinv[q][:, r]  # ΔW[:,R] = −W[:,Q] · this
    assert torch.allclose(obs_transfer(h, q, damp), -literal, rtol=1e-9, atol=1e-11)
    assert obs_transfer(torch.zeros(5, 5), [0]) is None


def _mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).pow(2).mean())


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama_gqa_tied", "qwen2"])
@pytest.mark.parametrize("kind", ["ffn", "hidden", "qhead"])
def test_end_to_end_logits_closer_with_compensation(family: str, kind: str) -> None:
    base, shape = _model(family)
    ids = _ids(shape.vocab_size, batch=4, length=32)
    ref = _logits(base, ids)
    rng = random.Random(0)
    if kind == "ffn":
        drops = Drops(ffn={i: set(rng.sample(range(ly.intermediate_size), 12)) for i, ly in
                           enumerate(shape.layers)})  # fmt: skip
    elif kind == "hidden":
        drops = Drops(hidden=set(rng.sample(range(shape.hidden_size), 6)))
    else:  # one query head per KV group (6 heads, 2 KV groups of 3) in every layer
        heads = [{rng.randrange(3), 3 + rng.randrange(3)} for _ in range(shape.num_layers)]
        drops = Drops(q=dict(enumerate(heads)))
    plain = copy.deepcopy(base)
    apply_drops_(plain, shape, drops)
    comp_model = copy.deepcopy(base)
    comp = Compensator()
    comp.attach(comp_model)
    comp_model(ids)  # calibration forward with grad enabled (as in training)
    comp.detach()
    assert comp.compensate_(comp_model, drops)
    apply_drops_(comp_model, shape, drops)
    e_plain, e_comp = _mse(_logits(plain, ids), ref), _mse(_logits(comp_model, ids), ref)
    print(f"\n[{family} {kind}] logits MSE plain {e_plain:.3e} comp {e_comp:.3e} "
          f"ratio {e_comp / e_plain:.3f}")  # fmt: skip
    assert e_comp < e_plain


def test_hooks_detach_and_no_grad() -> None:
    model, shape = _model("qwen2")
    ids = _ids(shape.vocab_size, batch=2, length=10)
    n_hooks = sum(len(m._forward_pre_hooks) for m in model.modules())
    ref = _logits(model, ids)
    comp = Compensator()
    comp.attach(model)
    with pytest.raises(RuntimeError):
        comp.attach(model)
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == n_hooks + 4 * 3
    down = model.model.layers[0].mlp.down_proj
    assert torch.equal(_logits(model, ids), ref)  # no_grad: nothing recorded, output unchanged
    assert comp.stat(down) == (None, 0)
    with torch.inference_mode():
        model(ids)
    assert comp.stat(down) == (None, 0)
    assert torch.equal(model(ids).logits.detach(), ref)  # recording never changes the output
    h, tokens = comp.stat(down)
    assert tokens == 20 and h.shape == (48, 48) and h.dtype == torch.float32
    comp.detach()
    assert sum(len(m._forward_pre_hooks) for m in model.modules()) == n_hooks
    model(ids)
    assert comp.stat(down)[1] == 20  # detached: no more accumulation
    comp.reset()
    assert comp.stat(down) == (None, 0)
    assert comp.compensate_(model, Drops(ffn={0: {1}})) == []  # nothing recorded: left alone


def test_select_follows_widths_for_repeated_removals() -> None:
    model, shape = _model("llama_gqa_tied")
    ids = _ids(shape.vocab_size)
    comp = Compensator()
    comp.attach(model)
    model(ids)
    # the last layer: removals there do not change any other tracked input
    first = Drops(ffn={2: {3, 4}}, q={2: {1, 4}})
    comp.compensate_(model, first)
    shape = apply_drops_(model, shape, first)
    comp.select_(model, first)
    comp.detach()
    fresh = Compensator()
    fresh.attach(model)
    model(ids)
    fresh.detach()
    last = model.model.layers[2]
    for m in (last.mlp.down_proj, last.self_attn.o_proj):
        h_sel, h_new = comp.stat(m)[0], fresh.stat(m)[0]
        assert h_sel.shape == (m.in_features, m.in_features)
        assert torch.allclose(h_sel, h_new, rtol=1e-4, atol=1e-3)
    # second removal in the same event: heterogeneous widths, plus a dropped layer
    second = Drops(ffn={0: {0}, 2: {0}}, hidden={5}, layers={1})
    done = comp.compensate_(model, second)
    assert "model.layers.2.mlp.down_proj" in done and "model.layers.1.mlp.down_proj" not in done
    assert "model.layers.0.self_attn.v_proj" in done
    shape = apply_drops_(model, shape, second)
    comp.select_(model, second)
    assert len(model.model.layers) == 2
    for layer in model.model.layers:
        for m in (layer.self_attn.q_proj, layer.mlp.down_proj):
            h = comp.stat(m)[0]
            assert h is not None and h.shape == (m.in_features, m.in_features)
