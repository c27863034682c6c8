"""Write a (pruned) model as a GGUF file for llama.cpp and the runtimes built on it.

Architecture: a heterogeneous model (per-layer query heads, KV heads or FFN width) is written as
llama.cpp's ``deci`` architecture, which reads ``head_count``, ``head_count_kv`` and
``feed_forward_length`` as per-layer arrays and sizes every layer's tensors from them (plain
``llama`` takes one value for all layers). A uniform shape is written as ``llama`` (the widest
runtime support). A reduced hidden width or ``head_dim != hidden / heads`` is carried by
``attention.key_length`` / ``value_length``.

What llama.cpp's ``deci`` graph does with the corner cases (checked in its source,
``src/models/deci.cpp``), and so what this writer allows:

- a layer with 0 query heads is attention-free (skipped): written as is, except in layer 0, whose
  head count llama.cpp uses to derive the head size; refused there;
- 0 KV heads with query heads means Nemotron's "linear attention" (``wo`` only): refused;
- 0 FFN channels skips the rest of the block, dropping that layer's attention output: refused
  unless the layer has no attention either (then the block is the identity, which is exact).

Rotary embedding: HF Llama rotates the two halves of each head (``rotate_half``); llama.cpp's
llama/deci graph rotates adjacent pairs, so the rows of q/k (and their biases) are permuted per
head. RoPE ``default``, ``linear`` (scaling factor) and ``llama3`` (a ``rope_freqs`` tensor)
are supported. Tied embeddings are written once (llama.cpp reuses ``token_embd`` as output).

Types: 1-D tensors (norms, biases) are always f32. ``f16``/``q8_0`` apply to the 2-D weights;
Q8_0 (from Python, ``gguf.quants``) needs rows of a multiple of 32 values, other tensors stay f16.
K-quants: ``quantize_gguf`` runs llama.cpp's own quantizer through ``llama_cpp`` (extra ``gguf``).

Not representable (``ExportError``): per-head q/k norms (Qwen3), sliding-window attention, an
activation other than SiLU, other RoPE scalings, tokenizers other than byte-level / Metaspace BPE.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from gguf import (
    MODEL_TENSOR,
    TENSOR_NAMES,
    GGMLQuantizationType,
    GGUFWriter,
    LlamaFileType,
    RopeScalingType,
)
from gguf.quants import quantize

from efficientllm.choices import GGUF_DTYPES, GGUFDtype
from efficientllm.errors import ExportError
from efficientllm.export.gguf_vocab import add_tokenizer
from efficientllm.export.hf import _as_efficientllm
from efficientllm.modeling import EfficientLLMForCausalLM

logger = logging.getLogger(__name__)

GGUFArch = Literal["auto", "llama", "deci"]
_FILE_TYPES = {
    "f32": LlamaFileType.ALL_F32,
    "f16": LlamaFileType.MOSTLY_F16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0,
}
_Q8_BLOCK = 32


def _rope(cfg: Any) -> dict[str, Any]:
    params = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    params = dict(params)
    params.setdefault("rope_theta", getattr(cfg, "rope_theta", None) or 10000.0)
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def gguf_blockers(model: EfficientLLMForCausalLM) -> list[str]:
    """Why ``model`` cannot be written as GGUF (empty when it can)."""
    cfg = model.config
    why: list[str] = []
    if cfg.base_model_type == "qwen3":
        why.append("per-head q/k RMSNorm (Qwen3) has no equivalent in llama.cpp's llama/deci graph")
    window = getattr(cfg, "sliding_window", None)
    if window and int(window) < int(getattr(cfg, "max_position_embeddings", 0) or 0):
        why.append(f"sliding-window attention ({window}) is not supported by llama/deci")
    if getattr(cfg, "hidden_act", "silu") != "silu":
        why.append(f"activation {cfg.hidden_act!r} is not SiLU")
    rope = _rope(cfg)
    if rope["rope_type"] not in ("default", "linear", "llama3"):
        why.append(f"RoPE scaling {rope['rope_type']!r} is not supported (default, linear, llama3)")
    if int(cfg.head_dim) % 2:
        why.append(f"head_dim {cfg.head_dim} is odd")
    heads, kvs, ffns = (
        cfg.layer_num_attention_heads,
        cfg.layer_num_key_value_heads,
        cfg.layer_intermediate_size,
    )
    if heads and heads[0] == 0:
        why.append("layer 0 has no attention head (llama.cpp derives the head size from it)")
    for i, (h, kv, f) in enumerate(zip(heads, kvs, ffns, strict=True)):
        if h > 0 and kv == 0:
            why.append(f"layer {i}: query heads without KV heads mean 'linear attention' in deci")
        if h > 0 and f == 0:
            why.append(f"layer {i}: an FFN-free layer with attention is skipped whole by deci")
    return why


def _permute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's half-split RoPE layout -> llama.cpp's interleaved pairs, head by head (dim 0)."""
    if n_head == 0:
        return w
    rest = w.shape[1:]
    hd = w.shape[0] // n_head
    return w.reshape(n_head, 2, hd // 2, *rest).transpose(1, 2).reshape(w.shape)


def _llama3_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Llama 3.x per-frequency divisors (``rope_freqs``): 1 for short wavelengths, ``factor``
    for long ones, a smooth blend between (the Llama 3.1 recipe)."""
    base, factor = float(rope["rope_theta"]), float(rope["factor"])
    low, high = float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    old_ctx = float(rope["original_max_position_embeddings"])
    freqs = 1.0 / base ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / freqs
    smooth = np.clip((old_ctx / wavelen - low) / (high - low), 0.0, 1.0)
    scale = (1 - smooth) / factor + smooth  # multiplies the frequency
    return (1.0 / scale).astype(np.float32)


class _Tensors:
    """Converts and adds tensors with the export's type policy; counts what went where."""

    def __init__(self, writer: GGUFWriter, dtype: GGUFDtype) -> None:
        self.writer, self.dtype = writer, dtype
        self.counts: dict[str, int] = {}

    def add(self, name: str, t: torch.Tensor) -> None:
        a = t.detach().to(torch.float32).cpu().contiguous().numpy()
        kind = "f32" if a.ndim == 1 else self.dtype
        if kind == "q8_0" and a.shape[-1] % _Q8_BLOCK:
            kind = "f16"  # Q8_0 blocks run along rows; this row length does not split into them
        if kind == "q8_0":
            self.writer.add_tensor(
                name, quantize(a, GGMLQuantizationType.Q8_0), raw_dtype=GGMLQuantizationType.Q8_0
            )
        else:
            self.writer.add_tensor(name, a.astype(np.float16 if kind == "f16" else np.float32))
        self.counts[kind] = self.counts.get(kind, 0) + 1


def _name(kind: MODEL_TENSOR, suffix: str, bid: int | None = None) -> str:
    base = TENSOR_NAMES[kind]
    return (base.format(bid=bid) if bid is not None else base) + "." + suffix


def _write_tensors(model: EfficientLLMForCausalLM, out: _Tensors) -> None:
    inner, cfg = model.model, model.config
    out.add(_name(MODEL_TENSOR.TOKEN_EMBD, "weight"), inner.embed_tokens.weight)
    out.add(_name(MODEL_TENSOR.OUTPUT_NORM, "weight"), inner.norm.weight)
    if model.lm_head.weight.data_ptr() != inner.embed_tokens.weight.data_ptr():
        out.add(_name(MODEL_TENSOR.OUTPUT, "weight"), model.lm_head.weight)
    rope = _rope(cfg)
    if rope["rope_type"] == "llama3":
        factors = torch.from_numpy(_llama3_factors(rope, int(cfg.head_dim)))
        out.add(_name(MODEL_TENSOR.ROPE_FREQS, "weight"), factors)
    for i, layer in enumerate(inner.layers):
        attn, mlp = layer.self_attn, layer.mlp
        nh, nkv = cfg.layer_num_attention_heads[i], cfg.layer_num_key_value_heads[i]
        if nh > 0:
            out.add(_name(MODEL_TENSOR.ATTN_NORM, "weight", i), layer.input_layernorm.weight)
            parts = (
                (MODEL_TENSOR.ATTN_Q, attn.q_proj, nh),
                (MODEL_TENSOR.ATTN_K, attn.k_proj, nkv),
                (MODEL_TENSOR.ATTN_V, attn.v_proj, 0),
                (MODEL_TENSOR.ATTN_OUT, attn.o_proj, 0),
            )
            for kind, lin, rope_heads in parts:
                out.add(_name(kind, "weight", i), _permute_rows(lin.weight, rope_heads))
                if lin.bias is not None:
                    out.add(_name(kind, "bias", i), _permute_rows(lin.bias, rope_heads))
        if cfg.layer_intermediate_size[i] > 0:
            out.add(
                _name(MODEL_TENSOR.FFN_NORM, "weight", i), layer.post_attention_layernorm.weight
            )
            for kind, lin in (
                (MODEL_TENSOR.FFN_GATE, mlp.gate_proj),
                (MODEL_TENSOR.FFN_UP, mlp.up_proj),
                (MODEL_TENSOR.FFN_DOWN, mlp.down_proj),
            ):
                out.add(_name(kind, "weight", i), lin.weight)
                if lin.bias is not None:
                    out.add(_name(kind, "bias", i), lin.bias)


def _write_hparams(w: GGUFWriter, model: EfficientLLMForCausalLM, per_layer: bool) -> None:
    cfg = model.config
    hd = int(cfg.head_dim)
    w.add_context_length(int(getattr(cfg, "max_position_embeddings", 2048) or 2048))
    w.add_embedding_length(int(cfg.hidden_size))
    w.add_block_count(int(cfg.num_hidden_layers))
    heads, kvs = cfg.layer_num_attention_heads, cfg.layer_num_key_value_heads
    ffns = cfg.layer_intermediate_size
    w.add_head_count(list(heads) if per_layer else int(heads[0]))
    w.add_head_count_kv(list(kvs) if per_layer else int(kvs[0]))
    w.add_feed_forward_length(list(ffns) if per_layer else int(ffns[0]))
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_rope_dimension_count(hd)
    w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
    w.add_vocab_size(int(cfg.vocab_size))
    rope = _rope(cfg)
    w.add_rope_freq_base(float(rope["rope_theta"]))
    if rope["rope_type"] == "linear":
        w.add_rope_scaling_type(RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(rope["factor"]))


def export_gguf(
    model: Any,
    tokenizer: Any,
    out_path: str | os.PathLike[str],
    *,
    dtype: GGUFDtype = "f16",
    arch: GGUFArch = "auto",
    name: str | None = None,
) -> Path:
    """Write ``model`` (an ``EfficientLLMForCausalLM`` or a Llama-style family model) and its
    fast ``tokenizer`` to the GGUF file ``out_path``; returns the resolved path.

    ``dtype``: ``f32``, ``f16`` or ``q8_0`` for the 2-D weights (see the module docstring).
    ``arch``: ``auto`` writes ``llama`` for a uniform shape and ``deci`` otherwise; ``llama``
    is refused for a heterogeneous model. ``name`` goes into ``general.name``.
    The file is written atomically (a temporary file in the same folder, then renamed).
    Raises ``ExportError`` when the model cannot be represented.
    """
    if dtype not in GGUF_DTYPES:
        raise ExportError(f"unknown GGUF dtype {dtype!r}; use one of {', '.join(GGUF_DTYPES)}")
    if arch not in ("auto", "llama", "deci"):
        raise ExportError(f"unknown GGUF architecture {arch!r}; use auto, llama or deci")
    if tokenizer is None:
        raise ExportError("a GGUF file must carry the tokenizer; pass the model's tokenizer")
    model = _as_efficientllm(model)
    blockers = gguf_blockers(model)
    if blockers:
        raise ExportError("cannot export as GGUF: " + "; ".join(blockers))
    uniform = bool(model.config.is_uniform)
    chosen = ("llama" if uniform else "deci") if arch == "auto" else arch
    if chosen == "llama" and not uniform:
        raise ExportError("llama takes one width for all layers; this model needs arch='deci'")
    out = Path(out_path).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        writer = GGUFWriter(str(tmp), chosen)
        writer.add_name(name or out.stem)
        writer.add_file_type(int(_FILE_TYPES[dtype]))
        _write_hparams(writer, model, per_layer=chosen == "deci")
        add_tokenizer(writer, tokenizer, int(model.config.vocab_size))
        tensors = _Tensors(writer, dtype)
        with torch.no_grad():
            _write_tensors(model, tensors)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, out)
    except ExportError:
        raise
    except Exception as err:
        raise ExportError(f"GGUF export to {out} failed: {type(err).__name__}: {err}") from err
    finally:
        tmp.unlink(missing_ok=True)
    logger.info("wrote %s GGUF (%s, tensors %s) to %s", chosen, dtype, tensors.counts, out)
    return out


def export_gguf_folder(
    folder: str | os.PathLike[str],
    out_path: str | os.PathLike[str],
    *,
    dtype: GGUFDtype = "f16",
    arch: GGUFArch = "auto",
) -> Path:
    """``export_gguf`` for a model folder (an export of ``export_model`` or any supported
    Llama-style folder with safetensors and a tokenizer), loaded with the safe loader."""
    from efficientllm.model_io import load_model, load_tokenizer

    model = load_model(Path(folder), dtype=torch.float32)
    tokenizer = load_tokenizer(Path(folder))
    return export_gguf(model, tokenizer, out_path, dtype=dtype, arch=arch, name=Path(folder).name)


__all__ = [
    "GGUF_DTYPES",
    "GGUFArch",
    "GGUFDtype",
    "export_gguf",
    "export_gguf_folder",
    "gguf_blockers",
]
