"""Squared distance between L2-normalised representations: the intermediate-layer loss of
Patient KD and of CKD.

SOURCES
- PKD: Sun, Cheng, Gan and Liu, "Patient Knowledge Distillation for BERT Model Compression",
  EMNLP 2019, section 3.2 (L_PT = sum_i sum_j || h_s/|h_s| - h_t/|h_t| ||^2 over
  examples i and matched layers j, on the [CLS] states). The authors' code
  (intersun/PKD-for-BERT-Model-Compression, ``src/KD_loss.py::patience_loss``) normalises each
  vector and then takes ``F.mse_loss``, i.e. the MEAN over examples, layers AND hidden units;
  their beta grid {10, 100, 500, 1000} is tuned for that scale. ``reduction="mean"`` is that.
- CKD: Wu, Passban, Rezagholizadeh and Liu, "Why Skip If You Can Combine: A Simple Knowledge
  Distillation Technique for Intermediate Layers", EMNLP 2020, section 3. The authors' code
  (yimeng0701/CKD_pytorch, ``onmt/utils/loss.py::_compute_internal_loss``) normalises each
  (concatenated) vector, sums the squared differences over layers and units, and divides by the
  number of positions; with one vector per example that is ``reduction="batchmean"``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812

Reduction = Literal["mean", "batchmean"]


def normalized_mse(
    student: torch.Tensor, teacher: torch.Tensor, reduction: Reduction = "mean"
) -> torch.Tensor:
    """|| s/|s| - t/|t| ||^2 between matched vectors, reduced over the batch and layers.

    Each vector (the last dimension) is divided by its L2 norm (a zero vector stays zero), then

    - ``mean``: sum of squared differences / (B * L * d)  (PKD authors' code);
    - ``batchmean``: sum of squared differences / B, i.e. sum over layers of the squared
      distance between unit vectors, averaged over examples (CKD authors' code).

    Args:
        student: (B, L, d) student vectors (L matched layers), already projected to the
            teacher's width where the method projects.
        teacher: (B, L, d) teacher vectors; treated as a constant (no gradient flows into it).
        reduction: ``mean`` or ``batchmean`` (see above).

    Returns:
        A scalar float32 tensor (dimensionless; each squared distance is in [0, 4]).

    Raises:
        ValueError: shapes differ, are not (B, L, d), or the reduction is unknown.
    """
    if student.shape != teacher.shape or student.ndim != 3:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} must have the "
            "same shape (B, L, d)"
        )
    if reduction not in ("mean", "batchmean"):
        raise ValueError(f"reduction must be 'mean' or 'batchmean', got {reduction!r}")
    s = F.normalize(student.float(), p=2.0, dim=-1)
    t = F.normalize(teacher.detach().float(), p=2.0, dim=-1)
    squared = (s - t).pow(2).sum()
    if reduction == "mean":
        return squared / student.numel()
    return squared / student.shape[0]
