"""Choosing and masking the positions a generator rewrites (MATE-KD, Rashid et al. 2021,
section 3; the authors' ``mask_tokens`` in huawei-noah/Efficient-NLP
``MATE-KD/train_adversarial_student.py``)."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def special_mask(input_ids: torch.Tensor, special_ids: Iterable[int]) -> torch.Tensor:
    """(B, T) bool, True where ``input_ids`` (B, T) holds a special token ([CLS], [SEP],
    [PAD], [MASK], ...)."""
    ids = torch.tensor(sorted(set(special_ids)), dtype=input_ids.dtype, device=input_ids.device)
    return torch.isin(input_ids, ids)


def choose_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    special_ids: Iterable[int],
    probability: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Positions to mask: each real, non-special token independently with ``probability``.

    Special tokens and padding are never chosen (the authors' ``mask_tokens`` zeroes the
    probability of ``get_special_tokens_mask`` and of pad positions). A row may get none.

    Args:
        input_ids: (B, T) int64 token ids.
        attention_mask: (B, T), 1 for real tokens, 0 for padding.
        special_ids: the tokenizer's special-token ids.
        probability: p in [0, 1] (MATE-KD's ``--p_value``, default 0.3).
        generator: the random source (CPU), for reproducible masks.

    Returns:
        (B, T) bool on the ids' device.

    Raises:
        ValueError: ``probability`` outside [0, 1], or shapes that differ.
    """
    if not 0.0 <= probability <= 1.0:
        raise ValueError(f"mask probability must be in [0, 1], got {probability}")
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"attention_mask {tuple(attention_mask.shape)} does not fit input_ids "
            f"{tuple(input_ids.shape)}"
        )
    eligible = attention_mask.bool() & ~special_mask(input_ids, special_ids)
    draws = torch.rand(input_ids.shape, generator=generator).to(input_ids.device)
    return eligible & (draws < probability)


def apply_mask(input_ids: torch.Tensor, positions: torch.Tensor, mask_id: int) -> torch.Tensor:
    """A copy of ``input_ids`` (B, T) with every chosen position (B, T) bool set to
    ``mask_id``: MATE-KD replaces every chosen token by [MASK] (no 80/10/10 split as in BERT's
    pre-training; the authors' ``indices_replaced`` is drawn with probability 1.0)."""
    return input_ids.masked_fill(positions, mask_id)
