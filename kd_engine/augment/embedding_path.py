"""Feeding a straight-through one-hot sample to a model through its own embedding path.

MATE-KD (Rashid et al., ACL 2021, section 3; the authors' ``train_adversarial_student.py``):
at the rewritten positions a model's input vector is ``one_hot @ E`` (E its word-embedding
matrix, V x d), elsewhere its embedding of the original token; the model then adds what its
architecture adds itself (position and token-type embeddings, LayerNorm, dropout) by being
given ``inputs_embeds``. The forward value is exactly the embedding of the sampled token; the
gradient reaches the one-hot (and from it the generator) through E.
"""

from __future__ import annotations

import torch


def rewritten_embeddings(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    one_hot: torch.Tensor,
) -> torch.Tensor:
    """Word embeddings (B, T, d) of ``input_ids`` (B, T) whose ``positions`` (B, T) bool (M
    True) are replaced by ``one_hot`` (M, V) @ E, in the order ``input_ids[positions]`` lists
    them.

    Raises:
        ValueError: ``one_hot`` does not have one row per position, or its width is not the
            model's vocabulary.
    """
    words = model.get_input_embeddings()  # type: ignore[operator]
    weight = words.weight
    n = int(positions.sum())
    if one_hot.shape != (n, weight.shape[0]):
        raise ValueError(
            f"one_hot {tuple(one_hot.shape)} does not fit {n} positions x {weight.shape[0]} tokens"
        )
    embeds = words(input_ids)
    if n == 0:
        return embeds
    flat = embeds.reshape(-1, embeds.shape[-1])
    index = positions.reshape(-1).nonzero().squeeze(-1)
    replaced = one_hot.to(weight.dtype) @ weight
    return flat.index_copy(0, index, replaced).reshape(embeds.shape)


def forward_rewritten(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    positions: torch.Tensor,
    one_hot: torch.Tensor,
    output_hidden_states: bool = False,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
    """Run ``model`` on ``batch`` (``input_ids`` holding the sampled tokens, ``attention_mask``,
    optional ``token_type_ids``, all on the model's device) with the rewritten positions fed as
    ``one_hot @ E`` (:func:`rewritten_embeddings`).

    Returns:
        logits (B, C) and, when asked, the hidden states (embeddings first), each (B, T, d).
    """
    embeds = rewritten_embeddings(model, batch["input_ids"], positions, one_hot)
    kwargs: dict[str, object] = {
        "inputs_embeds": embeds,
        "attention_mask": batch["attention_mask"],
        "output_hidden_states": output_hidden_states,
    }
    if "token_type_ids" in batch:
        kwargs["token_type_ids"] = batch["token_type_ids"]
    out = model(**kwargs)
    return out.logits, (out.hidden_states if output_hidden_states else None)
