"""Knowledge distillation from a frozen teacher (by default the unpruned source).

The student's loss becomes ``(1 - w)·LM + w·T²·KL(p_teacher,T || p_student,T)``, the KL taken
per token over the vocabulary and averaged over tokens (Hinton et al. 2015; the T² keeps the
gradient scale independent of T). Teacher and student must share the vocabulary: pruning never
touches it, so the source is always a valid teacher.

The teacher's cost is reported as forward FLOPs, ``2 · N_teacher · tokens`` with N the parameter
count (a tied ``lm_head`` counted once; an untied model's input embedding, a lookup, is counted
too, so the figure is an upper bound for untied teachers).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from efficientllm.config import DistillConfig

log = logging.getLogger(__name__)


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float):
    """T²·KL(teacher || student) at temperature T, mean over tokens. Logits [..., V]."""
    v = student_logits.shape[-1]
    if teacher_logits.shape[-1] != v:
        raise ValueError(f"teacher vocabulary {teacher_logits.shape[-1]} != student vocabulary {v}")
    s = F.log_softmax(student_logits.float().reshape(-1, v) / temperature, dim=-1)
    t = F.log_softmax(teacher_logits.float().reshape(-1, v) / temperature, dim=-1)
    kl = F.kl_div(s, t, log_target=True, reduction="batchmean")  # sum over V, mean over tokens
    return kl * temperature**2


def mix(lm_loss: torch.Tensor, kd: torch.Tensor, weight: float) -> torch.Tensor:
    """The training loss: ``(1 - weight)·lm_loss + weight·kd``."""
    return (1.0 - weight) * lm_loss + weight * kd


@dataclass
class Teacher:
    """A frozen model that gives logits for a batch, and counts what that cost."""

    model: torch.nn.Module
    params: int
    temperature: float
    weight: float
    phases: str
    tokens: int = 0

    @property
    def flops(self) -> int:
        """Forward FLOPs spent so far: 2 · params · tokens."""
        return 2 * self.params * self.tokens

    def active(self, phase: str) -> bool:
        return self.phases == "both" or self.phases == phase

    @torch.no_grad()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        self.tokens += batch.numel()
        return self.model(batch, use_cache=False).logits

    def loss(self, lm_loss: torch.Tensor, student_logits, batch: torch.Tensor) -> torch.Tensor:
        """The mixed loss for one micro-batch (teacher forward included)."""
        kd = kd_loss(student_logits, self.logits(batch), self.temperature)
        return mix(lm_loss, kd, self.weight)


def check_teacher(cfg: DistillConfig, source: str, vocab_size: int) -> None:
    """Fail before any weights load when the teacher cannot teach this source: it must exist,
    be a supported model, and share the source's vocabulary (the KL compares logits)."""
    if not cfg.enabled or not cfg.teacher:
        return
    from efficientllm.errors import ConfigError
    from efficientllm.model_io import load_config_dict

    try:
        theirs = load_config_dict(cfg.teacher).get("vocab_size")
    except Exception as err:
        raise ConfigError(f"distill.teacher: {err}") from None
    if theirs != vocab_size:
        raise ConfigError(
            f"distill.teacher: {cfg.teacher} has a vocabulary of {theirs} tokens, the source "
            f"{source} has {vocab_size}; distillation needs the same tokenizer (leave "
            "distill.teacher empty to distil from the source itself)"
        )


def load_teacher(
    cfg: DistillConfig, source: str, device: torch.device, *, bf16: bool = False
) -> Teacher | None:
    """The frozen teacher for a run (None when distillation is off); ``auto`` dtype follows the
    student (``bf16``: the student runs under bf16 autocast)."""
    if not cfg.enabled:
        return None
    from efficientllm.model_io import load_model

    path = cfg.teacher or source
    model = load_model(path)
    half = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and bf16)
    model = model.to(device=device, dtype=torch.bfloat16 if half else torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    n = sum(p.numel() for p in model.parameters())  # a tied lm_head is listed once
    log.info(
        "distilling from %s (%s params, T=%s, w=%s)", path, f"{n:,}", cfg.temperature, cfg.weight
    )
    return Teacher(
        model=model,
        params=n,
        temperature=cfg.temperature,
        weight=cfg.weight,
        phases=cfg.phases,
    )
