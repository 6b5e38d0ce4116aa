"""Soft-target KD loss (Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural
Network", section 2)."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812


def kd_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau)), averaged over the batch.

    The tau^2 factor keeps the gradient scale of the soft term independent of the temperature
    (Hinton et al. 2015, end of section 2), as in DistilBERT and torchdistill.

    Args:
        student_logits: z_s, shape (B, C).
        teacher_logits: z_t, shape (B, C); treated as a constant (no gradient flows into it).
        temperature: tau > 0.

    Returns:
        A scalar tensor (nats).

    Raises:
        ValueError: shapes differ, or temperature is not positive.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits "
            f"{tuple(teacher_logits.shape)} differ in shape"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p_s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher_logits.detach().float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2
