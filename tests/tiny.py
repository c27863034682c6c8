"""Tiny random models of every supported family, built from configs (no hub, no weights)."""

from __future__ import annotations

import random

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
    "llama_mha": dict(
        model_type="llama", num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False
    ),
    "llama_gqa_tied": dict(
        model_type="llama", num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True
    ),
    "llama_bias": dict(
        model_type="llama",
        num_attention_heads=4,
        num_key_value_heads=2,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=False,
    ),
    "mistral": dict(
        model_type="mistral",
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        sliding_window=None,
    ),
    "qwen2": dict(
        model_type="qwen2", num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True
    ),
    "qwen3": dict(
        model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True
    ),
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


WORDS = [
    "the",
    "a",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "it",
    "he",
    "she",
    "they",
    "we",
    "you",
    "that",
    "his",
    "her",
    "not",
    "for",
    "on",
    "with",
    "as",
    "at",
    "by",
    "but",
    "from",
    "this",
    "all",
    "were",
    "had",
    "have",
    "be",
    "one",
    "which",
    "their",
    "there",
    "when",
    "what",
    "said",
    "so",
    "out",
    "up",
    "time",
    "day",
    "night",
    "house",
    "garden",
    "letter",
    "sister",
    "walk",
    "morning",
    "evening",
    "happy",
    "quiet",
]


def tiny_text(seed: int, n_paragraphs: int = 30) -> str:
    """Deterministic pseudo-English over a small alphabet (lowercase letters, space, '.')."""
    rng = random.Random(seed)
    paras = []
    for _ in range(n_paragraphs):
        sents = [
            " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 14))) + "."
            for _ in range(rng.randint(2, 5))
        ]
        paras.append(" ".join(sents))
    return "\n\n".join(paras)


def tiny_tokenizer(vocab_size: int = 96):
    """A BPE tokenizer trained locally on ``tiny_text`` (no hub), with <s>, </s>, <unk>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"])
    tok.train_from_iterator([tiny_text(s) for s in range(5)], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny_source(folder, name: str = "llama_gqa_tied", seed: int = 0, **overrides):
    """A tiny 'uploaded' source model folder: safetensors + config.json + tokenizer."""
    from pathlib import Path

    folder = Path(folder)
    model = tiny_model(name, seed=seed, **overrides)
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


def save_tiny_corpus(folder, n_docs: int = 6, n_paragraphs: int = 30):
    """``n_docs`` text files of pseudo-English; returns their paths."""
    from pathlib import Path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n_docs):
        p = folder / f"doc{i}.txt"
        p.write_text(tiny_text(100 + i, n_paragraphs), encoding="utf-8")
        paths.append(p)
    return paths
