"""Optional int8 weight-only quantization of a PyTorch model with torchao (PyTorch's own
quantization library): every decoder ``nn.Linear`` (and by default ``lm_head``) keeps an int8
weight with one scale per output channel; activations stay in floating point. On CPU the matmul
runs through ``torch._weight_int8pack_mm``.

torchao is not a dependency (``pip install torchao torch==2.13.0``: its wheel declares no torch
requirement, so the pin keeps the local torch). The quantized weights are torchao tensor
subclasses: they run in PyTorch but are not written to safetensors by ``export_model``, which
stores plain tensors only (and refuses pickles); quantize after loading an export instead.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from efficientllm.errors import ExportError

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install torchao torch==2.13.0"


def torchao_available() -> bool:
    """True when torchao imports and provides the int8 weight-only config."""
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_  # noqa: F401
    except Exception:  # ImportError, or a torchao built for another torch failing on import
        return False
    return True


def quantize_int8_weights_(model: nn.Module, *, lm_head: bool = True) -> nn.Module:
    """Quantize ``model``'s linear weights to int8 in place (weight-only, per output channel).

    ``lm_head=False`` keeps the output projection in float (with tied embeddings quantizing it
    unties it: the embedding keeps its float copy). Returns ``model``. Raises ``ExportError``
    when torchao is not installed.
    """
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except Exception as err:
        raise ExportError(f"int8 quantization needs torchao: {INSTALL_HINT} ({err})") from err
    head = getattr(model, "lm_head", None)

    def wanted(module: nn.Module, fqn: str) -> bool:
        return isinstance(module, nn.Linear) and (lm_head or module is not head)

    if head is not None and lm_head:
        # quantize_ swaps the weight of lm_head; keep the embedding's own (float) parameter
        emb: Any = model.get_input_embeddings()  # type: ignore[operator]
        if emb is not None and emb.weight is head.weight:
            head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)
    with torch.no_grad():
        quantize_(model, Int8WeightOnlyConfig(), filter_fn=wanted)
    n = sum(1 for m in model.modules() if isinstance(m, nn.Linear))
    logger.info("int8 weight-only quantized %d linear layers (lm_head: %s)", n, lm_head)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers (int8 data + scales once quantized)."""
    total = 0
    seen: set[int] = set()
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        flatten: Any = getattr(t, "__tensor_flatten__", None)
        if flatten is not None:  # a torchao tensor subclass: count its inner tensors
            names, _ = flatten()
            total += sum(getattr(t, k).numel() * getattr(t, k).element_size() for k in names)
        else:
            total += t.numel() * t.element_size()
    return total


__all__ = ["INSTALL_HINT", "quantize_int8_weights_", "torchao_available", "weight_bytes"]
