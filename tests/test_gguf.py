"""GGUF export checked against a real runtime (llama.cpp through llama-cpp-python, extra
``gguf``, installed by ``scripts/dev setup``): tiny heterogeneous models give the PyTorch logits,
the pruned demo model generates the PyTorch greedy tokens, Q8_0 and K-quants load and generate,
and what llama.cpp cannot represent is refused with ``ExportError``.

Tolerances (stated, measured on these models): f32 weights with an f32 KV cache agree with
PyTorch fp32 to max |logits diff| <= 1e-4 * (1 + max |logits|); f16 to 2e-2 of the logits'
range; Q8_0 to 5e-2 of the range and >= 75% top-1 agreement with PyTorch on 64 positions of
the pruned, untrained demo model (measured 84%; its next-token margins are small).
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from tiny import tiny_model, tiny_tokenizer

from efficientllm.errors import ExportError
from efficientllm.export.gguf import export_gguf, gguf_blockers
from efficientllm.export.llamacpp import gguf_logits, greedy_gguf, load_gguf, quantize_gguf
from efficientllm.model_io import shape_from_config
from efficientllm.modeling import EfficientLLMForCausalLM
from efficientllm.pruning.groups import Group
from efficientllm.pruning.prune import prune_

F32_TOL = 1e-4
IDS = [int(x) for x in torch.randint(3, 96, (24,), generator=torch.Generator().manual_seed(3))]


def pruned_tiny(name: str, n_hidden: int = 8, **overrides: object) -> EfficientLLMForCausalLM:
    """A tiny family model pruned heterogeneously: a KV group removed in layer 0, one query head
    per KV group (MHA: one head) in layer 1, FFN channels in layer 2, and ``n_hidden`` hidden
    channels everywhere."""
    model = EfficientLLMForCausalLM.from_family(tiny_model(name, **overrides)).eval()
    shape = shape_from_config(model.config.to_dict())
    ly1 = shape.layers[1]
    if ly1.heads_per_group > 1:  # GQA: one query head from each KV group
        layer1 = Group(
            "qhead", 1, tuple(kv * ly1.heads_per_group for kv in range(ly1.num_kv_heads))
        )
    else:  # MHA: a whole KV group
        layer1 = Group("kvgroup", 1, (0,))
    groups = [
        layer1,
        Group("ffn", 2, tuple(range(0, 40, 2))),
        Group("hidden", None, tuple(range(1, 2 * n_hidden + 1, 2))),
    ]
    if shape.layers[0].num_kv_heads > 1:
        groups.append(Group("kvgroup", 0, (shape.layers[0].num_kv_heads - 1,)))
    with torch.no_grad():
        prune_(model, shape, groups)
    return model


def torch_logits(model: EfficientLLMForCausalLM, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]), use_cache=False).logits[0].float().numpy()


def arch_of(path) -> str:
    return str(gguf.GGUFReader(path).fields["general.architecture"].contents())


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer(96)


FAMILIES = ["llama_gqa_tied", "llama_mha", "llama_bias", "qwen2", "mistral"]
WIDE = dict(hidden_size=96, intermediate_size=64)  # pruned by 32 hidden: 64, Q8_0 rows fit


@pytest.mark.parametrize("name", FAMILIES)
def test_heterogeneous_f32_logits_match_pytorch(name, tok, tmp_path) -> None:
    model = pruned_tiny(name, n_hidden=32, **WIDE)
    cfg = model.config
    assert not cfg.is_uniform and cfg.hidden_size == 64
    assert cfg.hidden_size != cfg.num_attention_heads * cfg.head_dim  # key_length is needed
    path = export_gguf(model, tok, tmp_path / "m.gguf", dtype="f32")
    assert arch_of(path) == "deci"
    llm = load_gguf(path, n_ctx=64, logits_all=True, f32_cache=True)
    ref, got = torch_logits(model, IDS), gguf_logits(llm, IDS)
    diff = float(np.abs(got - ref).max())
    assert diff <= F32_TOL * (1 + float(np.abs(ref).max())), diff


def test_uneven_hidden_width_and_dropped_layer(tok, tmp_path) -> None:
    """Hidden 48 -> 40 (not a multiple of 32 or of the heads), a layer removed: deci, f32."""
    model = pruned_tiny("llama_gqa_tied")
    assert model.config.hidden_size == 40
    with torch.no_grad():
        prune_(model, shape_from_config(model.config.to_dict()), [Group("layer", 1)])
    path = export_gguf(model, tok, tmp_path / "m.gguf", dtype="f32")
    llm = load_gguf(path, n_ctx=64, logits_all=True, f32_cache=True)
    ref = torch_logits(model, IDS)
    assert np.abs(gguf_logits(llm, IDS) - ref).max() <= F32_TOL * (1 + np.abs(ref).max())


def test_uniform_shape_is_llama(tok, tmp_path) -> None:
    model = EfficientLLMForCausalLM.from_family(tiny_model("llama_gqa_tied", **WIDE)).eval()
    shape = shape_from_config(model.config.to_dict())
    groups = [Group("ffn", i, tuple(range(8))) for i in range(3)]
    with torch.no_grad():  # the same groups in every layer: uniform, hidden 64
        prune_(model, shape, [*groups, Group("hidden", None, tuple(range(32)))])
    path = export_gguf(model, tok, tmp_path / "u.gguf", dtype="f32")
    assert arch_of(path) == "llama"
    assert arch_of(export_gguf(model, tok, tmp_path / "d.gguf", arch="deci")) == "deci"
    llm = load_gguf(path, n_ctx=64, logits_all=True, f32_cache=True)
    ref = torch_logits(model, IDS)
    assert np.abs(gguf_logits(llm, IDS) - ref).max() <= F32_TOL * (1 + np.abs(ref).max())


def test_llama3_rope_scaling(tok, tmp_path) -> None:
    rope = dict(
        rope_type="llama3",
        rope_theta=500000.0,
        factor=8.0,
        low_freq_factor=1.0,
        high_freq_factor=4.0,
        original_max_position_embeddings=16,
    )
    model = pruned_tiny("llama_gqa_tied", n_hidden=32, rope_parameters=rope, **WIDE)
    path = export_gguf(model, tok, tmp_path / "m.gguf", dtype="f32")
    llm = load_gguf(path, n_ctx=64, logits_all=True, f32_cache=True)
    ref = torch_logits(model, IDS)
    assert np.abs(gguf_logits(llm, IDS) - ref).max() <= F32_TOL * (1 + np.abs(ref).max())


@pytest.mark.parametrize(("dtype", "rel_tol"), [("f16", 2e-2), ("q8_0", 5e-2)])
def test_f16_and_q8_0_close(dtype, rel_tol, tok, tmp_path) -> None:
    model = pruned_tiny("llama_gqa_tied", n_hidden=32, **WIDE)
    path = export_gguf(model, tok, tmp_path / f"m-{dtype}.gguf", dtype=dtype)
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == dtype.upper()  # rows of 64: Q8_0 blocks fit
    if dtype == "q8_0":
        assert types["blk.0.attn_output.weight"] == "F16"  # rows of 24: stays f16
    # llama.cpp's AMX/repacked Q8_0 kernels crash on these tiny widths: plain CPU buffers
    llm = load_gguf(path, n_ctx=64, logits_all=True, extra_buffers=False)
    ref = torch_logits(model, IDS)
    diff = np.abs(gguf_logits(llm, IDS) - ref).max()
    assert diff <= rel_tol * float(ref.max() - ref.min()), diff


def test_what_llama_cpp_cannot_run_is_refused(tok, tmp_path) -> None:
    qwen3 = EfficientLLMForCausalLM.from_family(tiny_model("qwen3"))
    with pytest.raises(ExportError, match="q/k RMSNorm"):
        export_gguf(qwen3, tok, tmp_path / "q.gguf")
    slide = EfficientLLMForCausalLM.from_family(tiny_model("mistral", sliding_window=16))
    assert any("sliding" in why for why in gguf_blockers(slide))
    hetero = pruned_tiny("llama_gqa_tied")
    with pytest.raises(ExportError, match="deci"):
        export_gguf(hetero, tok, tmp_path / "l.gguf", arch="llama")
    with pytest.raises(ExportError, match="dtype"):
        export_gguf(hetero, tok, tmp_path / "x.gguf", dtype="q4_0")  # type: ignore[arg-type]
    with pytest.raises(ExportError, match="tokenizer"):
        export_gguf(hetero, None, tmp_path / "t.gguf")
    hetero.config.layer_intermediate_size[1] = 0  # an FFN-free layer with attention
    assert any("FFN-free" in why for why in gguf_blockers(hetero))
    assert not list(tmp_path.iterdir())  # nothing half-written


# ---- the real demo model (SmolLM2-135M, one-shot pruned to 50%, heterogeneous) ----------------
PROMPT = "It was a fine morning in the village, and Mr. Knightley walked to"


@pytest.fixture(scope="module")
def pruned_demo(demo_model_dir, austen):
    from efficientllm.model_io import load_model, load_tokenizer
    from efficientllm.pruning.oneshot import prune_oneshot_

    model, tokenizer = load_model(demo_model_dir), load_tokenizer(demo_model_dir)
    text = austen["Emma"].read_text(encoding="utf-8")[20_000:40_000]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    batches = [torch.tensor([ids[i * 128 : (i + 1) * 128]]) for i in range(2)]
    budget = sum(p.numel() for p in model.parameters()) // 2
    prune_oneshot_(model, batches, budget=budget, granularity="global")
    assert not model.config.is_uniform
    return model.eval(), tokenizer, ids[4000:4064]


@pytest.fixture(scope="module")
def demo_gguf(pruned_demo, tmp_path_factory):
    model, tokenizer, _ = pruned_demo
    root = tmp_path_factory.mktemp("demo-gguf")
    return {
        d: export_gguf(model, tokenizer, root / f"demo-{d}.gguf", dtype=d) for d in ("f32", "q8_0")
    }


@pytest.mark.real
def test_demo_greedy_generation_matches_pytorch(pruned_demo, demo_gguf) -> None:
    model, tokenizer, _ = pruned_demo
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        ref = model.generate(
            torch.tensor([prompt]), max_new_tokens=16, do_sample=False, pad_token_id=0
        )[0, len(prompt) :].tolist()
    llm = load_gguf(demo_gguf["f32"], n_ctx=128, f32_cache=True)
    assert llm.tokenize(PROMPT.encode(), add_bos=False, special=False) == prompt
    assert greedy_gguf(llm, prompt, 16) == ref
    text = llm.detokenize(greedy_gguf(llm, prompt, 16)).decode("utf-8", "replace")
    assert text == tokenizer.decode(ref)


@pytest.mark.real
def test_demo_q8_0_and_k_quant_agree_top1(pruned_demo, demo_gguf, tmp_path) -> None:
    model, _, ids = pruned_demo
    ref = torch_logits(model, ids).argmax(-1)
    q8 = load_gguf(demo_gguf["q8_0"], n_ctx=128, logits_all=True)
    agree = float((gguf_logits(q8, ids).argmax(-1) == ref).mean())
    assert agree >= 0.75, agree
    q4 = quantize_gguf(demo_gguf["f32"], tmp_path / "demo-q4_k_m.gguf", "q4_k_m")
    assert q4.stat().st_size < demo_gguf["q8_0"].stat().st_size
    k = load_gguf(q4, n_ctx=128, logits_all=True)
    assert float((gguf_logits(k, ids).argmax(-1) == ref).mean()) >= 0.6
    assert len(greedy_gguf(k, ids[:8], 8)) == 8


def test_global_run_writes_gguf_and_the_cli_exports_it(tmp_path) -> None:
    """A tiny pruning-aware ``global`` run writes its Q8_0 GGUF beside the export; the CLI
    (``efficientllm export --format gguf``) writes f32 from the run folder. Both load in
    llama.cpp: f32 logits equal the reloaded export's to F32_TOL, Q8_0 within 5e-2 of the
    logits' range; both generate, f32 the PyTorch greedy tokens."""
    import json

    from tiny import save_tiny_corpus, save_tiny_source
    from typer.testing import CliRunner

    from efficientllm.cli import app
    from efficientllm.export import load_exported
    from efficientllm.model_io import load_tokenizer

    src = save_tiny_source(tmp_path / "src", "llama_gqa_tied", **WIDE)
    docs = save_tiny_corpus(tmp_path / "corpus", n_docs=3)
    out = tmp_path / "run"
    runner = CliRunner()
    args = ["run", "--preset", "tiny-debug", "--model", str(src), "--out", str(out), "--quiet"]
    args += ["--granularity", "global", "--export.gguf", "q8_0"]
    res = runner.invoke(app, [*args, *[a for d in docs for a in ("--data", str(d))]])
    assert res.exit_code == 0, res.output
    q8 = out / "gguf" / "model-q8_0.gguf"
    exported = [json.loads(x) for x in (out / "events.jsonl").read_text().splitlines()]
    exported = [e for e in exported if e["type"] == "exported"]
    assert exported[-1]["gguf"] == str(q8.resolve()) and exported[-1]["gguf_note"] is None

    res = runner.invoke(
        app, ["export", "--model", str(out), "--type", "f32", "-o", str(tmp_path / "f32.gguf")]
    )
    assert res.exit_code == 0, res.output
    f32 = tmp_path / "f32.gguf"
    model = load_exported(out / "export", dtype=torch.float32).eval()
    assert not model.config.is_uniform  # a heterogeneous shape: llama.cpp's deci
    assert arch_of(f32) == "deci" and arch_of(q8) == "deci"

    ref = torch_logits(model, IDS)
    llm = load_gguf(f32, n_ctx=64, logits_all=True, f32_cache=True)
    diff = float(np.abs(gguf_logits(llm, IDS) - ref).max())
    assert diff <= F32_TOL * (1 + float(np.abs(ref).max())), diff
    with torch.no_grad():
        greedy = model.generate(
            torch.tensor([IDS[:8]]), max_new_tokens=8, do_sample=False, pad_token_id=0
        )[0, 8:].tolist()
    assert greedy_gguf(llm, IDS[:8], 8) == greedy
    text = llm.detokenize(greedy).decode("utf-8", "replace")
    assert text == load_tokenizer(out / "export").decode(greedy)

    q8_llm = load_gguf(q8, n_ctx=64, logits_all=True, extra_buffers=False)
    diff = float(np.abs(gguf_logits(q8_llm, IDS) - ref).max())
    assert diff <= 5e-2 * float(ref.max() - ref.min()), diff
    assert len(greedy_gguf(q8_llm, IDS[:8], 8)) == 8


def test_cli_export_refuses_a_folder_without_a_model(tmp_path) -> None:
    from typer.testing import CliRunner

    from efficientllm.cli import app

    res = CliRunner().invoke(app, ["export", "--model", str(tmp_path)])
    assert res.exit_code == 2
    assert "neither a model folder" in res.output and "Traceback" not in res.output
