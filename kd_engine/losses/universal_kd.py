"""Output-grounded, attention-based intermediate-layer loss of Universal-KD (Wu, Rezagholizadeh,
Ghaddar, Haidar and Ghodsi, "Universal-KD: Attention-based Output-Grounded Intermediate Layer
Knowledge Distillation", EMNLP 2021, pp. 7649-7661, aclanthology 2021.emnlp-main.603), built on
the attention-based layer projection of ALP-KD (Passban et al., AAAI 2021, equations 5 to 7 of
arXiv 2012.14022).

Every intermediate layer of both models has a pseudo classifier that maps the layer's pooled
representation to label logits: z_S^j for student layer j (m of them), z_T^k for teacher layer
k (n of them). Matching happens in that output space, so the two models may differ in width and
architecture. Each student layer attends over the teacher layers:

    alpha_jk = exp(z_S^j . z_T^k) / sum_k' exp(z_S^j . z_T^k')

- ``attend="logits"`` (the paper's choice; its ablation, table 6, finds it better): the teacher
  logits are fused first, c^j = sum_k alpha_jk z_T^k, and
  L_UKD = sum_j tau^2 KL(softmax(c^j / tau) || softmax(z_S^j / tau));
- ``attend="loss"`` (the ablation's alternative): the per-layer losses are fused,
  L_UKD = sum_j sum_k alpha_jk tau^2 KL(softmax(z_T^k / tau) || softmax(z_S^j / tau)).

KL terms are averaged over the batch, summed over student layers (as L_ALP). No official code
was published, and the paper's full text could not be consulted for this implementation (it
follows the abstract and published summaries of the method); what is our reading is listed in
docs/methods.md. The scores are computed on the pseudo logits (not the hidden states, which
ALP-KD uses), so no projection is needed between architectures; the dot product is unscaled, as
in ALP-KD; tau^2 keeps the gradient scale as in :func:`kd_engine.losses.kd_loss`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812

Attend = Literal["logits", "loss"]


def _check(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> None:
    if student.ndim != 3 or teacher.ndim != 3:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} pseudo logits "
            "must be (B, layers, C)"
        )
    if student.shape[0] != teacher.shape[0] or student.shape[2] != teacher.shape[2]:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} pseudo logits "
            "differ in batch size or number of classes C"
        )
    if student.shape[1] < 1 or teacher.shape[1] < 1:
        raise ValueError("student and teacher need at least one layer each")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def ukd_attention_weights(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """alpha_jk, the weight of teacher layer k for student layer j.

    Args:
        student: z_S, (B, m, C) pseudo logits of the m student layers.
        teacher: z_T, (B, n, C) pseudo logits of the n teacher layers; a constant (no gradient
            flows into it).

    Returns:
        (B, m, n) float32 weights; each row sums to 1 over the teacher layers k. Gradients reach
        the student through them.

    Raises:
        ValueError: shapes do not fit.
    """
    _check(student, teacher, 1.0)
    scores = torch.einsum("bjc,bkc->bjk", student.float(), teacher.detach().float())
    return torch.softmax(scores, dim=-1)


def _kl_rows(log_p_target: torch.Tensor, log_p_student: torch.Tensor) -> torch.Tensor:
    """KL(p_target || p_student) over the last axis, in nats, one value per row."""
    return (log_p_target.exp() * (log_p_target - log_p_student)).sum(dim=-1)


def ukd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float = 1.0,
    attend: Attend = "logits",
) -> torch.Tensor:
    """L_UKD, see the module docstring.

    Args:
        student: z_S, (B, m, C) pseudo logits of the student layers.
        teacher: z_T, (B, n, C) pseudo logits of the teacher layers; treated as a constant.
        temperature: tau > 0 of the soft distributions.
        attend: ``logits`` (fuse the teacher logits, then one KL per student layer) or
            ``loss`` (one KL per student/teacher layer pair, fused by the weights).

    Returns:
        A scalar tensor (nats): summed over student layers, averaged over the batch.

    Raises:
        ValueError: shapes do not fit, temperature <= 0, or an unknown ``attend``.
    """
    _check(student, teacher, temperature)
    z_s = student.float()
    z_t = teacher.detach().float()
    weights = ukd_attention_weights(z_s, z_t)  # (B, m, n)
    log_p_s = F.log_softmax(z_s / temperature, dim=-1)  # (B, m, C)
    if attend == "logits":
        fused = torch.einsum("bjk,bkc->bjc", weights, z_t)  # (B, m, C)
        kl = _kl_rows(F.log_softmax(fused / temperature, dim=-1), log_p_s)  # (B, m)
    elif attend == "loss":
        log_p_t = F.log_softmax(z_t / temperature, dim=-1)  # (B, n, C)
        pairs = _kl_rows(log_p_t.unsqueeze(1), log_p_s.unsqueeze(2))  # (B, m, n)
        kl = (weights * pairs).sum(dim=-1)  # (B, m)
    else:
        raise ValueError(f"attend must be 'logits' or 'loss', got {attend!r}")
    return kl.sum(dim=1).mean() * temperature**2
