"""Turning a dataset spec into a :class:`TransferSet`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from kd_engine.data.builtins import BUILTIN_REGRESSION, load_builtin, load_builtin_eval
from kd_engine.data.examples import Example, TransferSet
from kd_engine.data.files import column, label_order, read_rows
from kd_engine.data.inspect import finite_number, is_integer_label
from kd_engine.data.splits import split_off, subset
from kd_engine.errors import SpecError
from kd_engine.references import scheme_of
from kd_engine.spec import DatasetSpec, EvalSetSpec, Task

PathResolver = Callable[[str], Path]
FILE_ID_BASE = {"train": 0, "dev": 10_000_000, "test": 20_000_000}
"""Example ids of a file dataset: the row number in its file plus the base of the file it
comes from (``source``, ``dev_source``, ``test_source``); files hold at most 5,000,000 rows."""


def resolve_regression(
    task: Task, teacher_task: Literal["classification", "regression"] | None
) -> bool | None:
    """Whether a job is a regression job, from ``dataset.task`` and the teacher's own task
    (None for a base encoder, see :func:`kd_engine.models.loading.teacher_task`).

    Returns:
        True (regression), False (classification), or None: ``auto`` with a base-encoder
        teacher, decided by the labels (:func:`looks_like_regression`).

    Raises:
        SpecError: ``dataset.task`` contradicts the teacher.
    """
    if task == "auto":
        return None if teacher_task is None else teacher_task == "regression"
    if teacher_task is not None and teacher_task != task:
        raise SpecError(
            "dataset.task",
            f"it is {task} but the teacher is a {teacher_task} model "
            f"({'one output' if teacher_task == 'regression' else 'several classes'}); "
            "leave task at 'auto' or use a teacher of that kind",
        )
    return task == "regression"


def looks_like_regression(values: list[str]) -> bool:
    """True when every label is a finite number and at least one is written as a non-integer
    (``3.8``, ``2.0``): the rule of ``dataset.task`` ``auto`` with a base-encoder teacher."""
    if not values:
        return False
    if any(finite_number(v) is None for v in values):
        return False
    return any(not is_integer_label(v) for v in values)


def _score(value: str, where: str, row: int) -> float:
    """A regression target parsed from a label value.

    Raises:
        ValueError: not a finite number (names ``where`` and the row).
    """
    score = finite_number(value)
    if score is None:
        raise ValueError(
            f"{where}: row {row} has label {value!r}, which is not a finite number "
            "(a regression dataset needs one number per example)"
        )
    return score


def _rows_to_examples(
    rows: list[dict[str, Any]], spec: DatasetSpec, source: str
) -> tuple[list[str | None], list[str], list[str]]:
    texts = [str(v) for v in column(rows, spec.text_column, source)]
    pairs: list[str | None] = [None] * len(rows)
    if spec.text_pair_column:
        pairs = [str(v) for v in column(rows, spec.text_pair_column, source)]
    labels = [str(v) for v in column(rows, spec.label_column, source)]
    return pairs, texts, labels


def _from_file(spec: DatasetSpec, resolve: PathResolver, regression: bool | None) -> TransferSet:
    sources = {"train": spec.source, "dev": spec.dev_source, "test": spec.test_source}
    raw: dict[str, tuple[list[str | None], list[str], list[str]]] = {}
    for split, ref in sources.items():
        if ref is not None:
            field = "source" if split == "train" else f"{split}_source"
            raw[split] = _rows_to_examples(read_rows(resolve(ref)), spec, f"dataset.{field}")
    if regression is None:
        regression = looks_like_regression(raw["train"][2])
    names = [] if regression else label_order(raw["train"][2])
    index = {n: i for i, n in enumerate(names)}

    def build(split: str, offset: int) -> list[Example]:
        pairs, texts, labels = raw[split]
        out: list[Example] = []
        field = "source" if split == "train" else f"{split}_source"
        for i, (t, p, lab) in enumerate(zip(texts, pairs, labels, strict=True)):
            if regression:
                out.append(Example(offset + i, t, p, _score(lab, f"dataset.{field}", i + 1)))
                continue
            if lab not in index:
                raise ValueError(
                    f"dataset.{split}: row {i + 1} has label {lab!r}, which the train split "
                    f"does not have (train labels: {', '.join(names)})"
                )
            out.append(Example(offset + i, t, p, index[lab]))
        return out

    train = build("train", FILE_ID_BASE["train"])
    dev = build("dev", FILE_ID_BASE["dev"]) if "dev" in raw else None
    test = build("test", FILE_ID_BASE["test"]) if "test" in raw else None
    dev_fraction = spec.dev_fraction  # of the whole train file
    if test is None:
        train, test = split_off(train, spec.test_fraction, spec.split_seed)
        dev_fraction = spec.dev_fraction / (1 - spec.test_fraction)
    if dev is None:
        train, dev = split_off(train, dev_fraction, spec.split_seed)
    return TransferSet(train=train, dev=dev, test=test, label_names=names, regression=regression)


def load_transfer_set(
    spec: DatasetSpec, resolve: PathResolver, regression: bool | None = None
) -> TransferSet:
    """Load the train/dev/test examples a job trains and evaluates on.

    ``resolve`` maps a ``file://`` (or other non-builtin) reference to a local file and raises
    ValueError for a reference that is not allowed. ``regression`` is the job's task as
    :func:`resolve_regression` gives it; None (the default) resolves ``spec.task`` without a
    teacher (``auto``: by the labels). Regression labels are floats and ``label_names`` is
    empty. Subsets (``max_train_examples``, ``max_eval_examples``) are seeded with
    ``split_seed`` and stratified for classification.

    Raises:
        ValueError: unknown built-in, unreadable file, missing column, unknown label, a
            non-numeric label in a regression set, a task the built-in does not have, a train
            split with fewer than 2 distinct labels.
    """
    if regression is None and spec.task != "auto":
        regression = spec.task == "regression"
    if scheme_of(spec.source) == "builtin:":
        name = spec.source.removeprefix("builtin:")
        if regression is not None and regression != (name in BUILTIN_REGRESSION):
            kinds = ("classification", "regression")
            raise ValueError(
                f"dataset.task: built-in {name!r} is a {kinds[name in BUILTIN_REGRESSION]} "
                f"dataset, and this job is {kinds[regression]}"
            )
        data = load_builtin(name)
    else:
        data = _from_file(spec, resolve, regression)
    if len({e.label for e in data.train}) < 2:
        raise ValueError("dataset: the train split has fewer than 2 distinct labels")
    return TransferSet(
        train=subset(data.train, spec.max_train_examples, spec.split_seed),
        dev=subset(data.dev, spec.max_eval_examples, spec.split_seed),
        test=subset(data.test, spec.max_eval_examples, spec.split_seed),
        label_names=data.label_names,
        regression=data.regression,
    )


def _eval_set_examples(
    spec: DatasetSpec, es: EvalSetSpec, field: str, resolve: PathResolver, regression: bool
) -> tuple[list[Example], list[str]]:
    """The examples of one eval set with their own label names (empty for regression)."""
    if scheme_of(es.source) == "builtin:":
        name = es.source.removeprefix("builtin:")
        if es.source == spec.source:
            raise ValueError(
                f"{field}.source: {es.source!r} is the job's own dataset (its test split is "
                "evaluated already, and its train split is trained on)"
            )
        try:
            return load_builtin_eval(name, regression)
        except ValueError as e:
            raise ValueError(f"{field}.source: {e}") from None
    rows = read_rows(resolve(es.source))
    where = f"{field}.source"
    texts = [str(v) for v in column(rows, es.text_column or spec.text_column, where)]
    pair_column = es.text_pair_column or spec.text_pair_column
    pairs: list[str | None] = [None] * len(rows)
    if pair_column:
        pairs = [str(v) for v in column(rows, pair_column, where)]
    labels = [str(v) for v in column(rows, es.label_column or spec.label_column, where)]
    if regression:
        scores = [_score(lab, where, i + 1) for i, lab in enumerate(labels)]
        rows_ = zip(texts, pairs, scores, strict=True)
        return [Example(i, t, p, y) for i, (t, p, y) in enumerate(rows_)], []
    names = label_order(labels)
    index = {n: i for i, n in enumerate(names)}
    examples = [
        Example(i, t, p, index[lab])
        for i, (t, p, lab) in enumerate(zip(texts, pairs, labels, strict=True))
    ]
    return examples, names


def load_eval_sets(
    spec: DatasetSpec, resolve: PathResolver, label_names: list[str], regression: bool
) -> dict[str, list[Example]]:
    """Load ``spec.eval_sets``, by name, with labels in the job's class order.

    Each set is read whole (a built-in training dataset: all of its splits), then cut to
    ``max_eval_examples`` like the test split (seeded with ``split_seed``, stratified for
    classification). Its labels must be some of the job's (``label_names``, the teacher's
    order); a set may lack some of them.

    Raises:
        ValueError: an unreadable file, a missing column, a label the job does not have, a
            non-numeric regression label, the job's own built-in, an unknown built-in; the
            message starts with the field, e.g. ``dataset.eval_sets.0.label_column``.
    """
    out: dict[str, list[Example]] = {}
    for n, es in enumerate(spec.eval_sets):
        field = f"dataset.eval_sets.{n}"
        examples, names = _eval_set_examples(spec, es, field, resolve, regression)
        if not examples:
            raise ValueError(f"{field}.source: the set has no examples")
        if not regression:
            unknown = [name for name in names if name not in label_names]
            if unknown:
                label_field = "source" if scheme_of(es.source) == "builtin:" else "label_column"
                raise ValueError(
                    f"{field}.{label_field}: labels {unknown} are not the job's labels "
                    f"({', '.join(label_names)})"
                )
            mapping = [label_names.index(name) for name in names]
            examples = [Example(e.id, e.text, e.text_pair, mapping[int(e.label)]) for e in examples]
        out[es.name] = subset(examples, spec.max_eval_examples, spec.split_seed)
    return out


def relabel(data: TransferSet, label_names: list[str]) -> TransferSet:
    """Re-index labels so that class id i means ``label_names[i]`` (the teacher's order).

    A regression set (no label names) is returned as it is.

    Raises:
        ValueError: the two sets of label names differ (the message lists both).
    """
    if data.regression:
        return data
    if sorted(label_names) != sorted(data.label_names):
        raise ValueError(
            f"the teacher's labels {label_names} do not match the dataset's labels "
            f"{data.label_names}"
        )
    mapping = {old: label_names.index(name) for old, name in enumerate(data.label_names)}

    def remap(split: list[Example]) -> list[Example]:
        return [Example(e.id, e.text, e.text_pair, mapping[int(e.label)]) for e in split]

    return TransferSet(remap(data.train), remap(data.dev), remap(data.test), list(label_names))
