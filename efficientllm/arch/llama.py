"""Llama: SmolLM/SmolLM2, TinyLlama, Llama-2/3.x. ``attention_bias`` covers q/k/v and o."""

from efficientllm.arch.base import ArchAdapter, _field, register

LLAMA = register(
    ArchAdapter(
        model_type="llama",
        examples="SmolLM2, TinyLlama, Llama-3.x",
        qkv_bias=_field("attention_bias"),
        o_bias=_field("attention_bias"),
        mlp_bias=_field("mlp_bias"),
    )
)
