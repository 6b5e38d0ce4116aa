"""Intermediate-layer loss of RAIL-KD (Haidar, Anchuri, Rezagholizadeh, Ghaddar, Langlais and
Poupart, "RAIL-KD: RAndom Intermediate Layer Mapping for Knowledge Distillation", Findings of
NAACL 2022, section 3 (the layer-wise loss RAIL-KD_l and the concatenated loss RAIL-KD_c)).

Both sides are pooled per layer, linearly projected to a shared size u (the projections are
learned modules owned by the method), L2-normalised and compared:

    layer-wise:    L = sum_i || s_i / |s_i| - t_i / |t_i| ||^2       (s_i = W_S^i h_S^i, ...)
    concatenated:  L = || s / |s| - t / |t| ||^2   (s = W_S [h_S^1; ...; h_S^m], ...)

each averaged over the batch. No official code was published; a public third-party
reimplementation (a CILDA/minILD code base) uses the unsquared distance, we keep the paper's
squared one. Unlike :func:`kd_engine.losses.normalized_mse.normalized_mse` (PKD, CKD), the
teacher side is not detached: its projection W_T is learned too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F  # noqa: N812


def rail_pair_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of || s/|s| - t/|t| ||^2 (in [0, 4]; = 2 - 2 cos(s, t)).

    Args:
        student: s, (B, u).
        teacher: t, (B, u). Gradients flow into both (their projections are learned); the
            hidden states the caller projected are constants.

    Returns:
        A scalar tensor (dimensionless).

    Raises:
        ValueError: shapes differ or are not (B, u).
    """
    if student.ndim != 2 or student.shape != teacher.shape:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must both be (B, u)"
        )
    s = F.normalize(student.float(), dim=-1, eps=1e-8)
    t = F.normalize(teacher.float(), dim=-1, eps=1e-8)
    return (s - t).pow(2).sum(dim=-1).mean()


def rail_loss(student: Sequence[torch.Tensor], teacher: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_i rail_pair_loss(student[i], teacher[i]): the layer-wise RAIL-KD_l loss over the
    projected pairs (student layer i, its drawn teacher layer); with a single pair (the
    projected concatenations) it is RAIL-KD_c.

    Args:
        student: m tensors (B, u).
        teacher: m tensors (B, u), in the same order.

    Returns:
        A scalar tensor (dimensionless), in [0, 4 m].

    Raises:
        ValueError: no pairs, different numbers of tensors, or a shape mismatch.
    """
    if not student or len(student) != len(teacher):
        raise ValueError(
            f"need the same positive number of student and teacher tensors, got "
            f"{len(student)} and {len(teacher)}"
        )
    return torch.stack([rail_pair_loss(s, t) for s, t in zip(student, teacher, strict=True)]).sum()
