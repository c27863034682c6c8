"""Config of a heterogeneous-width Llama-style causal LM (per-layer heads, KV heads, FFN width).

Self-contained: imports only transformers, so it can be copied beside exported weights and loaded
with ``trust_remote_code=True`` where efficientllm is not installed.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from transformers import (
    LlamaConfig,
    MistralConfig,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

FAMILY_CONFIGS: dict[str, type[PretrainedConfig]] = {
    "llama": LlamaConfig,
    "mistral": MistralConfig,
    "qwen2": Qwen2Config,
    "qwen3": Qwen3Config,
}

# Fields of the base PretrainedConfig that never go into a rebuilt family config.
_SKIP_FIELDS = frozenset({"transformers_version", "architectures", "dtype", "_name_or_path"})


class EfficientLLMConfig(PretrainedConfig):
    """A family config (llama, mistral, qwen2, qwen3) plus per-layer widths.

    All family fields live at the top level. ``num_attention_heads``, ``num_key_value_heads`` and
    ``intermediate_size`` hold the maxima over layers; the per-layer lists are authoritative.
    """

    model_type = "efficientllm"

    def __init__(
        self,
        base_model_type: str = "llama",
        layer_num_attention_heads: list[int] | None = None,
        layer_num_key_value_heads: list[int] | None = None,
        layer_intermediate_size: list[int] | None = None,
        head_norm_eps: float | None = None,
        **kwargs: Any,
    ) -> None:
        if base_model_type not in FAMILY_CONFIGS:
            raise ValueError(
                f"base_model_type {base_model_type!r} is not one of {sorted(FAMILY_CONFIGS)}"
            )
        self.base_model_type = base_model_type
        self.layer_num_attention_heads = [int(x) for x in layer_num_attention_heads or []]
        self.layer_num_key_value_heads = [int(x) for x in layer_num_key_value_heads or []]
        self.layer_intermediate_size = [int(x) for x in layer_intermediate_size or []]
        self.head_norm_eps = head_norm_eps
        super().__init__(**kwargs)
        if self.head_norm_eps is None:
            self.head_norm_eps = getattr(self, "rms_norm_eps", 1e-6)
        n = getattr(self, "num_hidden_layers", None)
        lists = (
            self.layer_num_attention_heads,
            self.layer_num_key_value_heads,
            self.layer_intermediate_size,
        )
        if n is not None and any(len(x) != n for x in lists):
            raise ValueError(
                f"per-layer lists must have num_hidden_layers={n} entries, got "
                f"{[len(x) for x in lists]}"
            )

    @property
    def family_config_class(self) -> type[PretrainedConfig]:
        return FAMILY_CONFIGS[self.base_model_type]

    def _family_kwargs(self) -> dict[str, Any]:
        """The family config's own fields, read from this config."""
        cls = self.family_config_class
        base = {f.name for f in dataclasses.fields(PretrainedConfig)}
        kw: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name in _SKIP_FIELDS or (f.name in base and f.name not in cls.__annotations__):
                continue
            if f.name in self.__dict__:
                kw[f.name] = self.__dict__[f.name]
        layer_types = kw.get("layer_types")
        if layer_types is not None and len(layer_types) != self.num_hidden_layers:
            kw.pop("layer_types")
        return kw

    def family_config(self, *, exact: bool = False) -> PretrainedConfig:
        """A model-level family config (for embeddings, norm, rotary, masks and the KV cache).

        With ``exact`` the real maxima are passed to the family class, so its validation applies
        (used for a vanilla family export); otherwise placeholder head counts are validated and the
        real ones are set afterwards.
        """
        kw = self._family_kwargs()
        kw["head_dim"] = self.head_dim  # explicit even where the family would derive it (Qwen2)
        heads, kv = self.num_attention_heads, self.num_key_value_heads
        if exact:
            kw.update(num_attention_heads=heads, num_key_value_heads=kv)
            return self.family_config_class(**kw)
        kw.update(num_attention_heads=1, num_key_value_heads=1)
        cfg = self.family_config_class(**kw)
        cfg.num_attention_heads, cfg.num_key_value_heads = heads, kv
        cfg._attn_implementation = self._attn_implementation
        return cfg

    def layer_config(self, i: int) -> PretrainedConfig:
        """A fresh family config holding the widths of decoder layer ``i``."""
        cfg = self.family_config()
        cfg.num_attention_heads = self.layer_num_attention_heads[i]
        cfg.num_key_value_heads = self.layer_num_key_value_heads[i]
        cfg.intermediate_size = self.layer_intermediate_size[i]
        return cfg

    @property
    def is_uniform(self) -> bool:
        """True when every layer has the same widths."""
        rows = zip(
            self.layer_num_attention_heads,
            self.layer_num_key_value_heads,
            self.layer_intermediate_size,
            strict=True,
        )
        return len(set(rows)) <= 1


def config_from_family(
    family_config: PretrainedConfig,
    *,
    layer_num_attention_heads: list[int] | None = None,
    layer_num_key_value_heads: list[int] | None = None,
    layer_intermediate_size: list[int] | None = None,
    head_norm_eps: float | None = None,
) -> EfficientLLMConfig:
    """An ``EfficientLLMConfig`` equal to a (uniform) family config; widths may be overridden."""
    model_type = family_config.model_type
    if model_type not in FAMILY_CONFIGS:
        raise ValueError(f"model_type {model_type!r} is not one of {sorted(FAMILY_CONFIGS)}")
    d = family_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version"):
        d.pop(key, None)
    n = int(family_config.num_hidden_layers)
    heads = int(family_config.num_attention_heads)
    kv = int(getattr(family_config, "num_key_value_heads", None) or heads)
    if not getattr(family_config, "head_dim", None):
        d["head_dim"] = family_config.hidden_size // heads
    heads_l = list(layer_num_attention_heads or [heads] * n)
    kv_l = list(layer_num_key_value_heads or [kv] * n)
    ffn_l = list(layer_intermediate_size or [family_config.intermediate_size] * n)
    d.update(
        num_hidden_layers=len(heads_l),
        num_attention_heads=max(heads_l, default=heads),
        num_key_value_heads=max(kv_l, default=kv),
        intermediate_size=max(ffn_l, default=family_config.intermediate_size),
    )
    cfg = EfficientLLMConfig(
        base_model_type=model_type,
        layer_num_attention_heads=heads_l,
        layer_num_key_value_heads=kv_l,
        layer_intermediate_size=ffn_l,
        head_norm_eps=head_norm_eps if head_norm_eps is not None else family_config.rms_norm_eps,
        **d,
    )
    cfg.architectures = ["EfficientLLMForCausalLM"]
    cfg._attn_implementation = family_config._attn_implementation
    return cfg


__all__ = ["FAMILY_CONFIGS", "EfficientLLMConfig", "config_from_family"]
