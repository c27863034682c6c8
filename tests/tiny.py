"""Tiny random models of every supported family, built from configs (no hub, no weights)."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

BASE = dict(
    vocab_size=96,
    hidden_size=48,
    intermediate_size=48,
    num_hidden_layers=3,
    head_dim=8,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)

# name -> config overrides. Covers MHA, GQA, tied/untied, biases, q/k norms.
FAMILIES: dict[str, dict] = {
    "llama_mha": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4,
                      tie_word_embeddings=False),
    "llama_gqa_tied": dict(model_type="llama", num_attention_heads=6, num_key_value_heads=2,
                           tie_word_embeddings=True),
    "llama_bias": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=2,
                       attention_bias=True, mlp_bias=True, tie_word_embeddings=False),
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2,
                    tie_word_embeddings=False, sliding_window=None),
    "qwen2": dict(model_type="qwen2", num_attention_heads=6, num_key_value_heads=2,
                  tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=2,
                  tie_word_embeddings=True),
}


def tiny_config(name: str, **overrides):
    kw = {**BASE, **FAMILIES[name], **overrides}
    model_type = kw.pop("model_type")
    return AutoConfig.for_model(model_type, **kw)


def tiny_model(name: str, seed: int = 0, **overrides):
    """A randomly initialised family model in fp32, eval mode, with non-trivial norms/biases."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(name, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith(".bias"):
                # random norms/biases so that slicing mistakes show up in the logits
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()
