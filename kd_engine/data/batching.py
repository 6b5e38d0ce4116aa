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


CHARS_PER_TOKEN = 32
"""Characters of a text the tokenizer first sees per token of ``max_length``.

A text is never tokenised whole: a 10 MB text would produce millions of tokens (and their
offsets) only for all but ``max_length`` of them to be dropped (a worker was seen at 2.2 GB).
It is first cut to ``max_length * CHARS_PER_TOKEN`` characters (4,096 for 128 tokens), at the
last whitespace of the second half of that prefix so that no word is cut in two. Why the result
is the same: pre-tokenisation splits at whitespace, so the whole words of the prefix give the
whole text's first tokens; and a token nearly always covers fewer than 32 characters (an
English word piece about 4-5, no token is made of less than one character), so the prefix
yields ``max_length`` tokens and the truncation keeps the same ones. A prefix that yields
fewer (long runs of whitespace, words over 100 characters that become one ``[UNK]``) is
tokenised again with twice the characters, until its tokens fill ``max_length`` or it is the
whole text. The work is proportional to ``max_length``, not to the text's length.

One exception to exactness: a prefix whose second half holds no whitespace (a very long URL or
base64 blob; not CJK, whose characters BERT-like tokenizers split one by one) is cut hard, and
the one word it cuts may be split into other word pieces than in the whole text; this matters
only when that word's pieces are among the first ``max_length`` tokens."""


def clip_text(text: str, limit: int) -> str:
    """``text`` cut to at most ``limit`` characters, at the last whitespace of the second half
    of the cut when there is one (the text itself, not a copy, when it is short enough)."""
    if len(text) <= limit:
        return text
    cut = text[:limit]
    for i in range(limit - 1, limit // 2, -1):
        if cut[i].isspace():
            return cut[:i]
    return cut


def _tokenize(
    tokenizer: PreTrainedTokenizerBase,
    texts: list[str],
    pairs: list[str] | None,
    max_length: int,
) -> tuple[list[list[int]], list[list[int]] | None]:
    enc = tokenizer(texts, pairs, truncation=True, max_length=max_length)
    types = enc.get("token_type_ids")
    return list(enc["input_ids"]), list(types) if types is not None else None


def encode(examples: list[Example], tokenizer: PreTrainedTokenizerBase, max_length: int) -> Encoded:
    """Tokenise a split once, truncating to ``max_length`` tokens (pairs: longest first).

    Each text reaches the tokenizer cut to ``max_length * CHARS_PER_TOKEN`` characters (see
    :data:`CHARS_PER_TOKEN`: the ids are those of the whole text, the cost bounded by
    ``max_length``)."""
    has_pairs = any(e.text_pair is not None for e in examples)
    limit = max_length * CHARS_PER_TOKEN

    def clipped(e: Example, chars: int) -> tuple[str, str | None]:
        pair = clip_text(e.text_pair or "", chars) if has_pairs else None
        return clip_text(e.text, chars), pair

    cut = [clipped(e, limit) for e in examples]
    input_ids, token_types = _tokenize(
        tokenizer,
        [t for t, _ in cut],
        [p or "" for _, p in cut] if has_pairs else None,
        max_length,
    )
    for i, e in enumerate(examples):
        chars = limit
        text, pair = cut[i]
        # A cut text whose prefix filled fewer than max_length tokens: more of it, until
        # the tokens fill max_length or the whole text is used.
        while len(input_ids[i]) < max_length and (
            len(text) < len(e.text) or (pair is not None and len(pair) < len(e.text_pair or ""))
        ):
            chars *= 2
            text, pair = clipped(e, chars)
            ids, types = _tokenize(
                tokenizer, [text], [pair or ""] if has_pairs else None, max_length
            )
            input_ids[i] = ids[0]
            if token_types is not None and types is not None:
                token_types[i] = types[0]
    return Encoded(
        input_ids=input_ids,
        token_type_ids=token_types,
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


GROUP_MEGABATCHES = 16
"""Batches per mega-batch in length-grouped batching (:func:`batch_rows`): examples are sorted
by length within runs of ``GROUP_MEGABATCHES * batch_size`` shuffled examples. Larger groups
pad less but make batches less random (a batch then holds examples of nearly one length)."""


def batch_rows(
    data: Encoded,
    batch_size: int,
    generator: torch.Generator | None = None,
    group_by_length: bool = False,
) -> list[list[int]]:
    """The rows of each batch of an epoch: ``ceil(N / batch_size)`` batches that hold every
    row once.

    In order without ``generator``; shuffled with it. With ``group_by_length`` (and a
    generator) batches are length-grouped yet random: the shuffled rows are split into
    mega-batches of :data:`GROUP_MEGABATCHES` ``* batch_size``, each sorted by length (longest
    first; ties keep the shuffled order) and cut into batches, and the batches are shuffled.
    Only the last batch of the epoch's order can be short. Both orders are drawn from
    ``generator`` alone, so that an epoch's batches are fixed by its state at the epoch's start.
    """
    n = len(data)
    shuffled = generator is not None
    order = torch.randperm(n, generator=generator).tolist() if shuffled else list(range(n))
    if generator is None or not group_by_length:
        return [order[s : s + batch_size] for s in range(0, n, batch_size)]
    mega = GROUP_MEGABATCHES * batch_size
    grouped: list[list[int]] = []
    for s in range(0, n, mega):
        chunk = sorted(order[s : s + mega], key=lambda r: -len(data.input_ids[r]))
        grouped += [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
    return [grouped[i] for i in torch.randperm(len(grouped), generator=generator).tolist()]


def batches(
    data: Encoded,
    batch_size: int,
    pad_id: int,
    generator: torch.Generator | None = None,
    group_by_length: bool = False,
) -> Iterator[dict[str, torch.Tensor]]:
    """Yield padded batches (:func:`collate`) of the rows :func:`batch_rows` chooses: shuffled
    with ``generator`` when given (length-grouped with ``group_by_length``), in order
    otherwise."""
    for rows in batch_rows(data, batch_size, generator, group_by_length):
        yield collate(data, rows, pad_id)


def num_batches(n: int, batch_size: int) -> int:
    """ceil(n / batch_size)."""
    return -(-n // batch_size)
