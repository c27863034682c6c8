"""Mistral: no biases; optional sliding window (kept as is)."""

from efficientllm.arch.base import ArchAdapter, register

MISTRAL = register(ArchAdapter(model_type="mistral", examples="Mistral-7B"))
