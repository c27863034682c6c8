"""A heterogeneous-width Llama-style causal LM built from the family's own modules.

Each decoder layer is the family's decoder layer (LlamaDecoderLayer, MistralDecoderLayer,
Qwen2DecoderLayer, Qwen3DecoderLayer) built from its own copy of the family config holding that
layer's widths; embeddings, final norm, rotary embedding and masks come from the family's Model
class. State-dict keys are therefore exactly the family's.

Self-contained: imports only torch, transformers and the sibling config file, so it can be copied
beside exported weights and loaded with ``trust_remote_code=True``.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import (
    BaseModelOutputWithPast,
    CausalLMOutputWithPast,
)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel
from transformers.models.mistral.modeling_mistral import (
    MistralDecoderLayer,
    MistralModel,
)
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2Model
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer, Qwen3Model
from transformers.utils import can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration_efficientllm import EfficientLLMConfig, config_from_family

logger = logging.getLogger(__name__)

FAMILY_MODULES: dict[str, tuple[type[PreTrainedModel], type[nn.Module]]] = {
    "llama": (LlamaModel, LlamaDecoderLayer),
    "mistral": (MistralModel, MistralDecoderLayer),
    "qwen2": (Qwen2Model, Qwen2DecoderLayer),
    "qwen3": (Qwen3Model, Qwen3DecoderLayer),
}


def _make_layer(config: EfficientLLMConfig, i: int) -> nn.Module:
    """Decoder layer ``i`` built from its own per-layer family config."""
    layer = FAMILY_MODULES[config.base_model_type][1](config.layer_config(i), i)
    for norm_name in ("q_norm", "k_norm"):
        norm = getattr(layer.self_attn, norm_name, None)
        if norm is not None:
            norm.variance_epsilon = config.head_norm_eps
    return layer


def _build_inner(config: EfficientLLMConfig) -> PreTrainedModel:
    """The family's Model (embeddings, norm, rotary) holding heterogeneous decoder layers."""
    model_cls = FAMILY_MODULES[config.base_model_type][0]
    inner_cfg = config.family_config()
    n = inner_cfg.num_hidden_layers
    inner_cfg.num_hidden_layers = 0  # build no uniform layers; ours are added below
    inner = model_cls(inner_cfg)
    inner_cfg.num_hidden_layers = n
    inner.layers = nn.ModuleList([_make_layer(config, i) for i in range(n)])
    return inner


class EfficientLLMPreTrainedModel(PreTrainedModel):
    """Shared settings of the heterogeneous models."""

    config_class = EfficientLLMConfig
    config: EfficientLLMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = [cls.__name__ for _, cls in FAMILY_MODULES.values()]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True


class EfficientLLMForCausalLM(EfficientLLMPreTrainedModel, GenerationMixin):
    """Causal LM with per-layer query heads, KV heads and FFN width."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: EfficientLLMConfig) -> None:
        super().__init__(config)
        self.model = _build_inner(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def _layer_configs(self) -> list[PretrainedConfig]:
        """Every distinct config object used by the inner model and its layers."""
        seen: dict[int, PretrainedConfig] = {id(self.model.config): self.model.config}
        for module in self.model.modules():
            cfg = getattr(module, "config", None)
            if isinstance(cfg, PretrainedConfig):
                seen.setdefault(id(cfg), cfg)
        return list(seen.values())

    def _sync_attn_implementation(self) -> None:
        """Propagate the top-level attention implementation to the family configs."""
        impl = self.config._attn_implementation
        if self.model.config._attn_implementation == impl and all(
            ly.self_attn.config._attn_implementation == impl for ly in self.model.layers
        ):
            return
        for cfg in self._layer_configs():
            cfg._attn_implementation = impl

    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: object,
    ) -> CausalLMOutputWithPast:
        """Logits (and the loss when ``labels`` are given); ``cache`` is the KV cache."""
        self._sync_attn_implementation()
        outputs: BaseModelOutputWithPast = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        assert hidden_states is not None
        keep: slice | torch.Tensor
        if isinstance(logits_to_keep, int):
            keep = slice(-logits_to_keep, None) if logits_to_keep else slice(None)
        else:
            keep = logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        loss = None
        if labels is not None:
            loss = self.loss_function(
                logits=logits,
                labels=labels,
                vocab_size=self.config.vocab_size,
                **kwargs,
            )
        return CausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
        )

    @classmethod
    def from_family(cls, model: PreTrainedModel) -> EfficientLLMForCausalLM:
        """Wrap a loaded family model (LlamaForCausalLM, ...; possibly shrunk in place).

        The new model shares the family model's modules and tensors; the widths are read off the
        modules, so a model sliced in place converts correctly.
        """
        fam_cfg = model.config
        hd = int(
            getattr(fam_cfg, "head_dim", None) or fam_cfg.hidden_size // fam_cfg.num_attention_heads
        )
        layers = model.model.layers
        head_norm = getattr(layers[0].self_attn, "q_norm", None) if len(layers) else None
        cfg = config_from_family(
            fam_cfg,
            layer_num_attention_heads=[ly.self_attn.q_proj.out_features // hd for ly in layers],
            layer_num_key_value_heads=[ly.self_attn.k_proj.out_features // hd for ly in layers],
            layer_intermediate_size=[ly.mlp.gate_proj.out_features for ly in layers],
            head_norm_eps=head_norm.variance_epsilon if head_norm is not None else None,
        )
        cfg.hidden_size = model.model.embed_tokens.embedding_dim
        cfg.head_dim = hd
        if getattr(cfg, "layer_types", None) is not None:
            cfg.layer_types = [_layer_type(cfg, ly) for ly in layers]
        with torch.device("meta"):
            new = cls(cfg)
        for name in ("embed_tokens", "layers", "norm", "rotary_emb"):
            setattr(new.model, name, getattr(model.model, name))
        new.model.rotary_emb.config = new.model.config
        new.lm_head = model.lm_head
        if model.generation_config is not None:
            new.generation_config = model.generation_config
        sync_config_(new)
        new.train(model.training)
        return new


def _layer_type(cfg: PretrainedConfig, layer: Any) -> str:
    """The attention type of a decoder layer, read off the layer or its own config."""
    attn = layer.self_attn
    kind = getattr(attn, "layer_type", None) or getattr(layer, "attention_type", None)
    if kind is None:
        types = getattr(attn.config, "layer_types", None) or []
        kind = types[attn.layer_idx] if attn.layer_idx < len(types) else "full_attention"
    return kind


def sync_config_(model: EfficientLLMForCausalLM) -> EfficientLLMConfig:
    """Make every config agree with the module widths after in-place pruning.

    Reads hidden width, per-layer heads / KV heads / FFN width and norm eps off the modules, then
    updates the top-level config, the inner family config and each layer's own config, and
    renumbers ``layer_idx`` so the KV cache indexes correctly after a layer removal.
    """
    cfg, inner = model.config, model.model
    layers = inner.layers
    hd = int(cfg.head_dim)
    hidden = inner.embed_tokens.embedding_dim
    hidden_norms = [inner.norm] + [
        n for ly in layers for n in (ly.input_layernorm, ly.post_attention_layernorm)
    ]
    eps = {float(n.variance_epsilon) for n in hidden_norms}
    if len(eps) > 1:
        raise ValueError(f"hidden-size RMSNorms disagree on eps {sorted(eps)}; expected one value")
    layer_types = None
    if getattr(cfg, "layer_types", None) is not None:
        layer_types = [_layer_type(cfg, ly) for ly in layers]

    cfg.hidden_size = hidden
    cfg.num_hidden_layers = len(layers)
    cfg.layer_num_attention_heads = [ly.self_attn.q_proj.out_features // hd for ly in layers]
    cfg.layer_num_key_value_heads = [ly.self_attn.k_proj.out_features // hd for ly in layers]
    cfg.layer_intermediate_size = [ly.mlp.gate_proj.out_features for ly in layers]
    cfg.num_attention_heads = max(cfg.layer_num_attention_heads, default=cfg.num_attention_heads)
    cfg.num_key_value_heads = max(cfg.layer_num_key_value_heads, default=cfg.num_key_value_heads)
    cfg.intermediate_size = max(cfg.layer_intermediate_size, default=cfg.intermediate_size)
    cfg.rms_norm_eps = eps.pop()
    q_norm = getattr(layers[0].self_attn, "q_norm", None) if len(layers) else None
    cfg.head_norm_eps = float(q_norm.variance_epsilon) if q_norm is not None else cfg.rms_norm_eps
    if layer_types is not None:
        cfg.layer_types = layer_types
    if model.lm_head.in_features != hidden:
        raise ValueError(f"lm_head.in_features {model.lm_head.in_features} != hidden {hidden}")

    inner_cfg = inner.config
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "rms_norm_eps",
        "num_attention_heads",
    ):
        setattr(inner_cfg, key, getattr(cfg, key))
    inner_cfg.num_key_value_heads = cfg.num_key_value_heads
    inner_cfg.intermediate_size = cfg.intermediate_size
    if layer_types is not None:
        inner_cfg.layer_types = list(layer_types)
        if hasattr(inner, "has_sliding_layers"):
            inner.has_sliding_layers = "sliding_attention" in layer_types

    for i, layer in enumerate(layers):
        layer_cfg = cfg.layer_config(i)
        attn = layer.self_attn
        for module in layer.modules():
            if isinstance(getattr(module, "config", None), PretrainedConfig):
                module.config = layer_cfg
            if hasattr(module, "layer_idx"):
                module.layer_idx = i
            if hasattr(module, "hidden_size"):
                module.hidden_size = hidden
        attn.num_key_value_groups = (
            cfg.layer_num_attention_heads[i] // cfg.layer_num_key_value_heads[i]
        )
        layer.mlp.intermediate_size = cfg.layer_intermediate_size[i]
        if layer_types is not None:
            if hasattr(attn, "layer_type"):
                attn.layer_type = layer_types[i]
            if hasattr(layer, "attention_type"):
                layer.attention_type = layer_types[i]
            if hasattr(attn, "sliding_window"):
                slide = layer_types[i] == "sliding_attention"
                attn.sliding_window = layer_cfg.sliding_window if slide else None
    model.vocab_size = cfg.vocab_size
    model._sync_attn_implementation()
    return cfg


__all__ = ["EfficientLLMForCausalLM", "EfficientLLMPreTrainedModel", "sync_config_"]
