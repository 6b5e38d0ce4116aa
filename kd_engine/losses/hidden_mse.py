"""Hidden-state and embedding distillation losses of TinyBERT (Jiao et al., "TinyBERT:
Distilling BERT for Natural Language Understanding", Findings of EMNLP 2020, section 3.1,
"Transformer-layer" and "Embedding-layer Distillation"):

    L_hidn = MSE(H^S W_h, H^T),    L_embd = MSE(E^S W_e, E^T)

over every token of a layer's output (l x d). The projection W is the caller's (a learned
module): this function compares tensors of equal width.

The authors' code (huawei-noah/Pretrained-Language-Model, ``TinyBERT/task_distill.py``) uses
``MSELoss()`` on the padded (B, T, d) tensors, padding tokens included. Here padding tokens are
dropped: the mean runs over real tokens and hidden units (identical when nothing is padded;
see :mod:`kd_engine.losses.attention_mse` for why the padded mean is not reproduced).
"""

from __future__ import annotations

import torch


def hidden_mse(
    student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Mean squared difference of two sequences of token vectors over real tokens.

    Args:
        student: (B, T, d) student states, already projected to the teacher's width d.
        teacher: (B, T, d) teacher states; treated as a constant (no gradient flows into it).
        attention_mask: (B, T), 1 for real tokens and 0 for padding.

    Returns:
        A scalar float32 tensor, in squared units of the hidden states.

    Raises:
        ValueError: shapes differ or do not fit the mask, or no real token is left.
    """
    if student.shape != teacher.shape or student.ndim != 3:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} hidden states "
            "must have the same shape (B, T, d) (project the student first)"
        )
    if tuple(attention_mask.shape) != tuple(student.shape[:2]):
        raise ValueError(
            f"attention mask {tuple(attention_mask.shape)} does not fit hidden states "
            f"{tuple(student.shape)}"
        )
    real = attention_mask.to(device=student.device).bool()[:, :, None]  # (B, T, 1)
    count = int(real.sum()) * student.shape[2]
    if count == 0:
        raise ValueError("the attention mask has no real token")
    zero = torch.zeros((), dtype=torch.float32, device=student.device)
    diff = torch.where(real, student.float() - teacher.detach().float(), zero)
    return diff.pow(2).sum() / count
