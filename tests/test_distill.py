"""Knowledge distillation: the loss against hand-computed references (no model needed)."""

from __future__ import annotations

import math

import pytest
import torch

from efficientllm.training.distill import kd_loss, mix


def _reference_kd(student, teacher, temperature: float) -> float:
    """T^2 * mean over tokens of sum_v p_t(v) * (log p_t(v) - log p_s(v)), in plain Python."""
    v = student.shape[-1]
    s_rows = student.reshape(-1, v).tolist()
    t_rows = teacher.reshape(-1, v).tolist()

    def log_softmax(row):
        z = [x / temperature for x in row]
        m = max(z)
        lse = m + math.log(sum(math.exp(x - m) for x in z))
        return [x - lse for x in z]

    total = 0.0
    for s_row, t_row in zip(s_rows, t_rows, strict=True):
        ls, lt = log_softmax(s_row), log_softmax(t_row)
        total += sum(math.exp(b) * (b - a) for a, b in zip(ls, lt, strict=True))
    return temperature**2 * total / len(s_rows)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_kd_loss_is_t2_kl_teacher_student(temperature) -> None:
    g = torch.Generator().manual_seed(0)
    student = torch.randn(2, 3, 7, generator=g) * 3
    teacher = torch.randn(2, 3, 7, generator=g) * 3
    got = kd_loss(student, teacher, temperature)
    assert got.dim() == 0
    assert float(got) == pytest.approx(_reference_kd(student, teacher, temperature), rel=1e-5)
    assert float(got) > 0
    # KL(teacher || student), not the reverse direction
    reverse = _reference_kd(teacher, student, temperature)
    assert abs(float(got) - reverse) > 1e-3


def test_kd_loss_is_zero_for_equal_logits_and_gives_student_gradients() -> None:
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 5, 11, generator=g)
    assert float(kd_loss(logits, logits.clone(), 1.5)) == pytest.approx(0.0, abs=1e-6)
    # bf16 teacher logits (the GPU default) are compared in fp32
    assert kd_loss(logits, logits.bfloat16(), 1.0).dtype == torch.float32
    student = torch.randn(4, 5, 11, generator=g, requires_grad=True)
    kd_loss(student, logits, 1.0).backward()
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_kd_loss_rejects_a_different_vocabulary() -> None:
    with pytest.raises(ValueError, match="vocabulary"):
        kd_loss(torch.zeros(2, 8), torch.zeros(2, 9), 1.0)


def test_mix() -> None:
    lm, kd = torch.tensor(3.0), torch.tensor(1.0)
    assert float(mix(lm, kd, 0.0)) == 3.0
    assert float(mix(lm, kd, 1.0)) == 1.0
    assert float(mix(lm, kd, 0.25)) == pytest.approx(0.75 * 3.0 + 0.25 * 1.0)
