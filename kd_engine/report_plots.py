"""The PNG plots of a job's HTML report (:mod:`kd_engine.report_html`), each returned as a
``data:image/png;base64,...`` URI so that the page needs no other file.

matplotlib is imported inside the functions (its import takes about a second and builds a
font cache the first time), and only its object-oriented API is used (``Figure`` with an Agg
canvas): no pyplot, no global backend switch, nothing at import time. Text taken from a job
(class names) is drawn with ``parse_math=False`` so that a ``$`` in a name is not mathtext.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

from kd_engine.contracts import EvaluationRecord

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PNG_PREFIX = "data:image/png;base64,"
ANNOTATED_CLASSES = 20
"""Up to this many classes a confusion heatmap writes the count in each cell."""
NAME_CHARS = 16
"""Class names longer than this are shortened on a plot's axes (the HTML tables show them
whole)."""


def _figure(width: float, height: float, constrained: bool = True) -> Figure:
    """A figure of ``width`` x ``height`` inches at 100 dpi; ``constrained`` lays the axes out
    around their labels (costs a draw; the learning curves use fixed margins instead)."""
    from matplotlib.figure import Figure

    if constrained:
        return Figure(figsize=(width, height), dpi=100, layout="constrained")
    return Figure(figsize=(width, height), dpi=100)


def png_data_uri(fig: Figure) -> str:
    """``fig`` rendered by the Agg canvas as a PNG ``data:`` URI."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return PNG_PREFIX + base64.b64encode(buf.getvalue()).decode("ascii")


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 1] + "…"


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


def learning_curves(epochs: Sequence[EvaluationRecord]) -> str | None:
    """Two panels from ``metrics.json``'s ``epochs`` (one record per dev evaluation): the mean
    training losses since the previous evaluation (``train_losses``: the total and each part)
    and the dev metrics, against the optimiser step; a dashed line and the name where a stage
    (or a chain's hop) begins. None when there is no record."""
    if not epochs:
        return None
    xs = curve_positions(epochs)
    fig = _figure(10.0, 3.8, constrained=False)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.13, top=0.92, wspace=0.15)
    loss_ax, dev_ax = fig.subplots(1, 2)
    for ax, series, title in (
        (loss_ax, [r.train_losses for r in epochs], "training loss"),
        (dev_ax, [r.dev for r in epochs], "dev metrics"),
    ):
        keys: list[str] = []
        for values in series:
            keys += [k for k in values if k not in keys]
        for key in keys:
            ys = [_value(values.get(key)) for values in series]
            width = 2.0 if key == "loss" else 1.2
            ax.plot(xs, ys, marker="o", markersize=3, linewidth=width, label=key)
        ax.set_title(title)
        ax.set_xlabel("optimiser step")
        ax.grid(alpha=0.3)
        if keys:
            ax.legend(fontsize="small")
        previous = None
        for i, r in enumerate(epochs):
            segment = (r.hop, r.stage)
            if segment != previous:
                name = "/".join(str(s) for s in segment if s is not None)
                if i:
                    ax.axvline((xs[i - 1] + xs[i]) / 2, color="grey", linestyle="--", linewidth=1)
                ax.annotate(
                    name,
                    xy=(xs[i], 1.0),
                    xycoords=("data", "axes fraction"),
                    xytext=(2, -12),
                    textcoords="offset points",
                    fontsize="x-small",
                    color="grey",
                    parse_math=False,
                )
            previous = segment
    return png_data_uri(fig)


def confusion_heatmap(matrix: Sequence[Sequence[int]], labels: Sequence[str], title: str) -> str:
    """A heatmap of a (C, C) confusion matrix (rows true class, columns predicted), with the
    count in each cell up to :data:`ANNOTATED_CLASSES` classes."""
    n = len(labels)
    names = [_short(str(label)) for label in labels]
    longest = max((len(name) for name in names), default=1)
    side = min(max(4.0, 0.45 * n + 2.0) + 0.09 * longest, 14.0)  # room for the names
    fig = _figure(side + 1.0, side)
    ax = fig.subplots()
    image = ax.imshow([list(row) for row in matrix], cmap="Blues")
    fig.colorbar(image, ax=ax, shrink=0.6)
    slanted = n > 3 or longest > 8
    ax.set_xticks(
        range(n), names, rotation=45 if slanted else 0, ha="right" if slanted else "center"
    )
    ax.set_yticks(range(n), names)
    for text in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        text.set_parse_math(False)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, parse_math=False)
    if n <= ANNOTATED_CLASSES:
        peak = max((max(row) for row in matrix if len(row)), default=0)
        for i, row in enumerate(matrix):
            for j, count in enumerate(row):
                dark = peak and count > peak / 2
                color = "white" if dark else "black"
                ax.text(j, i, str(count), ha="center", va="center", color=color, fontsize="small")
    return png_data_uri(fig)
