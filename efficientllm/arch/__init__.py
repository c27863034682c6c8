"""Family adapters, keyed by ``model_type``. Importing this package registers all of them."""

from efficientllm.arch import llama, mistral, qwen2, qwen3  # noqa: F401  (registration)
from efficientllm.arch.base import ArchAdapter, get_adapter, register, supported_model_types

__all__ = ["ArchAdapter", "get_adapter", "register", "supported_model_types"]
