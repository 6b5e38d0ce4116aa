"""Attention-based distillation loss of TinyBERT (Jiao et al., "TinyBERT: Distilling BERT for
Natural Language Understanding", Findings of EMNLP 2020, section 3.1, "Transformer-layer
Distillation"):

    L_attn = 1/h sum_{i=1..h} MSE(A_i^S, A_i^T)

with A_i the (l x l) attention matrix of head i. The paper fits the UNNORMALISED scores
A = Q K^T / sqrt(d_k) ("faster convergence and better performance" than softmax(A)); the
authors' code (huawei-noah/Pretrained-Language-Model, ``TinyBERT/task_distill.py``) takes the
scores after the additive padding mask, sets entries <= -100 (the masked keys) to zero in both
models, and averages the squared difference over the whole padded (B, heads, T, T) tensor.

Here masked positions are dropped instead: the mean runs over the entries whose query AND key
are real tokens. For a batch without padding this is exactly the authors' value; with padding
the authors' value is ours times (real entries / padded entries), a factor that depends on how
much a batch is padded (their inputs are always padded to 128 tokens; ours are padded to the
longest sequence in the batch), so we do not reproduce it. Padding queries are dropped too:
their rows never influence a real token's representation.

The function is agnostic to what the maps hold: pass scores (TinyBERT) or probabilities.
"""

from __future__ import annotations

import torch


def attention_mse(
    student: torch.Tensor, teacher: torch.Tensor, attention_mask: torch.Tensor
) -> torch.Tensor:
    """Mean squared difference of two attention maps over real (query, key) pairs.

    Args:
        student: (B, heads, T, T) student attention maps (scores or probabilities); entries at
            masked positions may hold anything finite or infinite (e.g. the -inf-like additive
            mask): they are ignored.
        teacher: (B, heads, T, T) teacher maps, same heads; treated as a constant.
        attention_mask: (B, T), 1 for real tokens and 0 for padding.

    Returns:
        A scalar float32 tensor, in squared units of the maps (squared logits for scores).

    Raises:
        ValueError: shapes differ or do not fit the mask, or no real token is left.
    """
    if student.shape != teacher.shape or student.ndim != 4:
        raise ValueError(
            f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} attention maps "
            "must have the same shape (B, heads, T, T)"
        )
    b, _, t_q, t_k = student.shape
    if t_q != t_k or tuple(attention_mask.shape) != (b, t_k):
        raise ValueError(
            f"attention mask {tuple(attention_mask.shape)} does not fit attention maps "
            f"{tuple(student.shape)}"
        )
    real = attention_mask.to(device=student.device).bool()
    valid = (real[:, :, None] & real[:, None, :])[:, None, :, :]  # (B, 1, T, T)
    count = int(valid.sum()) * student.shape[1]
    if count == 0:
        raise ValueError("the attention mask has no real token")
    zero = torch.zeros((), dtype=torch.float32, device=student.device)
    s = torch.where(valid, student.float(), zero)
    t = torch.where(valid, teacher.detach().float(), zero)
    return (s - t).pow(2).sum() / count
