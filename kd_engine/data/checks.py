"""Checking a job's dataset files before it is queued: every ``file://`` source is inspected
(:func:`kd_engine.data.inspect.inspect_dataset`) and the files are checked against each other
and against the teacher's labels as the worker's loader would, so that a data problem is a 422
at submit and not a failed job after a wait in the queue."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from kd_engine.data.builtins import BUILTIN_LABELS, BUILTIN_REGRESSION
from kd_engine.data.files import label_order
from kd_engine.data.inspect import DatasetFields, DatasetReport, InspectTask, inspect_dataset
from kd_engine.errors import SpecError
from kd_engine.references import scheme_of
from kd_engine.spec import DatasetSpec

PathResolver = Callable[[str], Path]


@dataclass
class DatasetCheck:
    """What :func:`check_dataset_files` read: one report per checked file, by spec field
    (``dataset.source``, ``dataset.eval_sets.0.source``, ...), the job's task and its label
    names (empty for regression)."""

    reports: dict[str, DatasetReport] = field(default_factory=dict)
    regression: bool | None = None
    label_names: list[str] = field(default_factory=list)


def _name(ref: str) -> str:
    return ref.removeprefix("file://")


def _held_out(n: int, fraction: float) -> int | None:
    """Rows :func:`kd_engine.data.splits.split_off` holds out of ``n``; None if it cannot."""
    held = round(n * fraction)
    return held if 1 <= held < n else None


def _check_split_sizes(spec: DatasetSpec, rows: int, name: str) -> None:
    """The splits :func:`kd_engine.data.loading.load_transfer_set` makes of ``rows`` rows."""
    dev_fraction = spec.dev_fraction
    if spec.test_source is None:
        test = _held_out(rows, spec.test_fraction)
        if test is None:
            raise SpecError(
                "dataset.source",
                f"{name} has {rows} rows, too few to hold out {spec.test_fraction:.0%} as the "
                "test split; add rows or give dataset.test_source",
            )
        rows -= test
        dev_fraction = spec.dev_fraction / (1 - spec.test_fraction)
    if spec.dev_source is None and _held_out(rows, dev_fraction) is None:
        raise SpecError(
            "dataset.source",
            f"{name} leaves {rows} rows after the test split, too few to hold out a dev split "
            f"({spec.dev_fraction:.0%} of the file); add rows or give dataset.dev_source",
        )


def _extra(labels: list[str], allowed: list[str]) -> list[str]:
    known = set(allowed)
    return [x for x in labels if x not in known]


def check_dataset_files(
    spec: DatasetSpec,
    resolve: PathResolver,
    teacher_labels: list[str] | None,
    regression: bool | None,
    max_rows: int | None = None,
) -> DatasetCheck:
    """Inspect every file of ``spec`` (``source``, ``dev_source``, ``test_source``,
    ``eval_sets``) and check them as the worker will use them.

    Args:
        spec: the job's dataset.
        resolve: a file reference to its local path (raises ValueError when not allowed).
        teacher_labels: the teacher's class names when it is a fine-tuned classifier (the
            dataset's labels must then be the same set); None otherwise.
        regression: the job's task from ``dataset.task`` and the teacher
            (:func:`kd_engine.data.loading.resolve_regression`); None: the training labels
            decide.
        max_rows: read at most this many rows of each file (None: all). With a prefix, the
            teacher's labels must include the dataset's rather than equal them, and the split
            sizes are not checked.

    Returns:
        The :class:`DatasetCheck`.

    Raises:
        SpecError: naming the field: a file problem (:func:`inspect_dataset`), a missing
            column, labels that are not the teacher's (``dataset.source``), dev/test labels
            the training file lacks, eval-set labels the job lacks
            (``dataset.eval_sets.N.label_column``), fewer than 2 distinct training labels,
            too few rows to split.
    """
    out = DatasetCheck(regression=regression)
    builtin = scheme_of(spec.source) == "builtin:"

    def task() -> InspectTask:
        if out.regression is None:
            return "auto"
        return "regression" if out.regression else "classification"

    def inspect(
        ref: str, where: str, fields: DatasetFields, **columns: str | None
    ) -> DatasetReport:
        try:
            path = resolve(ref)
        except ValueError as e:
            raise SpecError(fields.source, str(e)) from None
        report = inspect_dataset(
            path,
            columns["text"] or spec.text_column,
            columns["label"] or spec.label_column,
            text_pair_column=columns["pair"] or spec.text_pair_column,
            task=task(),
            name=_name(ref),
            fields=fields,
            max_rows=max_rows,
        )
        out.reports[where] = report
        return report

    no_columns: dict[str, str | None] = {"text": None, "label": None, "pair": None}
    if builtin:
        name = spec.source.removeprefix("builtin:")
        out.regression = name in BUILTIN_REGRESSION
        out.label_names = [] if out.regression else list(BUILTIN_LABELS.get(name, []))
    else:
        train = inspect(spec.source, "dataset.source", DatasetFields(), **no_columns)
        out.regression = train.task == "regression"
        train_labels = list(train.labels or {})
        stats = train.label_stats
        only = (
            [f"{stats.min:g}"]
            if stats is not None and stats.min == stats.max
            else train_labels[:1]
            if len(train_labels) == 1
            else []
        )
        if only:
            raise SpecError(
                "dataset.label_column",
                f"{train.file}: column {train.label_column!r} holds one value only "
                f"({only[0]!r}); a job needs at least 2 distinct labels",
            )
        if train.complete:
            _check_split_sizes(spec, train.rows, train.file)
        out.label_names = [] if out.regression else label_order(train_labels)
        if not out.regression and teacher_labels:
            missing = _extra(train_labels, teacher_labels)
            unused = _extra(teacher_labels, train_labels) if train.complete else []
            if missing or unused:
                parts = []
                if missing:
                    parts.append(f"the dataset has labels the teacher lacks: {missing}")
                if unused:
                    parts.append(f"the teacher has labels the dataset lacks: {unused}")
                raise SpecError(
                    "dataset.source",
                    f"{train.file}: the teacher's labels {teacher_labels} do not match the "
                    f"dataset's labels {out.label_names} ({'; '.join(parts)})",
                )
        for split in ("dev", "test"):
            ref = getattr(spec, f"{split}_source")
            if ref is None:
                continue
            where = f"dataset.{split}_source"
            report = inspect(ref, where, DatasetFields(source=where), **no_columns)
            extra = _extra(list(report.labels or {}), train_labels)
            if extra:
                raise SpecError(
                    where,
                    f"{report.file} has labels the training file does not have: {extra} "
                    f"(training labels: {', '.join(out.label_names)})",
                )
    job_labels = teacher_labels if teacher_labels and not out.regression else out.label_names
    for n, es in enumerate(spec.eval_sets):
        if scheme_of(es.source) == "builtin:":
            continue  # built-ins are checked by name (core.service)
        prefix = f"dataset.eval_sets.{n}"
        fields = DatasetFields(
            source=f"{prefix}.source",
            text_column=f"{prefix}.text_column",
            text_pair_column=f"{prefix}.text_pair_column",
            label_column=f"{prefix}.label_column",
        )
        report = inspect(
            es.source,
            f"{prefix}.source",
            fields,
            text=es.text_column,
            label=es.label_column,
            pair=es.text_pair_column,
        )
        extra = _extra(list(report.labels or {}), job_labels) if job_labels else []
        if extra:
            raise SpecError(
                f"{prefix}.label_column",
                f"{report.file}: labels {extra} are not the job's labels ({', '.join(job_labels)})",
            )
    return out


def check_corpus_file(
    path: Path, text_column: str, name: str, max_rows: int | None = None
) -> DatasetReport:
    """Inspect an unlabelled corpus file (``minimax_knn``'s ``method.corpus``): every row needs
    a text in ``text_column``.

    Raises:
        SpecError: ``method.corpus`` (a file problem) or ``method.corpus_text_column`` (no such
            column).
    """
    fields = DatasetFields(source="method.corpus", text_column="method.corpus_text_column")
    return inspect_dataset(path, text_column, None, name=name, fields=fields, max_rows=max_rows)
