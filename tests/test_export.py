"""Exports reload to the same logits: locally, through remote code without efficientllm, and as a
vanilla family model; writes are atomic and contain no pickle files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_modeling import IDS, LayerPlan, hetero_model, max_diff, shrink_, uniform_model
from tiny import tiny_model
from transformers import AutoModelForCausalLM

from efficientllm.errors import ExportError
from efficientllm.export import AUTO_MAP, export_model, load_exported
from efficientllm.modeling import EfficientLLMForCausalLM

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")

# Runs in a clean interpreter where `import efficientllm` fails; writes logits as safetensors.
CLEAN_LOADER = textwrap.dedent(
    """
    import json, sys
    sys.modules["efficientllm"] = None
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    jobs = json.loads(sys.argv[1])
    ids = load_file(sys.argv[2])["ids"]
    out, meta = {}, {}
    for key, path, trust in jobs:
        model = AutoModelForCausalLM.from_pretrained(
            path, trust_remote_code=trust, use_safetensors=True
        ).eval()
        with torch.no_grad():
            out[key] = model(ids).logits.contiguous()
            gen = model.generate(ids[:, :4], attention_mask=torch.ones_like(ids[:, :4]),
                                 max_new_tokens=4, do_sample=False, pad_token_id=0)
        out[key + ".gen"] = gen.contiguous()
        meta[key] = {"cls": type(model).__name__, "module": type(model).__module__}
    save_file(out, sys.argv[3], metadata={"meta": json.dumps(meta)})
    """
)


def _files(path: Path) -> list[str]:
    return sorted(p.name for p in path.rglob("*") if p.is_file())


def _no_pickles(path: Path) -> None:
    assert not [f for f in _files(path) if f.endswith(PICKLE_SUFFIXES)]


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """A heterogeneous and a uniform export, with the in-memory logits and generations."""
    root = tmp_path_factory.mktemp("exports")
    hetero, uniform = hetero_model("llama_gqa_tied"), uniform_model("llama_mha")
    res = {
        "hetero": export_model(hetero, root / "hetero"),
        "uniform": export_model(uniform, root / "uniform"),
    }
    with torch.no_grad():
        ref = {"hetero": hetero(IDS).logits, "uniform": uniform(IDS).logits}
    return {
        "root": root,
        "res": res,
        "ref": ref,
        "models": {"hetero": hetero, "uniform": uniform},
    }


@pytest.fixture(scope="module")
def clean_run(exports: dict, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, dict]:
    """Load both exports in one subprocess that cannot import efficientllm."""
    work = tmp_path_factory.mktemp("clean")
    save_file({"ids": IDS.contiguous()}, str(work / "ids.safetensors"))
    jobs = [
        ["hetero", str(exports["res"]["hetero"].path), True],
        ["uniform", str(exports["res"]["uniform"].path), False],
    ]
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(work / "hf_modules"),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PYTHONPATH": "",
    }
    out = work / "out.safetensors"
    args = [
        sys.executable,
        "-c",
        CLEAN_LOADER,
        json.dumps(jobs),
        str(work / "ids.safetensors"),
    ]
    proc = subprocess.run(
        [*args, str(out)],
        check=False,
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    return load_file(str(out)), meta


def test_auto_picks_formats(exports: dict) -> None:
    res = exports["res"]
    assert res["hetero"].fmt == "efficientllm" and res["uniform"].fmt == "family"
    for key in ("hetero", "uniform"):
        r = res[key]
        assert r.max_abs_diff is not None and r.max_abs_diff <= 1e-5
        assert r.num_params == sum(p.numel() for p in exports["models"][key].parameters())
        assert (r.path / "model.safetensors").exists()
        _no_pickles(r.path)
        assert not [p for p in exports["root"].iterdir() if p.name.startswith(".")]
    cfg = json.loads((res["hetero"].path / "config.json").read_text())
    assert cfg["model_type"] == "efficientllm" and cfg["auto_map"] == AUTO_MAP
    assert cfg["hidden_size"] == 40 and cfg["layer_num_attention_heads"] == [3, 1]
    assert (res["hetero"].path / "modeling_efficientllm.py").exists()
    ucfg = json.loads((res["uniform"].path / "config.json").read_text())
    assert ucfg["model_type"] == "llama" and "auto_map" not in ucfg
    assert ucfg["architectures"] == ["LlamaForCausalLM"]
    assert (
        ucfg["num_attention_heads"],
        ucfg["num_hidden_layers"],
        ucfg["hidden_size"],
    ) == (2, 2, 40)


@pytest.mark.parametrize("trust", [None, False])
@torch.no_grad()
def test_local_load_uses_registered_class(exports: dict, trust: bool | None) -> None:
    path = exports["res"]["hetero"].path
    kw = {} if trust is None else {"trust_remote_code": trust}
    model = AutoModelForCausalLM.from_pretrained(path, **kw).eval()
    assert type(model) is EfficientLLMForCausalLM
    assert max_diff(model(IDS).logits, exports["ref"]["hetero"]) <= 1e-5
    gen = model.generate(IDS[:, :4], attention_mask=torch.ones_like(IDS[:, :4]), max_new_tokens=4)
    assert gen.shape == (2, 8)
    uniform = load_exported(exports["res"]["uniform"].path).eval()
    assert type(uniform).__name__ == "LlamaForCausalLM"
    assert max_diff(uniform(IDS).logits, exports["ref"]["uniform"]) <= 1e-5


def test_remote_code_load_without_efficientllm(exports: dict, clean_run: tuple) -> None:
    out, meta = clean_run
    assert meta["hetero"]["cls"] == "EfficientLLMForCausalLM"
    assert not meta["hetero"]["module"].startswith("efficientllm")
    assert max_diff(out["hetero"], exports["ref"]["hetero"]) <= 1e-5
    assert out["hetero.gen"].shape == (2, 8)


def test_family_export_loads_in_vanilla_transformers(exports: dict, clean_run: tuple) -> None:
    out, meta = clean_run
    assert meta["uniform"] == {
        "cls": "LlamaForCausalLM",
        "module": "transformers.models.llama.modeling_llama",
    }
    assert max_diff(out["uniform"], exports["ref"]["uniform"]) <= 1e-5
    assert out["uniform.gen"].shape == (2, 8)


def test_family_format_refused_when_impossible(tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="different widths"):
        export_model(hetero_model(), tmp_path / "x", fmt="family")
    qwen = uniform_model("qwen3")
    for ly in qwen.model.layers:
        ly.self_attn.q_norm.variance_epsilon = ly.self_attn.k_norm.variance_epsilon = 1e-3
    from efficientllm.modeling import sync_config_

    sync_config_(qwen)
    with pytest.raises(ExportError, match="eps"):
        export_model(qwen, tmp_path / "q", fmt="family", verify=False)
    assert export_model(qwen, tmp_path / "q").fmt == "efficientllm"
    assert not (tmp_path / "x").exists()
    # uniform, but hidden 40 with 3 heads: Qwen2Config itself would accept it and derive head_dim 13
    qwen2 = EfficientLLMForCausalLM.from_family(tiny_model("qwen2")).eval()
    shrink_(qwen2, hidden=40, plans=[LayerPlan([0], 3, 30)] * 3, drop_layer=None, eps=1e-6)
    with pytest.raises(ExportError, match="not a multiple"):
        export_model(qwen2, tmp_path / "q2", fmt="family")
    assert export_model(qwen2, tmp_path / "q2").fmt == "efficientllm"


def test_family_model_input_and_explicit_efficientllm(tmp_path: Path) -> None:
    """A vanilla family model is wrapped; fmt='efficientllm' works for uniform shapes too."""
    fam = tiny_model("qwen2")
    res = export_model(fam, tmp_path / "q2", fmt="efficientllm")
    assert res.fmt == "efficientllm" and res.max_abs_diff <= 1e-5
    assert type(load_exported(res.path)) is EfficientLLMForCausalLM


def test_atomic_writes_and_extras(tmp_path: Path) -> None:
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    model = hetero_model()
    vocab = {f"w{i}": i for i in range(96)}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="w0")), unk_token="w0"
    )
    out = tmp_path / "exp"
    with pytest.raises(ExportError, match="pickle"):
        export_model(model, out, extra_files={"weights.bin": b"x"}, verify=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []

    res = export_model(model, out, tokenizer=tok, extra_files={"README.md": "# tiny\n"})
    assert (out / "README.md").read_text() == "# tiny\n"
    assert AutoTokenizer.from_pretrained(out).convert_tokens_to_ids("w5") == 5
    _no_pickles(out)
    assert res.path == out.resolve()
    # re-export replaces the old folder in one step; stale files disappear
    export_model(model, out, verify=False)
    assert not (out / "README.md").exists() and (out / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]
    # a non-export folder is never replaced
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not a model export"):
        export_model(model, other, verify=False)
    assert (other / "keep.txt").read_text() == "mine"
