"""The plots of a job's HTML report (:mod:`kd_engine.report_html`): inline SVG drawn by
:mod:`kd_engine.charts`, the dashboard's chart stack, so that the page needs no other file and
no plotting library."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from markupsafe import Markup

from kd_engine.charts import Mark, Series, heatmap, line_chart
from kd_engine.contracts.metrics import EvaluationRecord


def _value(x: object) -> float:
    return float(x) if isinstance(x, int | float) and not isinstance(x, bool) else math.nan


def curve_positions(epochs: Sequence[EvaluationRecord]) -> list[float]:
    """The x position of each dev-evaluation record: its ``step``, plus the last step of every
    earlier hop (a chain's hops each count steps from 0), so the hops follow one another."""
    xs: list[float] = []
    offset, last_step, last_hop = 0, 0, None
    for i, r in enumerate(epochs):
        hop = r.hop
        if i and hop != last_hop:
            offset += last_step
        last_hop = hop
        step = _value(r.step)
        last_step = int(step) if math.isfinite(step) else 0
        xs.append(float(offset + last_step))
    return xs


def stage_marks(epochs: Sequence[EvaluationRecord], xs: Sequence[float]) -> list[Mark]:
    """A mark where each stage (or a chain's hop) begins: its name ("hop/stage") at its first
    record, and a dashed line halfway from the previous record (none before the first)."""
    marks: list[Mark] = []
    previous = None
    for i, r in enumerate(epochs):
        segment = (r.hop, r.stage)
        if segment != previous:
            name = "/".join(str(s) for s in segment if s is not None)
            line = (xs[i - 1] + xs[i]) / 2 if i else None
            marks.append(Mark(label_x=xs[i], text=name, line_x=line))
        previous = segment
    return marks


def learning_curves(epochs: Sequence[EvaluationRecord]) -> Markup | None:
    """Two charts from ``metrics.json``'s ``epochs`` (one record per dev evaluation): the mean
    training losses since the previous evaluation (``train_losses``: the total and each part)
    and the dev metrics, against the optimiser step, with :func:`stage_marks`. None when there
    is no record."""
    if not epochs:
        return None
    xs = curve_positions(epochs)
    marks = stage_marks(epochs, xs)
    charts = []
    panels: tuple[tuple[Callable[[EvaluationRecord], dict[str, float]], str, str], ...] = (
        (lambda r: r.train_losses, "training loss", "loss"),
        (lambda r: r.dev, "dev metrics", "metric"),
    )
    for values_of, title, y_label in panels:
        keys: list[str] = []
        for r in epochs:
            keys += [k for k in values_of(r) if k not in keys]
        series = [
            Series(
                key,
                [(x, _value(values_of(r).get(key))) for x, r in zip(xs, epochs, strict=True)],
                markers=True,
            )
            for key in keys
        ]
        charts.append(
            line_chart(
                series,
                title=title,
                x_label="optimiser step",
                y_label=y_label,
                width=560,
                height=320,
                marks=marks,
            )
        )
    return Markup("").join(charts)


def confusion_heatmap(matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str) -> Markup:
    """A heatmap of a (C, C) confusion matrix (rows true class, columns predicted), with the
    count in each cell up to :data:`kd_engine.charts.ANNOTATED_CLASSES` classes.

    Raises:
        ValueError: the matrix is not C x C.
    """
    return heatmap(matrix, labels, title=title, x_label="predicted", y_label="true")
