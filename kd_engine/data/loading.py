"""Turning a dataset spec into a :class:`TransferSet`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from kd_engine.data.builtins import load_builtin
from kd_engine.data.examples import Example, TransferSet
from kd_engine.data.files import column, label_order, read_rows
from kd_engine.data.splits import split_off, subset
from kd_engine.references import scheme_of
from kd_engine.spec import DatasetSpec

PathResolver = Callable[[str], Path]


def _rows_to_examples(
    rows: list[dict[str, Any]], spec: DatasetSpec, source: str
) -> tuple[list[str | None], list[str], list[str]]:
    texts = [str(v) for v in column(rows, spec.text_column, source)]
    pairs: list[str | None] = [None] * len(rows)
    if spec.text_pair_column:
        pairs = [str(v) for v in column(rows, spec.text_pair_column, source)]
    labels = [str(v) for v in column(rows, spec.label_column, source)]
    return pairs, texts, labels


def _from_file(spec: DatasetSpec, resolve: PathResolver) -> TransferSet:
    sources = {"train": spec.source, "dev": spec.dev_source, "test": spec.test_source}
    raw: dict[str, tuple[list[str | None], list[str], list[str]]] = {}
    for split, ref in sources.items():
        if ref is not None:
            field = "source" if split == "train" else f"{split}_source"
            raw[split] = _rows_to_examples(read_rows(resolve(ref)), spec, f"dataset.{field}")
    names = label_order(raw["train"][2])
    index = {n: i for i, n in enumerate(names)}

    def build(split: str, offset: int) -> list[Example]:
        pairs, texts, labels = raw[split]
        out = []
        for i, (t, p, lab) in enumerate(zip(texts, pairs, labels, strict=True)):
            if lab not in index:
                raise ValueError(
                    f"dataset.{split}: row {i + 1} has label {lab!r}, which the train split "
                    f"does not have (train labels: {', '.join(names)})"
                )
            out.append(Example(offset + i, t, p, index[lab]))
        return out

    train = build("train", 0)
    dev = build("dev", 10_000_000) if "dev" in raw else None
    test = build("test", 20_000_000) if "test" in raw else None
    dev_fraction = spec.dev_fraction  # of the whole train file
    if test is None:
        train, test = split_off(train, spec.test_fraction, spec.split_seed)
        dev_fraction = spec.dev_fraction / (1 - spec.test_fraction)
    if dev is None:
        train, dev = split_off(train, dev_fraction, spec.split_seed)
    return TransferSet(train=train, dev=dev, test=test, label_names=names)


def load_transfer_set(spec: DatasetSpec, resolve: PathResolver) -> TransferSet:
    """Load the train/dev/test examples a job trains and evaluates on.

    ``resolve`` maps a ``file://`` (or other non-builtin) reference to a local file and raises
    ValueError for a reference that is not allowed. Subsets (``max_train_examples``,
    ``max_eval_examples``) are stratified and seeded with ``split_seed``.

    Raises:
        ValueError: unknown built-in, unreadable file, missing column, unknown label, a split
            with fewer than 2 classes in train.
    """
    if scheme_of(spec.source) == "builtin:":
        data = load_builtin(spec.source.removeprefix("builtin:"))
    else:
        data = _from_file(spec, resolve)
    if len({e.label for e in data.train}) < 2:
        raise ValueError("dataset: the train split has fewer than 2 distinct labels")
    return TransferSet(
        train=subset(data.train, spec.max_train_examples, spec.split_seed),
        dev=subset(data.dev, spec.max_eval_examples, spec.split_seed),
        test=subset(data.test, spec.max_eval_examples, spec.split_seed),
        label_names=data.label_names,
    )


def relabel(data: TransferSet, label_names: list[str]) -> TransferSet:
    """Re-index labels so that class id i means ``label_names[i]`` (the teacher's order).

    Raises:
        ValueError: the two sets of label names differ (the message lists both).
    """
    if sorted(label_names) != sorted(data.label_names):
        raise ValueError(
            f"the teacher's labels {label_names} do not match the dataset's labels "
            f"{data.label_names}"
        )
    mapping = {old: label_names.index(name) for old, name in enumerate(data.label_names)}

    def remap(split: list[Example]) -> list[Example]:
        return [Example(e.id, e.text, e.text_pair, mapping[e.label]) for e in split]

    return TransferSet(remap(data.train), remap(data.dev), remap(data.test), list(label_names))
