"""Find, vet and load a source model: a Hugging Face hub id or a local folder.

Safety first: ``trust_remote_code`` is always off, a config with ``auto_map`` (custom code) is
refused unless it is one of our own exports, only allow-listed ``model_type``s load, and local
weights must be safetensors (never pickle), and each file's header is checked before any library
parses it (:func:`check_safetensors`: a bounded size, a plausible tensor count, every tensor
inside the file). ``source_shape`` needs only ``config.json``.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from pathlib import Path
from typing import Any

from efficientllm.arch import get_adapter
from efficientllm.errors import ModelNotFoundError, UnsupportedArchitectureError
from efficientllm.shape import LayerShape, ModelShape

log = logging.getLogger(__name__)

OWN_MODEL_TYPE = "efficientllm"
MAX_HEADER_BYTES = 64 * 2**20
"""A safetensors header longer than this is refused (a real model's is well under 1 MB)."""
HEADER_BYTES_PER_TENSOR = 1024
TENSORS_PER_LAYER = 64
"""At most this many tensors per decoder layer (+2 for embeddings, norm, head) in one file: a
Llama-style layer has 9 to 14; a file listing far more is refused before transformers spends
seconds matching every name (200k names took 22 s)."""
# The hub's repo-id rules: [namespace/]name, letters, digits, '-', '_', '.', at most 96 chars,
# no '--' or '..', not starting or ending with '-' or '.'.
_HUB_ID = re.compile(r"^(?:[A-Za-z0-9][\w.-]{0,94}/)?[A-Za-z0-9][\w.-]{0,94}$")


def is_valid_hub_id(name: str) -> bool:
    """True for a syntactically valid hub repo id (``org/name`` or ``name``)."""
    if not _HUB_ID.match(name) or "--" in name or ".." in name or len(name) > 96:
        return False
    return not any(part.endswith((".", "-")) for part in name.split("/"))


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1


def resolve(source: str | Path) -> tuple[str, bool]:
    """(``source``, is_local). A local folder wins; otherwise a valid hub id; else an error."""
    text = str(source).strip()
    if not text:
        raise ModelNotFoundError("no model given; pass a hub id (org/name) or a local folder")
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "~someone" with no such user
        raise ModelNotFoundError(f"model {text!r} not found: no such folder") from None
    if path.is_dir():
        return str(path), True
    if path.exists():
        raise ModelNotFoundError(f"{text!r} is a file; pass the folder that holds config.json")
    if _looks_like_path(text) or not is_valid_hub_id(text):
        raise ModelNotFoundError(
            f"model {text!r} not found: no such folder, and it is not a valid hub id; "
            "pass a folder with config.json and *.safetensors, or an id like "
            "HuggingFaceTB/SmolLM2-360M (run `efficientllm demo-model` for the bundled demo model)"
        )
    return text, False


def load_config_dict(source: str | Path) -> dict[str, Any]:
    """The raw ``config.json`` of a source, vetted (supported family, no remote code)."""
    name, local = resolve(source)
    if local:
        cfg_path = Path(name) / "config.json"
        if not cfg_path.is_file():
            raise ModelNotFoundError(
                f"{name!r} has no config.json; is it a Hugging Face model folder?"
            )
        try:
            cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ModelNotFoundError(f"{cfg_path} is not valid JSON ({err})") from None
    else:
        cfg = _download_config(name)
    check_config(cfg, where=name)
    return cfg


def _download_config(repo_id: str) -> dict[str, Any]:
    try:
        from huggingface_hub import hf_hub_download

        path = hf_hub_download(repo_id, "config.json")
    except Exception as err:  # offline, unknown repo, gated repo: all end the same for the user
        reason = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
        raise ModelNotFoundError(
            f"could not get config.json of hub model {repo_id!r} ({reason}); check the id and "
            "your network/HF_TOKEN, or pass a local folder (`efficientllm demo-model` prepares one)"
        ) from None
    return json.loads(Path(path).read_text(encoding="utf-8"))


def check_config(cfg: dict[str, Any], *, where: str = "model") -> None:
    """Refuse remote code and unsupported families, with a message that says why."""
    model_type = cfg.get("model_type")
    if model_type == OWN_MODEL_TYPE:
        get_adapter(cfg.get("base_model_type"))
        return
    if cfg.get("auto_map"):
        raise UnsupportedArchitectureError(
            f"{where}: config.json asks for custom code (auto_map); remote code is never run. "
            "Use a model whose model_type transformers knows (llama, mistral, qwen2, qwen3)"
        )
    get_adapter(model_type)


def shape_from_config(cfg: dict[str, Any]) -> ModelShape:
    """The exact shape of a (vetted) config, our heterogeneous exports included."""
    if cfg.get("model_type") != OWN_MODEL_TYPE:
        return get_adapter(cfg["model_type"]).shape_from_config(cfg)
    adapter = get_adapter(cfg["base_model_type"])
    base = adapter.shape_from_config({**cfg, "model_type": cfg["base_model_type"]})
    layers = [
        LayerShape(num_heads=h, num_kv_heads=kv, intermediate_size=f)
        for h, kv, f in zip(
            cfg["layer_num_attention_heads"],
            cfg["layer_num_key_value_heads"],
            cfg["layer_intermediate_size"],
            strict=True,
        )
    ]
    return base.with_layers(layers)


def source_shape(source: str | Path) -> ModelShape:
    """The shape of a hub id or folder from its config alone (no torch, no weights)."""
    return shape_from_config(load_config_dict(source))


def load_model(source: str | Path, *, dtype: Any = None, device: Any = None):
    """Load a vetted source as an ``EfficientLLMForCausalLM`` (fp32 by default) in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    from efficientllm.modeling import EfficientLLMForCausalLM, register_auto_classes

    register_auto_classes()
    cfg = load_config_dict(source)
    name, local = resolve(source)
    if local and not list(Path(name).glob("*.safetensors")):
        raise ModelNotFoundError(
            f"{name!r} has no *.safetensors weights; only safetensors are loaded (pickle files "
            "can run code). Convert with `model.save_pretrained(dir, safe_serialization=True)`"
        )
    if local:
        layers = int(cfg.get("num_hidden_layers") or 0)
        for f in sorted(Path(name).glob("*.safetensors")):
            check_safetensors(f, max_tensors=TENSORS_PER_LAYER * (layers + 2))
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            name,
            dtype=dtype or torch.float32,
            trust_remote_code=False,
            use_safetensors=True,
            output_loading_info=True,
        )
        model, info = loaded
    except Exception as err:  # missing, truncated or malformed files: one clear line, no trace
        log.debug("loading %s failed", name, exc_info=True)
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ModelNotFoundError(
            f"could not load the weights of {name!r} ({reason}); check that the folder holds "
            "complete *.safetensors files matching config.json"
        ) from None
    _check_loading_info(name, info, tied=bool(cfg.get("tie_word_embeddings")))
    if cfg.get("model_type") != OWN_MODEL_TYPE:
        model = EfficientLLMForCausalLM.from_family(model)
    if device is not None:
        model = model.to(device)
    return model.eval()


def check_safetensors(path: Path, *, max_tensors: int) -> None:
    """Refuse ``path`` unless its safetensors header is sane: the 8-byte length within the file,
    :data:`MAX_HEADER_BYTES` and what ``max_tensors`` can need; JSON that maps names to tensors,
    at most ``max_tensors`` of them, each tensor's byte range inside the data. Reads the header
    only."""
    size = path.stat().st_size

    def bad(why: str) -> ModelNotFoundError:
        return ModelNotFoundError(
            f"could not load the weights of {str(path.parent)!r}: {path.name} is not a usable "
            f"safetensors file ({why}); re-save the model with "
            "`save_pretrained(dir, safe_serialization=True)`"
        )

    with path.open("rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise bad("no header")
        (n,) = struct.unpack("<Q", head)
        # ~150 bytes describe one tensor: a header far longer than max_tensors need is refused
        # before it is parsed (a 15 MB header of 200k names costs 150 MB of Python objects)
        if n > min(MAX_HEADER_BYTES, size - 8, HEADER_BYTES_PER_TENSOR * max_tensors + 2**16):
            raise bad(f"its header claims {n:,} bytes in a {size:,}-byte file")
        raw = fh.read(n)
    try:
        meta = json.loads(raw)
    except ValueError:
        raise bad("its header is not JSON") from None
    if not isinstance(meta, dict):
        raise bad("its header is not a table of tensors")
    tensors = {k: v for k, v in meta.items() if k != "__metadata__"}
    if len(tensors) > max_tensors:
        raise bad(f"{len(tensors):,} tensors, more than a model of this config can have")
    data = size - 8 - n
    for name, t in tensors.items():
        off = t.get("data_offsets") if isinstance(t, dict) else None
        if not (isinstance(off, list) and len(off) == 2 and all(type(o) is int for o in off)):
            raise bad(f"tensor {name[:60]!r} has no byte range")
        if not 0 <= off[0] <= off[1] <= data:
            raise bad(f"tensor {name[:60]!r} lies outside the file")


def _check_loading_info(name: str, info: dict[str, Any], *, tied: bool) -> None:
    """transformers re-initialises missing or mis-shaped weights with a warning; a source whose
    files do not fit its config must fail instead of training a random model."""
    missing = [k for k in info.get("missing_keys", ()) if not (tied and k == "lm_head.weight")]
    mismatched = [k[0] if isinstance(k, tuple) else k for k in info.get("mismatched_keys", ())]
    if missing or mismatched:
        bad = (mismatched or missing)[:3]
        what = "have the wrong shape" if mismatched else "are missing"
        raise ModelNotFoundError(
            f"could not load the weights of {name!r}: {len(mismatched or missing)} tensors {what} "
            f"(e.g. {', '.join(map(str, bad))}); the *.safetensors files do not match config.json"
        )


def load_tokenizer(source: str | Path):
    """The source's tokenizer (``trust_remote_code`` off)."""
    from transformers import AutoTokenizer

    name, _ = resolve(source)
    try:
        return AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(f"could not load the tokenizer of {name!r}: {err}") from None
