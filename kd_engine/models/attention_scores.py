"""Make a transformers encoder report its attention maps: probabilities, or pre-softmax scores.

transformers' ``output_attentions`` needs the ``eager`` attention implementation (under the
default ``sdpa`` the reported maps are ``None``), and even then it reports the softmax
probabilities AFTER attention dropout, never the scores. TinyBERT matches the scores
A = Q K^T / sqrt(d_k) (Jiao et al. 2020, section 3.1; its authors' code returns them from its
own BERT). This module registers one more attention implementation with transformers'
``AttentionInterface``: it computes exactly what ``eager`` computes (softmax, then dropout,
then the weighted sum of values) but reports the scores, with the additive padding
mask already added (masked keys hold a very negative value), as the layer's attention map.

The registration is a static, process-wide entry under :data:`SCORES_IMPLEMENTATION`; which
implementation a model uses is per model (``config._attn_implementation``), switched by
:func:`record_attentions` and switched back by the function it returns. Works for the
encoders :mod:`kd_engine.models.loading` supports (BERT, RoBERTa, XLM-R, ELECTRA, DistilBERT),
whose attention layers call the attention interface.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask

SCORES_IMPLEMENTATION = "kd_eager_scores"


def eager_attention_with_scores(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention that reports the masked pre-softmax scores.

    Args:
        module: the attention layer (its ``training`` flag switches dropout).
        query, key, value: (B, heads, T, d_head).
        attention_mask: None, an additive float mask or a bool mask (True = attend),
            broadcastable to (B, heads, T, T).
        scaling: the score scale, 1/sqrt(d_head) when None.
        dropout: attention-probability dropout (applied in training mode only).

    Returns:
        The attention output (B, T, heads, d_head) and the scores (B, heads, T, T).
    """
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            low = torch.finfo(scores.dtype).min
            scores = scores.masked_fill(~attention_mask, low)
        else:
            scores = scores + attention_mask
    probs = torch.softmax(scores, dim=-1)
    probs = torch.nn.functional.dropout(probs, p=dropout, training=module.training)
    output = torch.matmul(probs, value).transpose(1, 2).contiguous()
    return output, scores


AttentionInterface.register(SCORES_IMPLEMENTATION, eager_attention_with_scores)
ALL_MASK_ATTENTION_FUNCTIONS.register(SCORES_IMPLEMENTATION, eager_mask)


def record_attentions(models: Iterable[PreTrainedModel | None], scores: bool) -> Callable[[], None]:
    """Switch each model to an attention implementation that reports attention maps.

    Args:
        models: the models (None entries are skipped).
        scores: True reports pre-softmax scores (:func:`eager_attention_with_scores`), False
            the probabilities (``eager``).

    Returns:
        A function that switches every model back to the implementation it had.
    """
    target = SCORES_IMPLEMENTATION if scores else "eager"
    previous: list[tuple[PreTrainedModel, str]] = []
    for model in models:
        if model is None:
            continue
        current = str(model.config._attn_implementation)
        if current != target:
            model.set_attn_implementation(target)
            previous.append((model, current))

    def restore() -> None:
        for model, implementation in previous:
            model.set_attn_implementation(implementation)

    return restore
