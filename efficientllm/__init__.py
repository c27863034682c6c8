"""EfficientLLM: pruning-aware pretraining of Llama-style causal LMs.

``import efficientllm`` is light (no torch): the shape, budget, config and preset modules work
without it. The heterogeneous model is registered with transformers' Auto classes as soon as
transformers loads them, so ``AutoModelForCausalLM.from_pretrained(export)`` finds it.
"""

from __future__ import annotations

from efficientllm import _autoregister

__version__ = "0.1.0"

_autoregister.install()
