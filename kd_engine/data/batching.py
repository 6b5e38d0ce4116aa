"""Tokenising once and batching with dynamic padding."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from kd_engine.data.examples import Example


@dataclass(frozen=True)
class Encoded:
    """Token ids of a split (lists of unequal length) with labels (class ids, or floats for
    regression) and example ids."""

    input_ids: list[list[int]]
    token_type_ids: list[list[int]] | None
    labels: list[int | float]
    ids: list[int]

    def __len__(self) -> int:
        return len(self.labels)


def encode(examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    """Tokenise a split once, truncating to ``max_length`` tokens (pairs: longest first)."""
    texts = [e.text for e in examples]
    pairs = [e.text_pair for e in examples]
    has_pairs = any(p is not None for p in pairs)
    enc = tokenizer(
        texts,
        [p or "" for p in pairs] if has_pairs else None,
        truncation=True,
        max_length=max_length,
    )
    token_types = enc.get("token_type_ids")
    return Encoded(
        input_ids=list(enc["input_ids"]),
        token_type_ids=list(token_types) if token_types is not None else None,
        labels=[e.label for e in examples],
        ids=[e.id for e in examples],
    )


def encode_corpus(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    """Tokenise an unlabelled corpus like a split (:func:`encode`): labels are all 0 (unused)
    and the ids are the row numbers 0 .. N-1."""
    return encode([Example(i, t, None, 0) for i, t in enumerate(texts)], tokenizer, max_length)


def collate(data: Encoded, rows: list[int], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad the chosen rows to their longest sequence.

    Returns:
        ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer makes them),
        each (B, T) int64, ``labels`` (B,) (int64 class ids, or float32 regression targets) and
        ``example_ids`` (B,).
    """
    t_max = max(len(data.input_ids[r]) for r in rows)
    ids = torch.full((len(rows), t_max), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t_max), dtype=torch.long)
    types = torch.zeros((len(rows), t_max), dtype=torch.long)
    for b, r in enumerate(rows):
        seq = data.input_ids[r]
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
        if data.token_type_ids is not None:
            types[b, : len(seq)] = torch.tensor(data.token_type_ids[r])
    batch = {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.tensor([data.labels[r] for r in rows]),
        "example_ids": torch.tensor([data.ids[r] for r in rows]),
    }
    if data.token_type_ids is not None:
        batch["token_type_ids"] = types
    return batch


def batches(
    data: Encoded,
    batch_size: int,
    pad_id: int,
    generator: torch.Generator | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield padded batches; shuffled with ``generator`` when given, in order otherwise."""
    order = (
        torch.randperm(len(data), generator=generator).tolist()
        if generator is not None
        else list(range(len(data)))
    )
    for start in range(0, len(order), batch_size):
        yield collate(data, order[start : start + batch_size], pad_id)


def num_batches(n: int, batch_size: int) -> int:
    """ceil(n / batch_size)."""
    return -(-n // batch_size)
