"""Qwen2 / Qwen2.5: q/k/v carry a bias, o_proj and the MLP do not."""

from efficientllm.arch.base import ArchAdapter, _const, register

QWEN2 = register(
    ArchAdapter(model_type="qwen2", examples="Qwen2.5-0.5B/1.5B", qkv_bias=_const(True))
)
