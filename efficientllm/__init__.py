"""EfficientLLM: pruning-aware pretraining of Llama-style causal LMs.

``import efficientllm`` registers the heterogeneous model with transformers' Auto classes (when
torch and transformers are installed), so that exports load with ``AutoModelForCausalLM``.
The shape/count/plan modules work without torch.
"""

from __future__ import annotations

import importlib.util

__version__ = "0.1.0"

if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
    from efficientllm.modeling import register_auto_classes as _register

    _register()
