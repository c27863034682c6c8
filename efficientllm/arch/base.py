"""What a model family looks like to the pruner: how to read its shape from a config.

All supported families share the Llama module tree (``model.embed_tokens``, ``model.layers[i]``
with ``self_attn.{q,k,v,o}_proj`` and ``mlp.{gate,up,down}_proj``, ``input_layernorm``,
``post_attention_layernorm``, ``model.norm``, ``lm_head``); they differ in biases and per-head
norms. An adapter records those differences; ``register`` puts it in the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from efficientllm.errors import UnsupportedArchitectureError
from efficientllm.shape import LayerShape, ModelShape

ConfigFlag = Callable[[Mapping[str, Any]], bool]


def _const(value: bool) -> ConfigFlag:
    return lambda cfg: value


def _field(name: str, default: bool = False) -> ConfigFlag:
    return lambda cfg: bool(cfg.get(name, default))


@dataclass(frozen=True, kw_only=True)
class ArchAdapter:
    """One Llama-style family. Flags are functions of the config dict."""

    model_type: str
    """The ``model_type`` in ``config.json``."""
    examples: str
    """Known checkpoints of this family (for help texts)."""
    qkv_bias: ConfigFlag = _const(False)
    o_bias: ConfigFlag = _const(False)
    mlp_bias: ConfigFlag = _const(False)
    qk_norm: bool = False

    def shape_from_config(self, cfg: Mapping[str, Any]) -> ModelShape:
        """The shape of a source model, from its ``config.json`` dict (no torch, no weights)."""
        heads = int(cfg["num_attention_heads"])
        kv = int(cfg.get("num_key_value_heads") or heads)
        hidden = int(cfg["hidden_size"])
        head_dim = int(cfg.get("head_dim") or hidden // heads)
        n_layers = int(cfg["num_hidden_layers"])
        layer = LayerShape(
            num_heads=heads, num_kv_heads=kv, intermediate_size=int(cfg["intermediate_size"])
        )
        return ModelShape(
            family=self.model_type,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            head_dim=head_dim,
            layers=(layer,) * n_layers,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=self.qkv_bias(cfg),
            o_bias=self.o_bias(cfg),
            mlp_bias=self.mlp_bias(cfg),
            qk_norm=self.qk_norm,
        )


_REGISTRY: dict[str, ArchAdapter] = {}


def register(adapter: ArchAdapter) -> ArchAdapter:
    _REGISTRY[adapter.model_type] = adapter
    return adapter


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(model_type: str | None) -> ArchAdapter:
    """The adapter for ``model_type`` or an ``UnsupportedArchitectureError`` listing the choices."""
    if model_type in _REGISTRY:
        return _REGISTRY[model_type]
    supported = ", ".join(f"{a.model_type} ({a.examples})" for a in _REGISTRY.values())
    raise UnsupportedArchitectureError(
        f"model_type {model_type!r} is not supported; supported families: {supported}. "
        "Adding a Llama-style family is one small file in efficientllm/arch/ (see README)."
    )


__all__ = ["ArchAdapter", "register", "get_adapter", "supported_model_types", "_field", "_const"]
