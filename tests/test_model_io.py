"""Vetting of model sources: hub ids by the hub's rules, no path tricks, no remote code."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from efficientllm.errors import ModelNotFoundError, UnsupportedArchitectureError
from efficientllm.model_io import check_config, is_valid_hub_id, load_config_dict, resolve


@pytest.mark.parametrize(
    "good",
    [
        "HuggingFaceTB/SmolLM2-135M",
        "gpt2",
        "Qwen/Qwen2.5-0.5B",
        "meta-llama/Llama-3.2-1B",
        "a_b.c/d-e_f.g",
    ],
)
def test_valid_hub_ids(good) -> None:
    assert is_valid_hub_id(good) and resolve(good) == (good, False)


@pytest.mark.parametrize(
    "bad",
    [
        "../x",
        "/etc",
        "~",
        "~/models",
        "http://h/x",
        "a--b",
        "a..b",
        "a/b/c",
        "x" * 97,
        "org/-name",
        "org/name.",
        "a\x00b",
        "ｓmol/x",
        "a b",
        "org/",
        "",
    ],
)
def test_invalid_sources_are_refused(bad) -> None:
    """Existing folders without a model (/etc, ~) fail on config.json; the rest never reach the
    hub or the filesystem beyond the folder check."""
    with pytest.raises(ModelNotFoundError):
        load_config_dict(bad)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(st.text(max_size=120))
def test_anything_resolves_to_a_folder_or_a_valid_hub_id_or_an_error(text) -> None:
    try:
        name, local = resolve(text)
    except (ModelNotFoundError, ValueError):  # ValueError: NUL bytes in a path
        return
    if not local:
        assert is_valid_hub_id(name) and not name.startswith((".", "/", "~"))
        assert ".." not in name and "--" not in name and name.count("/") <= 1


def test_remote_code_and_unknown_families_refused() -> None:
    with pytest.raises(UnsupportedArchitectureError, match="custom code"):
        check_config({"model_type": "llama", "auto_map": {"AutoModelForCausalLM": "x.Y"}})
    with pytest.raises(UnsupportedArchitectureError, match="not supported"):
        check_config({"model_type": "gpt2"})
    check_config(
        {
            "model_type": "efficientllm",
            "base_model_type": "qwen3",
            "auto_map": {"AutoModelForCausalLM": "modeling_efficientllm.X"},
        }
    )  # our export


def test_local_folder_needs_safetensors(tmp_path) -> None:
    from efficientllm.model_io import load_model

    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "hidden_size": 8,
                "intermediate_size": 8,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "vocab_size": 16,
            }
        )
    )
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ModelNotFoundError, match="safetensors"):
        load_model(tmp_path)


def test_tilde_of_an_unknown_user_is_a_clear_error() -> None:
    """Found by the property test: Path('~nosuchuser').expanduser() raises RuntimeError."""
    with pytest.raises(ModelNotFoundError, match="no such folder"):
        resolve("~nosuchuser/model")
