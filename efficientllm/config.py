"""The run configuration: the one interface that the CLI, the web form and the worker present.

Frozen keyword-only dataclasses, one per concern, each field documented in its docstring line.
``RunConfig.from_dict`` / ``load_config`` build and *validate* a config and raise one
``ConfigError`` that lists every problem found, not only the first.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from efficientllm.choices import (
    Compensation,
    DistillPhases,
    Dtype,
    ExportFormat,
    Fisher,
    GGUFChoice,
    Granularity,
    GroupKind,
    LRSchedule,
    SaliencyMode,
    Scorer,
    Trajectory,
)
from efficientllm.config_io import build_dataclass, field_docs, read_config_dict
from efficientllm.errors import ConfigError

__all__ = [
    "BudgetConfig",
    "DataConfig",
    "DistillConfig",
    "ExportConfig",
    "ModelConfig",
    "RunConfig",
    "SaliencyConfig",
    "ScheduleConfig",
    "TrainConfig",
    "field_docs",
    "load_config",
    "read_config_dict",
    "save_config",
    "validate",
]


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    source: str = ""
    """Hub id (org/name) or local folder of the source model (config.json + *.safetensors)."""
    dtype: Dtype = "auto"
    """Compute dtype: auto = fp32 on CPU, bf16 autocast on GPU (weights stay fp32)."""


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    train: list[str] = field(default_factory=list)
    """Training text: .txt/.md files or folders, .jsonl/.parquet, or ``hub:<dataset id>``."""
    heldout: list[str] = field(default_factory=list)
    """Held-out text for validation perplexity. Empty: split ``train`` by document."""
    heldout_fraction: float = 0.1
    """Share of training documents held out when ``heldout`` is empty."""
    text_field: str = "text"
    """Field/column holding the text in .jsonl/.parquet/hub datasets."""
    block_len: int = 256
    """Tokens per training block (sequence length)."""


@dataclass(frozen=True, kw_only=True)
class BudgetConfig:
    target: str = "50%"
    """Final parameter count: 67M, 0.5B, 67000000, or a ratio of the source like 50%. ``none``
    trains the source as it is, without pruning (continued pretraining, or a baseline)."""
    granularity: Granularity = "global"
    """uniform: every layer keeps the same widths; global: widths per layer chosen by saliency."""
    kinds: list[GroupKind] = field(default_factory=lambda: ["qhead", "kvgroup", "ffn", "hidden"])
    """Group kinds that may be removed (add "layer" to allow dropping whole blocks)."""
    hidden_multiple: int = 8
    """Hidden channels are removed in blocks of this many (hardware-friendly widths)."""
    ffn_multiple: int = 8
    """FFN channels are removed in blocks of this many."""
    tolerance: float = 0.005
    """The final count lands at most this fraction below the budget (never above)."""

    @property
    def no_pruning(self) -> bool:
        """``target: none``: plain training at the source's shape."""
        return self.target.strip().lower() == "none"


@dataclass(frozen=True, kw_only=True)
class SaliencyConfig:
    scorer: Scorer = "taylor1"
    """taylor1 |w*g| (default), taylor_mix |w*g - F w^2/2|, magnitude |w|, random (control)."""
    fisher: Fisher = "adam"
    """For taylor_mix: F from the step's squared gradient or from Adam's exp_avg_sq."""
    mode: SaliencyMode = "ema"
    """ema (default since the cpu-real benchmark): exponential moving average; window: mean since
    the last pruning event (the paper)."""
    beta: float = 0.9
    """EMA decay (mode ema): each step's scores enter with weight 1-beta, so the average looks
    back about 1/(1-beta) steps (0.9: ~10 steps) and, unlike the window, carries history across
    pruning events."""


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    prune_fraction: float = 0.5
    """Share of the total training tokens over which the size goes to the budget."""
    start_fraction: float = 0.0
    """Stabilisation share: tokens trained at full size before pruning starts (t0)."""
    trajectory: Trajectory = "cubic"
    """Size over the pruning phase: cubic (default; Zhu & Gupta 2017: P* + (P0-P*)(1-f)^3, fast
    early while the model is redundant, slow near the budget) or linear in tokens (the paper)."""
    prune_every: int = 2
    """Optimizer steps between pruning events."""
    compensation: Compensation = "none"
    """none: variant A, no weight compensation (the paper's headline models). obs: variant B, a
    local second-order (OBS) update of the consuming layer before each removal, from H = XᵀX of
    its inputs since the last event (costs one in×in matrix per consumer; resume restarts H)."""


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    total_tokens: int = 200_000
    """Training tokens in all: pruning phase + recovery."""
    batch_size: int = 4
    """Blocks per micro-batch and per process. On N processes (torchrun / accelerate launch)
    the global batch is N x batch_size x grad_accum blocks, drawn in the order a one-process run
    with batch N x batch_size draws them (rank r takes the r-th share)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 3e-4
    """Peak learning rate (AdamW), pruning phase."""
    recovery_lr: float = 3e-4
    """Peak learning rate of the recovery phase (lr_schedule rewarm)."""
    lr_schedule: LRSchedule = "continuous"
    """continuous (default): one warmup + cosine over the whole run (recovery_lr unused);
    rewarm: warmup + cosine over the pruning phase, then a fresh one for recovery (the paper)."""
    min_lr_ratio: float = 0.1
    """Cosine floor as a fraction of the peak."""
    warmup_steps: int = 5
    """Linear warmup steps (each phase)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 = off)."""
    seed: int = 0
    """Seed for data order, init of anything random, and the random scorer."""
    eval_every: int = 0
    """Optimizer steps between validation perplexities (0 = only start, end of pruning, end)."""
    eval_tokens: int = 8192
    """Held-out tokens per validation."""
    checkpoint_every: int = 50
    """Optimizer steps between checkpoints (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Newest complete checkpoints kept on disk."""
    device: str = "auto"
    """auto, cpu, cuda, cuda:1 ..."""
    deterministic: bool = False
    """One thread + deterministic algorithms (bitwise-reproducible CPU runs; slower)."""


@dataclass(frozen=True, kw_only=True)
class DistillConfig:
    weight: float = 0.5
    """Share of the loss that is knowledge distillation from the frozen teacher (0 = off; the
    default 0.5 won the cpu-real benchmark together with the other defaults):
    loss = (1-weight)*LM + weight*T^2*KL(teacher || student) on the logits at temperature T."""
    temperature: float = 1.0
    """Softmax temperature T of the distillation KL."""
    teacher: str = ""
    """Teacher model (hub id or folder); empty = the run's source model, frozen as loaded."""
    phases: DistillPhases = "both"
    """Steps that distill: the pruning phase (with the stabilisation steps before it), recovery,
    or both."""
    dtype: Dtype = "auto"
    """Teacher weights, on the student's device: auto = the student's precision (bf16 when it
    trains under bf16 autocast, else fp32)."""

    @property
    def enabled(self) -> bool:
        return self.weight > 0


@dataclass(frozen=True, kw_only=True)
class ExportConfig:
    format: ExportFormat = "auto"
    """auto: the vanilla family class when the final shape allows, else the heterogeneous one."""
    gguf: GGUFChoice = "q8_0"
    """Also write a GGUF file for llama.cpp (a per-layer shape as its ``deci`` architecture):
    q8_0 (about 1 byte a weight), f16, f32, or none. A model GGUF cannot represent is noted and
    skipped; the export folder is written either way."""


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    saliency: SaliencyConfig = field(default_factory=SaliencyConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    out_dir: str = "runs/run"
    """Folder for events.jsonl, checkpoints/ and export/ (re-running resumes)."""

    # ---- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        problems: list[str] = []
        cfg = build_dataclass(cls, d, "", problems)
        problems += validate(cfg)  # fields that failed to parse hold defaults: check the rest
        if problems:
            raise ConfigError(problems)
        return cfg

    def replace(self, **section_updates: dict[str, Any]) -> RunConfig:
        """A copy with some fields changed, e.g. ``cfg.replace(train={"lr": 1e-4})``; validated."""
        d = self.to_dict()
        for section, values in section_updates.items():
            if isinstance(values, dict):
                d[section] = {**d[section], **values}
            else:
                d[section] = values
        return RunConfig.from_dict(d)


def _rng(
    problems: list[str],
    where: str,
    value: float,
    lo: float,
    hi: float,
    lo_open: bool = False,
    hi_open: bool = False,
) -> None:
    bad = value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi)
    if bad:
        lb, rb = "(" if lo_open else "[", ")" if hi_open else "]"
        problems.append(f"{where}: {value} is outside {lb}{lo}, {hi}{rb}")


def validate(cfg: RunConfig) -> list[str]:
    """Every problem with ``cfg`` as a list of messages (empty when valid)."""
    p: list[str] = []
    t, s, b, d = cfg.train, cfg.schedule, cfg.budget, cfg.data
    if not cfg.model.source.strip():
        p.append("model.source: choose a source model (hub id or folder)")
    if not d.train:
        p.append("data.train: give at least one text file, folder or hub:<dataset>")
    _rng(p, "data.heldout_fraction", d.heldout_fraction, 0, 0.5, lo_open=True)
    _rng(p, "data.block_len", d.block_len, 8, 1 << 16)
    _rng(p, "train.total_tokens", t.total_tokens, 1, 1e13)
    _rng(p, "train.batch_size", t.batch_size, 1, 4096)
    _rng(p, "train.grad_accum", t.grad_accum, 1, 4096)
    _rng(p, "train.lr", t.lr, 0, 1, lo_open=True)
    _rng(p, "train.recovery_lr", t.recovery_lr, 0, 1, lo_open=True)
    _rng(p, "train.min_lr_ratio", t.min_lr_ratio, 0, 1)
    _rng(p, "train.warmup_steps", t.warmup_steps, 0, 1e9)
    _rng(p, "train.weight_decay", t.weight_decay, 0, 1)
    _rng(p, "train.grad_clip", t.grad_clip, 0, 1e6)
    _rng(p, "train.eval_every", t.eval_every, 0, 1e9)
    _rng(p, "train.eval_tokens", t.eval_tokens, 0, 1e10)
    _rng(p, "train.checkpoint_every", t.checkpoint_every, 0, 1e9)
    _rng(p, "train.keep_checkpoints", t.keep_checkpoints, 1, 1000)
    _rng(p, "schedule.prune_fraction", s.prune_fraction, 0, 1, lo_open=True)
    _rng(p, "schedule.start_fraction", s.start_fraction, 0, 1, hi_open=True)
    if s.start_fraction + s.prune_fraction > 1:
        p.append("schedule: start_fraction + prune_fraction must be at most 1")
    _rng(p, "schedule.prune_every", s.prune_every, 1, 1e9)
    _rng(p, "saliency.beta", cfg.saliency.beta, 0, 1, hi_open=True)
    _rng(p, "distill.weight", cfg.distill.weight, 0, 1)
    _rng(p, "distill.temperature", cfg.distill.temperature, 0, 100, lo_open=True)
    _rng(p, "budget.hidden_multiple", b.hidden_multiple, 1, 4096)
    _rng(p, "budget.ffn_multiple", b.ffn_multiple, 1, 4096)
    _rng(p, "budget.tolerance", b.tolerance, 0, 0.5)
    if not b.kinds:
        p.append("budget.kinds: allow at least one group kind")
    if not b.no_pruning:
        try:
            from efficientllm.pruning.budget import parse_budget

            parse_budget(b.target, 10**12)
        except ConfigError as err:
            p.append(f"budget.target: {err}")
    tokens_per_step = t.batch_size * t.grad_accum * d.block_len
    if t.total_tokens < tokens_per_step:
        p.append(
            f"train.total_tokens: {t.total_tokens} is less than one optimizer step "
            f"({tokens_per_step} tokens = batch_size x grad_accum x block_len)"
        )
    return p


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML or JSON file into a validated ``RunConfig``."""
    return RunConfig.from_dict(read_config_dict(path))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n", encoding="utf-8")
