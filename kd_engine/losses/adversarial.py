"""The divergence a MATE-KD generator maximises between teacher and student on its samples
(Rashid et al., "MATE-KD: Masked Adversarial TExt, a Companion to Knowledge Distillation",
ACL 2021, section 3, the max step), with gradients through BOTH models' outputs (so that they
reach the generator through each model's input), unlike :func:`kd_engine.losses.kd_loss`,
whose teacher side is a constant."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812

GeneratorObjective = Literal["kl", "cross_entropy"]
"""What the generator maximises: ``kl``, KL(softmax(z_t/tau) || softmax(z_s/tau)) (the paper's
max step), or ``cross_entropy``, H(softmax(z_t/tau), softmax(z_s/tau)) = KL + H(teacher): what
the authors' ``divergence()`` computes (huawei-noah/Efficient-NLP
``MATE-KD/train_adversarial_student.py``), which also rewards raising the teacher's entropy on
the rewritten input. Both give the student the same gradient; they differ for the generator."""


def generator_divergence(
    teacher_logits: torch.Tensor,
    student_logits: torch.Tensor,
    temperature: float = 1.0,
    objective: GeneratorObjective = "kl",
) -> torch.Tensor:
    """The max-step divergence D(T(x'), S(x')), averaged over the batch; gradients flow into
    both arguments. For one output (C = 1, regression) it is MSE(z_s, z_t) (the authors' STS-B
    branch), whatever the objective.

    Args:
        teacher_logits: z_t (B, C).
        student_logits: z_s (B, C).
        temperature: tau > 0 (the authors' ``KL_temperature`` 1.0).
        objective: ``kl`` or ``cross_entropy`` (:data:`GeneratorObjective`).

    Returns:
        A scalar float32 tensor in nats (squared output units for C = 1).

    Raises:
        ValueError: shapes differ or are not (B, C), or the temperature is not positive.
    """
    if teacher_logits.shape != student_logits.shape or teacher_logits.ndim != 2:
        raise ValueError(
            f"teacher {tuple(teacher_logits.shape)} and student {tuple(student_logits.shape)} "
            "logits must both be (B, C)"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    t, s = teacher_logits.float(), student_logits.float()
    if t.shape[1] == 1:
        return F.mse_loss(s, t)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    p_t = log_p_t.exp()
    cross = -(p_t * log_p_s).sum(-1)
    if objective == "cross_entropy":
        return cross.mean()
    return (cross + (p_t * log_p_t).sum(-1)).mean()
