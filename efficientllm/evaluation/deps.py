"""lm-eval as an optional dependency: the import guard, the install hint, and the argument
conversions lm-eval's ``--model_args`` strings need."""

from __future__ import annotations

import logging
from typing import Any

import torch

from efficientllm.errors import ConfigError, EfficientLLMError

log = logging.getLogger(__name__)

LM_EVAL_HINT = "lm-eval is not installed: pip install 'efficientllm[eval]'"


class MissingDependencyError(EfficientLLMError, ImportError):
    """An optional dependency (here lm-eval) is not installed."""


try:
    import lm_eval
    from lm_eval.api.model import TemplateLM
except ImportError:  # pragma: no cover - exercised only without the [eval] extra
    lm_eval = None
    TemplateLM = object


def require_lm_eval() -> Any:
    """The ``lm_eval`` module, or a clear error saying how to install it."""
    if lm_eval is None:
        raise MissingDependencyError(LM_EVAL_HINT)
    return lm_eval


def int_batch_size(value: int | str | None, default: int = 8) -> int:
    """lm-eval's CLI passes ``batch_size`` as text ("8", "auto", "auto:4")."""
    if value is None:
        return default
    if isinstance(value, str) and value.startswith("auto"):
        log.warning("batch_size %r: automatic batch sizes are not supported; using %d", value, 8)
        return default
    try:
        size = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"batch_size must be a whole number, got {value!r}") from None
    if size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {size}")
    return size


def resolve_dtype(dtype: Any) -> Any:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).removeprefix("torch.")
    if name == "auto":
        return None
    got = getattr(torch, name, None)
    if not isinstance(got, torch.dtype):
        raise ConfigError(f"dtype {dtype!r} is not a torch dtype; use float32, bfloat16 or float16")
    return got
