"""The cpu-scale source model: a tokenizer and a small Llama trained on the training books.

A 135M model trains at ~115 tokens/s on two cores, too slow for four arms in an hour, so the
cpu scale makes its own source: a byte-level BPE tokenizer trained on the training books, a
small Llama initialised at random and pretrained on the same books with the project's trainer
(budget ``none``). Both are cached under ``<cache>/bench-quality/`` by a hash of everything that
shapes them; held-out text is never seen.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from pathlib import Path

from bench.quality.scales import Scale

EOT = "<|endoftext|>"


def _fingerprint(scale: Scale, train_files: list[Path]) -> str:
    keys = [
        "vocab_size",
        "hidden_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "ffn_size",
        "source_tokens",
        "source_lr",
        "block_len",
        "batch_size",
        "warmup_steps",
        "seed",
        "deterministic",
    ]
    d = {k: getattr(scale, k) for k in keys}
    d["deterministic"] = scale.source_deterministic
    d["seed"] = scale.source_seed
    h = hashlib.sha256(json.dumps(d, sort_keys=True).encode())
    for f in train_files:
        h.update(hashlib.sha256(Path(f).read_bytes()).digest())
    return h.hexdigest()[:12]


def train_tokenizer(texts: list[str], vocab_size: int, out: Path):
    """Byte-level BPE (no unknown tokens) with one special token used as BOS and EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOT, eos_token=EOT, model_max_length=1 << 20
    )
    fast.save_pretrained(out)
    return fast


def random_model_folder(config, tokenizer, out: Path, *, seed: int) -> Path:
    """Save a randomly initialised model of ``config`` (+ tokenizer) as a loadable folder."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if out.exists():
        shutil.rmtree(out)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def pretrained_source(
    scale: Scale,
    train_files: list[Path],
    heldout_files: list[Path],
    cache: Path,
    say=print,
) -> tuple[Path, dict]:
    """The cached source folder and how it was made (trained here on first use)."""
    from efficientllm.training.data import read_documents

    folder = cache / f"source-{_fingerprint(scale, train_files)}"
    meta_file = folder / "source.json"
    if meta_file.is_file():
        say(f"source model: cached {folder}")
        return folder / "model", json.loads(meta_file.read_text())
    if folder.exists():
        shutil.rmtree(folder)  # an earlier attempt died half-way
    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    texts = [d.text for d in read_documents(train_files)]
    say(f"source model: training a {scale.vocab_size}-token BPE tokenizer on the training books")
    tok = train_tokenizer(texts, scale.vocab_size, folder / "tokenizer")

    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=scale.hidden_size,
        intermediate_size=scale.ffn_size,
        num_hidden_layers=scale.num_layers,
        num_attention_heads=scale.num_heads,
        num_key_value_heads=scale.num_kv_heads,
        max_position_embeddings=max(1024, scale.block_len),
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )
    init = random_model_folder(config, tok, folder / "init", seed=scale.source_seed)
    say(f"source model: pretraining from random init on {scale.source_tokens:,} tokens")
    from bench.quality.arms import train

    run = train(
        "source",
        init,
        folder / "run",
        dataclasses.replace(scale, seed=scale.source_seed),
        train_files=train_files,
        heldout_files=heldout_files,
        tokens=scale.source_tokens,
        lr=scale.source_lr,
        deterministic=scale.source_deterministic,
        say=say,
    )
    (folder / "run" / "export").rename(folder / "model")
    meta = {
        "tokenizer": f"byte-level BPE, {len(tok)} tokens, trained on the training books",
        "config": {
            k: getattr(config, k)
            for k in [
                "vocab_size",
                "hidden_size",
                "intermediate_size",
                "num_hidden_layers",
                "num_attention_heads",
                "num_key_value_heads",
                "tie_word_embeddings",
            ]
        },
        "params": run["params"],
        "tokens": scale.source_tokens,
        "lr": scale.source_lr,
        "heldout_ppl_curve": run["curve"],
        "seconds": round(time.perf_counter() - t0, 1),
    }
    shutil.rmtree(folder / "run", ignore_errors=True)
    shutil.rmtree(init, ignore_errors=True)
    meta_file.write_text(json.dumps(meta, indent=2))
    return folder / "model", meta
