"""Shared type aliases (torch-free)."""

from __future__ import annotations

from typing import Any

LlamaLike = Any
"""A Llama-style Hugging Face causal LM, or one of its parts (``model.model.layers[i]``,
``.self_attn``, ``.mlp``). ``nn.Module`` types every submodule as ``Tensor | Module``; the code
reads this structure duck-typed (``arch/`` checks it when a model is loaded), so the type
checker is told so here, in one place."""
