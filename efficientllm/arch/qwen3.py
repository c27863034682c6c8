"""Qwen3: per-head RMSNorm on q and k over head_dim (never pruned); attention_bias on q/k/v/o."""

from efficientllm.arch.base import ArchAdapter, _field, register

QWEN3 = register(
    ArchAdapter(
        model_type="qwen3",
        examples="Qwen3-0.6B/1.7B",
        qkv_bias=_field("attention_bias"),
        o_bias=_field("attention_bias"),
        qk_norm=True,
    )
)
