"""Inspecting a dataset file before any job uses it: what it holds, or why it cannot be used.

:func:`inspect_dataset` streams the file once through the training reader
(:class:`kd_engine.data.files.RowStream`) and returns a :class:`DatasetReport` (encoding,
format, columns, row count, labels, text lengths), or raises a
:class:`~kd_engine.errors.SpecError` that names the field and, in its reason, the file and the
line or column. The API calls it at submit for every ``file://`` dataset of a job, and for an
uploaded dataset when it arrives.
"""

from __future__ import annotations

import difflib
import math
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, Field

from kd_engine.data.files import Encoding, Format, RowStream, label_order
from kd_engine.errors import SpecError

MAX_LABELS = 10_000
"""Distinct values a classification label column may hold."""
InspectTask = Literal["auto", "classification", "regression"]


class LengthStats(BaseModel):
    """Lengths of a text column, in characters (``p50``, ``p95``: nearest-rank percentiles)."""

    min: int
    p50: int
    p95: int
    max: int


class LabelStats(BaseModel):
    """A regression label column: the smallest, largest and mean value."""

    min: float
    max: float
    mean: float


class DatasetReport(BaseModel):
    """What :func:`inspect_dataset` found in a dataset file (JSON-serialisable:
    ``report.model_dump(mode="json")``).

    Attributes:
        file: the file's name as given (``name``), e.g. ``reviews.csv``.
        format: ``csv``, ``jsonl`` or ``parquet`` (from the suffix).
        encoding: ``utf-8``, or ``utf-8-sig`` when a UTF-8 byte-order mark was stripped.
        size_bytes: the file's size in bytes.
        columns: the column names (CSV header; JSONL: the first object's keys; Parquet schema).
        rows: data rows read (blank lines not counted).
        complete: False when ``max_rows`` stopped the read before the end of the file (the
            counts and statistics then describe the first ``rows`` rows only).
        text_column, text_pair_column, label_column: the columns checked.
        task: ``classification`` or ``regression`` (None without a label column). ``auto``
            decides as a job does: regression when every label is a finite number and at least
            one is written as a non-integer.
        labels: classification: each label with its count, in the job's label order (sorted;
            numerically when every label is an integer). None for regression.
        label_stats: regression: min, max and mean of the labels. None for classification.
        text_length: lengths of ``text_column`` in characters.
        text_pair_length: lengths of ``text_pair_column`` (None without one).
    """

    file: str
    format: Format
    encoding: Encoding
    size_bytes: int
    columns: list[str]
    rows: int
    complete: bool = True
    text_column: str
    text_pair_column: str | None = None
    label_column: str | None = None
    task: Literal["classification", "regression"] | None = None
    labels: dict[str, int] | None = None
    label_stats: LabelStats | None = None
    text_length: LengthStats
    text_pair_length: LengthStats | None = Field(default=None)


@dataclass(frozen=True)
class DatasetFields:
    """The spec fields an error names: the file's (``source``) and each column's. Defaults
    are a job's training source; an eval set, a corpus or an upload passes its own."""

    source: str = "dataset.source"
    text_column: str = "dataset.text_column"
    text_pair_column: str = "dataset.text_pair_column"
    label_column: str = "dataset.label_column"


def finite_number(value: str) -> float | None:
    """The label as a finite float, or None when it is not one (``nan``, ``inf``, text)."""
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def is_integer_label(value: str) -> bool:
    """True when ``int(value)`` accepts the label (``3``, ``-2``; not ``3.0``)."""
    try:
        int(value)
    except ValueError:
        return False
    return True


def _suggestion(name: str, columns: list[str]) -> str:
    by_lower = {c.lower(): c for c in columns}
    close = difflib.get_close_matches(name.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {by_lower[close[0]]!r}?)" if close else ""


def _lengths(values: array[int]) -> LengthStats:
    x = np.frombuffer(values, dtype=np.int64)
    return LengthStats(
        min=int(x.min()),
        p50=int(np.percentile(x, 50, method="nearest")),
        p95=int(np.percentile(x, 95, method="nearest")),
        max=int(x.max()),
    )


class _Labels:
    """Running label statistics: counts (up to :data:`MAX_LABELS` distinct) and numbers."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.overflow = False
        self.numeric = True
        self.any_non_integer = False
        self.low, self.high, self.total, self.n = math.inf, -math.inf, 0.0, 0

    def add(self, value: str) -> float | None:
        if value in self.counts:
            self.counts[value] += 1
        elif len(self.counts) < MAX_LABELS:
            self.counts[value] = 1
        else:
            self.overflow = True
        number = finite_number(value) if self.numeric else None
        if number is None:
            self.numeric = False
            return None
        self.any_non_integer = self.any_non_integer or not is_integer_label(value)
        self.low, self.high = min(self.low, number), max(self.high, number)
        self.total, self.n = self.total + number, self.n + 1
        return number


def inspect_dataset(
    path: Path,
    text_column: str = "text",
    label_column: str | None = "label",
    *,
    text_pair_column: str | None = None,
    task: InspectTask = "auto",
    name: str | None = None,
    fields: DatasetFields | None = None,
    max_rows: int | None = None,
) -> DatasetReport:
    """Read a dataset file once and report what it holds; refuse it with the reason when a job
    could not use it.

    Args:
        path: the local file; its suffix gives the format (``.csv``, ``.jsonl`` / ``.ndjson``,
            ``.parquet``).
        text_column: the column holding the text (every row needs a non-blank value).
        label_column: the label column (every row needs a value); None for an unlabelled
            corpus.
        text_pair_column: the second text of a pair, if any.
        task: ``classification``, ``regression`` (every label must be a finite number), or
            ``auto`` (decided by the labels, as a job with a base-encoder teacher does).
        name: how messages name the file (default: its file name), e.g. the reference
            without ``file://`` or an upload's original name.
        fields: the spec fields errors name (default: a job's training source).
        max_rows: stop after this many rows (the report says ``complete`` False); None reads
            the whole file.

    Returns:
        The :class:`DatasetReport`.

    Raises:
        SpecError: ``fields.source`` for a file problem (empty, unsupported type, not UTF-8,
            malformed CSV/JSONL line, a cell over the cap, a value missing or not a number, too
            many distinct labels), the column's field for a missing column (the reason lists
            the columns found and suggests the closest). Every reason starts with the file's
            name and names the line (Parquet: the row) or the column.
    """
    fields = fields or DatasetFields()
    label = name or path.name
    try:
        stream = RowStream(path, name)
        size = path.stat().st_size
    except ValueError as e:
        raise SpecError(fields.source, str(e)) from None
    except OSError as e:
        raise SpecError(fields.source, f"{label} cannot be read ({e.strerror or e})") from None
    wanted = [(text_column, fields.text_column)]
    if label_column is not None:
        wanted.append((label_column, fields.label_column))
    if text_pair_column is not None:
        wanted.append((text_pair_column, fields.text_pair_column))
    text_lengths: array[int] = array("q")
    pair_lengths: array[int] = array("q")
    labels = _Labels()
    complete = True
    rows = 0

    def value(row: dict[str, Any], col: str, line: int) -> str:
        v = row.get(col)
        text = "" if v is None else v if isinstance(v, str) else str(v)
        if not text or text.isspace():
            raise SpecError(
                fields.source, f"{label}: {stream.where(line)} has no value in column {col!r}"
            )
        return text

    try:
        for line, row in stream:
            if rows == 0:
                for col, field in wanted:
                    if col not in stream.columns:
                        found = ", ".join(map(repr, stream.columns)) or "none"
                        raise SpecError(
                            field,
                            f"{label} has no column {col!r}{_suggestion(col, stream.columns)}; "
                            f"its columns are {found}",
                        )
            if max_rows is not None and rows >= max_rows:
                complete = False
                break
            rows += 1
            text_lengths.append(len(value(row, text_column, line)))
            if text_pair_column is not None:
                pair_lengths.append(len(value(row, text_pair_column, line)))
            if label_column is not None:
                lab = value(row, label_column, line)
                if labels.add(lab) is None and task == "regression":
                    raise SpecError(
                        fields.source,
                        f"{label}: {stream.where(line)} has label {lab!r}, which is not a "
                        "finite number (a regression dataset needs one number per example)",
                    )
    except SpecError:
        raise
    except ValueError as e:
        raise SpecError(fields.source, str(e)) from None
    except OSError as e:
        raise SpecError(fields.source, f"{label} cannot be read ({e.strerror or e})") from None
    if rows == 0:
        what = "has a header but no rows" if stream.columns else "is empty"
        raise SpecError(fields.source, f"{label} {what}")
    report_task: Literal["classification", "regression"] | None = None
    if label_column is not None:
        regression = task == "regression" or (
            task == "auto" and labels.numeric and labels.any_non_integer
        )
        report_task = "regression" if regression else "classification"
        if not regression and labels.overflow:
            raise SpecError(
                fields.source,
                f"{label}: column {label_column!r} has more than {MAX_LABELS:,} distinct "
                "values, too many for classes (is it the label column? numeric scores need "
                "dataset.task regression)",
            )
    return DatasetReport(
        file=label,
        format=stream.format,
        encoding=stream.encoding,
        size_bytes=size,
        columns=stream.columns,
        rows=rows,
        complete=complete,
        text_column=text_column,
        text_pair_column=text_pair_column,
        label_column=label_column,
        task=report_task,
        labels=(
            {k: labels.counts[k] for k in label_order(list(labels.counts))}
            if report_task == "classification"
            else None
        ),
        label_stats=(
            LabelStats(min=labels.low, max=labels.high, mean=labels.total / labels.n)
            if report_task == "regression"
            else None
        ),
        text_length=_lengths(text_lengths),
        text_pair_length=_lengths(pair_lengths) if text_pair_column is not None else None,
    )
