"""The heterogeneous-width model (per-layer heads, KV heads, FFN width); Auto registration."""

from __future__ import annotations

from transformers import AutoConfig, AutoModelForCausalLM

from efficientllm.modeling.configuration_efficientllm import (
    EfficientLLMConfig,
    config_from_family,
)
from efficientllm.modeling.modeling_efficientllm import (
    EfficientLLMForCausalLM,
    sync_config_,
)


def register_auto_classes() -> None:
    """Register the heterogeneous config/model with transformers' Auto classes (idempotent)."""
    AutoConfig.register(EfficientLLMConfig.model_type, EfficientLLMConfig, exist_ok=True)
    AutoModelForCausalLM.register(EfficientLLMConfig, EfficientLLMForCausalLM, exist_ok=True)


register_auto_classes()

__all__ = [
    "EfficientLLMConfig",
    "EfficientLLMForCausalLM",
    "config_from_family",
    "register_auto_classes",
    "sync_config_",
]
