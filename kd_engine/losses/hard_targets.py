"""Cross-entropy with the gold labels (the CE loss of every supervised objective)."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812


def ce_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """CE(y, softmax(z)), averaged over the batch.

    Args:
        logits: z, shape (B, C).
        labels: y, shape (B,), integer class ids in [0, C).

    Returns:
        A scalar tensor (nats).
    """
    return F.cross_entropy(logits.float(), labels)
