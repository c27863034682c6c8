"""The shape of a Llama-style decoder and its exact parameter count, from numbers alone.

Pure Python: no torch, no weights. ``ModelShape.num_params()`` equals
``sum(p.numel() for p in model.parameters())`` of the built model (tied embeddings counted once).
Widths may differ per layer (heterogeneous); the hidden width and head_dim are shared.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Any


@dataclass(frozen=True, kw_only=True)
class LayerShape:
    """Widths of one decoder block."""

    num_heads: int
    """Query heads; a multiple of ``num_kv_heads``."""
    num_kv_heads: int
    """Key/value heads (GQA groups)."""
    intermediate_size: int
    """FFN (SwiGLU) channels."""

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True, kw_only=True)
class ModelShape:
    """Everything that determines the parameter count of a Llama-style causal LM."""

    family: str
    """The source ``model_type`` (llama, mistral, qwen2, qwen3)."""
    vocab_size: int
    hidden_size: int
    head_dim: int
    layers: tuple[LayerShape, ...]
    tie_word_embeddings: bool
    qkv_bias: bool = False
    """q/k/v projections carry a bias (Qwen2; Llama with ``attention_bias``)."""
    o_bias: bool = False
    """o_proj carries a bias (Llama/Qwen3 with ``attention_bias``)."""
    mlp_bias: bool = False
    """gate/up/down carry a bias (Llama with ``mlp_bias``)."""
    qk_norm: bool = False
    """Per-head RMSNorm on queries and keys over head_dim (Qwen3)."""
    extra: dict[str, Any] = field(default_factory=dict, compare=False)
    """Free-form notes (not counted)."""

    # ---- counting ---------------------------------------------------------------------------
    def layer_params(self, i: int) -> int:
        """Parameters of decoder block ``i``."""
        return layer_params(self, self.layers[i])

    def embedding_params(self) -> int:
        """Embedding, final norm and (when untied) lm_head."""
        n = self.vocab_size * self.hidden_size + self.hidden_size
        if not self.tie_word_embeddings:
            n += self.vocab_size * self.hidden_size
        return n

    def num_params(self) -> int:
        """Exact parameter count of the built model."""
        return self.embedding_params() + sum(layer_params(self, ly) for ly in self.layers)

    # ---- views ------------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def is_uniform(self) -> bool:
        return len(set(self.layers)) <= 1

    def with_layers(self, layers: list[LayerShape] | tuple[LayerShape, ...]) -> ModelShape:
        return replace(self, layers=tuple(layers))

    def with_hidden(self, hidden_size: int) -> ModelShape:
        return replace(self, hidden_size=hidden_size)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = [asdict(ly) for ly in self.layers]
        d.pop("extra")
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelShape:
        d = dict(d)
        d["layers"] = tuple(LayerShape(**ly) for ly in d["layers"])
        return cls(**d)

    def describe(self) -> str:
        """A compact one-line summary, e.g. ``30L d=576 heads 9/3 ffn 1536``."""
        if self.is_uniform and self.layers:
            ly = self.layers[0]
            body = f"heads {ly.num_heads}/{ly.num_kv_heads} ffn {ly.intermediate_size}"
        else:
            hs = [ly.num_heads for ly in self.layers]
            fs = [ly.intermediate_size for ly in self.layers]
            body = f"heads {min(hs)}-{max(hs)} ffn {min(fs)}-{max(fs)} (per layer)"
        return f"{self.num_layers}L d={self.hidden_size} {body}"


def layer_params(shape: ModelShape, ly: LayerShape) -> int:
    """Parameters of one block of ``shape`` with widths ``ly``."""
    d, hd = shape.hidden_size, shape.head_dim
    q, kv, ffn = ly.num_heads * hd, ly.num_kv_heads * hd, ly.intermediate_size
    n = 2 * d  # input_layernorm + post_attention_layernorm
    n += d * q + 2 * d * kv + q * d  # q, k, v, o
    if shape.qkv_bias:
        n += q + 2 * kv
    if shape.o_bias:
        n += d
    if shape.qk_norm:
        n += 2 * hd
    n += 3 * d * ffn  # gate, up, down
    if shape.mlp_bias:
        n += 2 * ffn + d
    return n
