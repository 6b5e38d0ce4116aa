"""Contrastive intermediate-layer loss L_CRD of CILDA (Haidar, Rezagholizadeh, Ghaddar, Bibi,
Langlais and Poupart, "CILDA: Contrastive Data Augmentation using Intermediate Layer Knowledge
Distillation", COLING 2022, section 3 (the contrastive term of the generator's loss), after the
contrastive representation distillation of Tian et al., ICLR 2020).

For teacher vector t_k and student vectors s_j of the same batch (B examples):

    L_CRD = mean_k -log( exp(cos(t_k, s_k) / tau) / sum_j exp(cos(t_k, s_j) / tau) )

The positive of teacher example k is the student's view of the same example k; the other
B - 1 student vectors are its negatives. The denominator includes the positive. In CILDA, h is
the concatenation of every layer's [CLS] state, linearly projected to 128 and L2-normalised;
the caller builds that (see ``kd_engine.methods.crd.CRDHead``). No official code was published;
a public third-party reimplementation computes the same quantity one anchor at a time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812


def crd_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """L_CRD over the batch (cosine similarity, positives on the diagonal).

    Args:
        student: s, (B, u) student representations (projected; need not be normalised).
        teacher: t, (B, u) teacher representations of the same B examples, same order.
            Gradients flow into both (their projections are learned).
        temperature: tau > 0 (CILDA: tau2 = 2).

    Returns:
        A scalar tensor (nats), in [0, log B + 2/tau]; 0 for a batch of one example.

    Raises:
        ValueError: shapes differ or are not (B, u), or temperature is not positive.
    """
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must both be (B, u)"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    with torch.autocast(student.device.type, enabled=False):  # float32 even under autocast
        s = F.normalize(student.float(), dim=-1, eps=1e-8)
        t = F.normalize(teacher.float(), dim=-1, eps=1e-8)
        logits = t @ s.T / temperature  # (B, B): row k = teacher anchor k vs every student j
        targets = torch.arange(logits.shape[0], device=logits.device)
        return F.cross_entropy(logits, targets)
