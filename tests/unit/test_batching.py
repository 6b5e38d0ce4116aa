"""Tokenising once, collating with dynamic padding, shuffled batches."""

from __future__ import annotations

import pytest
import torch
from transformers import PreTrainedTokenizerBase

from kd_engine.data import Example, TransferSet
from kd_engine.data.batching import (
    CHARS_PER_TOKEN,
    GROUP_MEGABATCHES,
    Encoded,
    batch_rows,
    batches,
    clip_text,
    collate,
    encode,
    num_batches,
)

PAD = 0


def hand_encoded(n: int = 10, with_types: bool = True) -> Encoded:
    seqs = [[101, *range(1000 + i, 1000 + i + (i % 4)), 102] for i in range(n)]
    return Encoded(
        input_ids=seqs,
        token_type_ids=[[0] * (len(s) - 2) + [1, 1] for s in seqs] if with_types else None,
        labels=[i % 3 for i in range(n)],
        ids=[100 + i for i in range(n)],
    )


def test_collate_pads_to_the_longest_row_of_the_batch() -> None:
    data = hand_encoded()
    rows = [0, 3, 5]  # lengths 2, 5, 3
    batch = collate(data, rows, PAD)
    assert batch["input_ids"].shape == (3, 5)
    assert batch["input_ids"].dtype == torch.long
    for b, r in enumerate(rows):
        seq = data.input_ids[r]
        assert batch["input_ids"][b, : len(seq)].tolist() == seq
        assert batch["input_ids"][b, len(seq) :].tolist() == [PAD] * (5 - len(seq))
        assert batch["attention_mask"][b].tolist() == [1] * len(seq) + [0] * (5 - len(seq))
        assert batch["token_type_ids"][b, : len(seq)].tolist() == data.token_type_ids[r]  # type: ignore[index]
        assert batch["token_type_ids"][b, len(seq) :].tolist() == [0] * (5 - len(seq))
    assert batch["labels"].tolist() == [0, 0, 2]
    assert batch["example_ids"].tolist() == [100, 103, 105]


def test_collate_uses_the_pad_id_and_omits_missing_token_types() -> None:
    data = hand_encoded(with_types=False)
    batch = collate(data, [1, 0], pad_id=7)
    assert "token_type_ids" not in batch
    assert batch["input_ids"].tolist() == [[101, 1001, 102], [101, 102, 7]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_batch_of_one_has_no_padding() -> None:
    batch = collate(hand_encoded(), [3], PAD)
    assert batch["attention_mask"].tolist() == [[1] * 5]


def test_batches_in_order_without_generator() -> None:
    data = hand_encoded(10)
    out = list(batches(data, 4, PAD))
    assert [len(b["labels"]) for b in out] == [4, 4, 2]
    assert torch.cat([b["example_ids"] for b in out]).tolist() == data.ids
    assert num_batches(10, 4) == 3 == len(out)
    assert num_batches(8, 4) == 2
    assert num_batches(1, 4) == 1


def shuffled_ids(data: Encoded, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.cat([b["example_ids"] for b in batches(data, 3, PAD, gen)]).tolist()


def test_shuffled_batches_are_a_seeded_permutation() -> None:
    data = hand_encoded(20)
    first = shuffled_ids(data, 5)
    assert sorted(first) == sorted(data.ids)
    assert first != data.ids
    assert shuffled_ids(data, 5) == first
    assert shuffled_ids(data, 6) != first


def test_shuffled_batches_keep_rows_together() -> None:
    data = hand_encoded(12)
    gen = torch.Generator().manual_seed(0)
    for batch in batches(data, 5, PAD, gen):
        for b, example_id in enumerate(batch["example_ids"].tolist()):
            r = data.ids.index(example_id)
            n = len(data.input_ids[r])
            assert batch["input_ids"][b, :n].tolist() == data.input_ids[r]
            assert int(batch["attention_mask"][b].sum()) == n
            assert int(batch["labels"][b]) == data.labels[r]


def test_a_generator_advances_between_epochs() -> None:
    data = hand_encoded(20)
    gen = torch.Generator().manual_seed(1)
    epoch1 = [i for b in batches(data, 8, PAD, gen) for i in b["example_ids"].tolist()]
    epoch2 = [i for b in batches(data, 8, PAD, gen) for i in b["example_ids"].tolist()]
    assert sorted(epoch1) == sorted(epoch2)
    assert epoch1 != epoch2


def test_encode_real_tokenizer(tokenizer: PreTrainedTokenizerBase) -> None:
    examples = [
        Example(7, "A short one.", None, 1),
        Example(9, "A much longer sentence " * 10, None, 0),
    ]
    enc = encode(examples, tokenizer, max_length=16)
    assert len(enc) == 2
    assert enc.ids == [7, 9] and enc.labels == [1, 0]
    assert len(enc.input_ids[1]) == 16
    assert len(enc.input_ids[0]) < 16
    assert enc.input_ids[0][0] == tokenizer.cls_token_id
    assert enc.input_ids[0][-1] == tokenizer.sep_token_id
    assert enc.input_ids[1][-1] == tokenizer.sep_token_id
    batch = collate(enc, [0, 1], int(tokenizer.pad_token_id))
    assert batch["input_ids"].shape == (2, 16)
    assert batch["attention_mask"][0].sum() == len(enc.input_ids[0])


def test_encode_pairs_sets_token_types(tokenizer: PreTrainedTokenizerBase) -> None:
    examples = [
        Example(0, "first text", "second text", 0),
        Example(1, "another premise " * 20, "and hypothesis " * 20, 1),
    ]
    enc = encode(examples, tokenizer, max_length=24)
    assert enc.token_type_ids is not None
    assert set(enc.token_type_ids[0]) == {0, 1}
    assert enc.input_ids[0].count(tokenizer.sep_token_id) == 2
    # Longest-first truncation keeps both texts.
    assert len(enc.input_ids[1]) == 24
    assert enc.input_ids[1].count(tokenizer.sep_token_id) == 2
    assert 1 in enc.token_type_ids[1]


@pytest.mark.parametrize("max_length", [8, 32])
def test_encode_respects_max_length(
    tokenizer: PreTrainedTokenizerBase, rotten_tomatoes: TransferSet, max_length: int
) -> None:
    examples = rotten_tomatoes.train[:50]
    enc = encode(examples, tokenizer, max_length)
    assert all(len(s) <= max_length for s in enc.input_ids)
    assert any(len(s) == max_length for s in enc.input_ids)


class CountingTokenizer:
    """The real tokenizer, recording the characters of every text it is given (a spy: the
    tokenisation is the real one)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.longest = 0

    def __call__(self, texts: list[str], pairs: list[str] | None = None, **kw: object) -> object:
        self.longest = max([self.longest, *(len(t) for t in [*texts, *(pairs or [])])])
        return self.tokenizer(texts, pairs, **kw)


def whole(tokenizer: PreTrainedTokenizerBase, text: str, pair: str | None, n: int) -> list[int]:
    """The ids of the whole text, tokenised in one piece and truncated by the tokenizer."""
    return list(tokenizer(text, pair, truncation=True, max_length=n)["input_ids"])


def test_a_long_text_gives_the_ids_of_its_whole_text(tokenizer: PreTrainedTokenizerBase) -> None:
    words = [
        "the",
        "movie",
        "was",
        "surprisingly",
        "good",
        "although",
        "nobody",
        "expected",
        "it",
        "to",
        "work",
    ]
    long_text = " ".join(words[i % len(words)] + str(i % 7) for i in range(20_000))
    assert len(long_text) > 16 * CHARS_PER_TOKEN * 10
    examples = [Example(0, long_text, None, 0), Example(1, "short", None, 1)]
    enc = encode(examples, tokenizer, max_length=16)
    assert enc.input_ids[0] == whole(tokenizer, long_text, None, 16)
    assert enc.input_ids[1] == whole(tokenizer, "short", None, 16)
    # Pairs, both cut (kept short here: the whole pair, truncated by the fast tokenizer,
    # yields one overflow encoding per pair of windows, which is what the cut avoids).
    first, pair = long_text[:3000], "a second text " * 200
    pairs = encode([Example(0, first, pair, 0)], tokenizer, max_length=16)
    assert pairs.input_ids[0] == whole(tokenizer, first, pair, 16)
    full = tokenizer(first, pair, truncation=True, max_length=16)["token_type_ids"]
    assert pairs.token_type_ids == [full]


def test_a_huge_text_reaches_the_tokenizer_cut(tokenizer: PreTrainedTokenizerBase) -> None:
    huge = "word " * 2_000_000  # 10 MB
    spy = CountingTokenizer(tokenizer)
    enc = encode([Example(0, huge, None, 0)], spy, max_length=32)  # type: ignore[arg-type]
    assert spy.longest <= 32 * CHARS_PER_TOKEN
    assert enc.input_ids[0] == [tokenizer.cls_token_id, *[tokenizer.vocab["word"]] * 30, 102]


def test_a_prefix_of_mostly_whitespace_is_extended(tokenizer: PreTrainedTokenizerBase) -> None:
    """A prefix with too few tokens (a long run of spaces, a word the tokenizer turns into
    one [UNK]) is tokenised again with more characters: the ids still match the whole text."""
    spaced = "start" + " " * 50_000 + " ".join(f"w{i}" for i in range(20_000))
    unk = " ".join("x" * 150 for _ in range(200))  # each 150-character word is one [UNK]
    spy = CountingTokenizer(tokenizer)
    examples = [Example(0, spaced, None, 0), Example(1, unk, None, 0)]
    enc = encode(examples, spy, max_length=16)  # type: ignore[arg-type]
    assert enc.input_ids[0] == whole(tokenizer, spaced, None, 16)
    assert enc.input_ids[1] == whole(tokenizer, unk, None, 16)
    assert enc.input_ids[1][1:-1] == [tokenizer.unk_token_id] * 14
    assert spy.longest < len(spaced)  # extended, not handed over whole


def test_clip_text_cuts_at_whitespace() -> None:
    assert clip_text("short", 10) == "short"
    assert clip_text("aaaa bbbb cccc", 12) == "aaaa bbbb"
    assert clip_text("a" * 20, 8) == "a" * 8  # no whitespace in the second half: a hard cut


def varied_lengths(n: int = 300, seed: int = 0) -> Encoded:
    rng = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 60, (n,), generator=rng).tolist()
    return Encoded(
        input_ids=[[101, *([7] * (k - 2)), 102] for k in lengths],
        token_type_ids=None,
        labels=[i % 2 for i in range(n)],
        ids=list(range(n)),
    )


def grouped(data: Encoded, batch_size: int, seed: int) -> list[list[int]]:
    return batch_rows(data, batch_size, torch.Generator().manual_seed(seed), group_by_length=True)


def padding(data: Encoded, rows: list[list[int]]) -> int:
    lens = [[len(data.input_ids[r]) for r in b] for b in rows]
    return sum(max(b) * len(b) - sum(b) for b in lens)


def test_group_by_length_uses_every_example_once_per_epoch() -> None:
    data = varied_lengths(301)
    rows = grouped(data, 8, seed=1)
    assert sorted(r for b in rows for r in b) == list(range(301))
    assert len(rows) == num_batches(301, 8)
    assert sorted(len(b) for b in rows)[1:] == [8] * (len(rows) - 1)  # one short batch at most


def test_group_by_length_batches_are_length_homogeneous() -> None:
    data = varied_lengths(600)
    g = torch.Generator().manual_seed(3)
    plain = batch_rows(data, 16, g)
    rows = grouped(data, 16, seed=3)
    # Within a mega-batch (GROUP_MEGABATCHES batches) the lengths are sorted, so each batch
    # spans a narrow range; a random batch spans nearly the whole 3..59.
    spread = [
        max(len(data.input_ids[r]) for r in b) - min(len(data.input_ids[r]) for r in b)
        for b in rows
    ]
    plain_spread = [
        max(len(data.input_ids[r]) for r in b) - min(len(data.input_ids[r]) for r in b)
        for b in plain
    ]
    assert max(spread) <= 20  # the last, smaller mega-batch spans a wider range per batch
    assert sum(spread) / len(spread) <= 6 < 40 <= sum(plain_spread) / len(plain_spread)
    assert padding(data, rows) < padding(data, plain) / 4
    assert GROUP_MEGABATCHES * 16 < 600  # more than one mega-batch is exercised


def test_group_by_length_is_deterministic_per_seed_and_random_across_seeds() -> None:
    data = varied_lengths(400)
    assert grouped(data, 8, seed=5) == grouped(data, 8, seed=5)
    assert grouped(data, 8, seed=5) != grouped(data, 8, seed=6)
    # The batches are shuffled, not in length order.
    first = [max(len(data.input_ids[r]) for r in b) for b in grouped(data, 8, seed=5)]
    assert first != sorted(first, reverse=True)
    # Batch composition differs too, not only the batch order.
    assert {tuple(sorted(b)) for b in grouped(data, 8, seed=5)} != {
        tuple(sorted(b)) for b in grouped(data, 8, seed=6)
    }


def test_group_by_length_off_keeps_the_plain_shuffle() -> None:
    data = varied_lengths(50)
    order = torch.randperm(50, generator=torch.Generator().manual_seed(9)).tolist()
    expected = [order[s : s + 8] for s in range(0, 50, 8)]
    assert batch_rows(data, 8, torch.Generator().manual_seed(9)) == expected
    got = [
        b["example_ids"].tolist() for b in batches(data, 8, PAD, torch.Generator().manual_seed(9))
    ]
    assert got == expected
    # In order without a generator, whatever group_by_length says.
    assert batch_rows(data, 8, None, group_by_length=True)[0] == list(range(8))
