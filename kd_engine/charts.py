"""Inline SVG charts drawn on the server, the one chart stack of the dashboard (``api/ui``) and
of a job's report (:mod:`kd_engine.report_plots`): line charts (learning curves, with dashed
stage marks), a scatter plot with its Pareto front (the compare page) and a heatmap (confusion
matrices). No JavaScript, no other file; every text is XML-escaped. The classes the charts
use are styled by :data:`CHART_CSS` (the report embeds it; the dashboard's ``ui.css`` has the
same rules)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from html import escape

from markupsafe import Markup

PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)
"""Series colours, in order (the matplotlib ``tab10`` colours)."""

BLUES = (
    "#f7fbff",
    "#deebf7",
    "#c6dbef",
    "#9ecae1",
    "#6baed6",
    "#4292c6",
    "#2171b5",
    "#08519c",
    "#08306b",
)
"""The heatmap's colour ramp, low to high (the ColorBrewer ``Blues`` scheme)."""
ANNOTATED_CLASSES = 20
"""Up to this many classes a heatmap writes the count in each cell."""
NAME_CHARS = 16
"""Class names longer than this are shortened on a heatmap's axes (a tooltip has them whole)."""
CHART_CSS = """
svg.chart { background: #fff; font-size: 11px; max-width: 100%; height: auto; }
svg.chart .grid { stroke: #eceff3; } svg.chart .chart-title { font-weight: 600; font-size: 12px; }
svg.chart .point { fill: #fff; stroke: #1f6feb; stroke-width: 1.5; }
svg.chart .point.front { fill: #d62728; stroke: #d62728; }
svg.chart .pareto-line { stroke: #d62728; stroke-dasharray: 4 3; stroke-width: 1.2; }
svg.chart .point-label { fill: #b42318; font-size: 10px; }
svg.chart .mark { stroke: #888; stroke-dasharray: 4 3; } svg.chart .mark-label { fill: #777; }
"""
"""The CSS of the charts' classes (a page embedding a chart includes it once)."""

_MARGIN_L, _MARGIN_R, _MARGIN_T, _MARGIN_B = 64, 16, 28, 44
Scale = Callable[[float], float]


@dataclass
class Series:
    """One line: a name (the legend), its (x, y) points in drawing order, a colour."""

    name: str
    points: list[tuple[float, float]] = field(default_factory=list)
    color: str = ""
    markers: bool = False


@dataclass(frozen=True)
class Mark:
    """A vertical mark on a line chart: ``text`` written at ``label_x`` near the top, and a
    dashed line at ``line_x`` when given (where a stage or hop begins)."""

    label_x: float
    text: str
    line_x: float | None = None


@dataclass(frozen=True)
class Point:
    """One scatter point: position, a label (tooltip), an optional link, whether it is on the
    Pareto front."""

    x: float
    y: float
    label: str
    href: str = ""
    front: bool = False


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [lo, hi] (steps of 1, 2 or 5 x 10^k)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:  # one value: a range around it
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / max(1, count)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    first = math.floor(lo / step) * step
    ticks = []
    t = first
    while t <= hi + step * 1e-9:
        ticks.append(round(t, 12))
        t += step
    if ticks and ticks[-1] < hi:
        ticks.append(round(t, 12))
    return ticks


def fmt_tick(value: float, step: float = 0.0) -> str:
    """A tick label: as many decimals as the tick ``step`` needs (0.691, 0.6915), integers
    without any; 3 significant digits when no step is given."""
    if value == int(value) and abs(value) < 1e6:
        return str(int(value))
    if step > 0:
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        if round(step * 10**decimals, 6) % 1:  # a step such as 0.25
            decimals += 1
        return f"{value:.{min(decimals, 12)}f}"
    return f"{value:.3g}"


def _frame(
    xs: Sequence[float], ys: Sequence[float], width: int, height: int
) -> tuple[list[float], list[float], Scale, Scale]:
    xt = nice_ticks(min(xs), max(xs))
    yt = nice_ticks(min(ys), max(ys))
    x0, x1 = xt[0], xt[-1]
    y0, y1 = yt[0], yt[-1]
    pw = width - _MARGIN_L - _MARGIN_R
    ph = height - _MARGIN_T - _MARGIN_B

    def sx(x: float) -> float:
        return _MARGIN_L + (x - x0) / ((x1 - x0) or 1.0) * pw

    def sy(y: float) -> float:
        return _MARGIN_T + ph - (y - y0) / ((y1 - y0) or 1.0) * ph

    return xt, yt, sx, sy


def _axes(
    xt: list[float],
    yt: list[float],
    sx: Scale,
    sy: Scale,
    width: int,
    height: int,
    x_label: str,
    y_label: str,
    title: str,
) -> list[str]:
    out = [
        f'<text x="{width / 2:.0f}" y="16" text-anchor="middle" class="chart-title">'
        f"{escape(title)}</text>"
    ]
    bottom = height - _MARGIN_B
    xstep = xt[1] - xt[0] if len(xt) > 1 else 0.0
    ystep = yt[1] - yt[0] if len(yt) > 1 else 0.0
    for t in xt:
        x = sx(t)
        out.append(
            f'<line x1="{x:.1f}" y1="{_MARGIN_T}" x2="{x:.1f}" y2="{bottom}" class="grid"/>'
            f'<text x="{x:.1f}" y="{bottom + 14}" text-anchor="middle">{fmt_tick(t, xstep)}</text>'
        )
    for t in yt:
        y = sy(t)
        out.append(
            f'<line x1="{_MARGIN_L}" y1="{y:.1f}" x2="{width - _MARGIN_R}" y2="{y:.1f}" '
            f'class="grid"/><text x="{_MARGIN_L - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{fmt_tick(t, ystep)}</text>"
        )
    out.append(
        f'<text x="{width / 2:.0f}" y="{height - 6}" text-anchor="middle">{escape(x_label)}</text>'
        f'<text transform="translate(14,{height / 2:.0f}) rotate(-90)" text-anchor="middle">'
        f"{escape(y_label)}</text>"
    )
    return out


def _svg(width: int, height: int, body: list[str], label: str) -> Markup:
    return Markup(
        f'<svg class="chart" viewBox="0 0 {width} {height}" width="{width}" height="{height}" '
        f'role="img" aria-label="{escape(label)}" xmlns="http://www.w3.org/2000/svg">'
        + "".join(body)
        + "</svg>"
    )


def line_chart(
    series: Sequence[Series],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 640,
    height: int = 300,
    marks: Sequence[Mark] = (),
) -> Markup:
    """An SVG line chart of ``series`` (each its own colour, with a legend) and ``marks``; a
    chart saying "no data yet" when no series has a point. Non-finite values are skipped."""
    clean = [
        Series(
            s.name,
            [(x, y) for x, y in s.points if math.isfinite(x) and math.isfinite(y)],
            s.color or PALETTE[i % len(PALETTE)],
            s.markers,
        )
        for i, s in enumerate(series)
    ]
    clean = [s for s in clean if s.points]
    if not clean:
        return _svg(
            width,
            height,
            [
                f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle">'
                f"{escape(title)}: no data yet</text>"
            ],
            title,
        )
    xs = [x for s in clean for x, _ in s.points]
    ys = [y for s in clean for _, y in s.points]
    xt, yt, sx, sy = _frame(xs, ys, width, height)
    body = _axes(xt, yt, sx, sy, width, height, x_label, y_label, title)
    for mark in marks:
        if mark.line_x is not None and math.isfinite(mark.line_x):
            x = sx(mark.line_x)
            body.append(
                f'<line x1="{x:.1f}" y1="{_MARGIN_T}" x2="{x:.1f}" y2="{height - _MARGIN_B}" '
                'class="mark"/>'
            )
        if math.isfinite(mark.label_x):
            body.append(
                f'<text x="{sx(mark.label_x) + 3:.1f}" y="{_MARGIN_T + 10}" class="mark-label">'
                f"{escape(mark.text)}</text>"
            )
    for i, s in enumerate(clean):
        coords = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s.points)
        body.append(
            f'<polyline fill="none" stroke="{s.color}" stroke-width="1.8" points="{coords}">'
            f"<title>{escape(s.name)}</title></polyline>"
        )
        if s.markers or len(s.points) == 1:
            body += [
                f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{s.color}">'
                f"<title>{escape(s.name)}: {fmt_tick(x)}, {y:.4g}</title></circle>"
                for x, y in s.points
            ]
        ly = _MARGIN_T + 4 + 14 * i
        lx = width - _MARGIN_R - 180
        body.append(
            f'<rect x="{lx}" y="{ly}" width="10" height="10" fill="{s.color}"/>'
            f'<text x="{lx + 14}" y="{ly + 9}" class="legend">{escape(s.name[:32])}</text>'
        )
    return _svg(width, height, body, title)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats: lower x (latency) and higher y (the
    metric), i.e. no other point has x <= and y >= with one of them strictly. Sorted by x.
    Non-finite points are never on the front."""
    order = sorted(
        (i for i, (x, y) in enumerate(points) if math.isfinite(x) and math.isfinite(y)),
        key=lambda i: (points[i][0], -points[i][1]),
    )
    front: list[int] = []
    best = -math.inf
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def scatter_chart(
    points: Sequence[Point],
    *,
    title: str,
    x_label: str,
    y_label: str,
    width: int = 640,
    height: int = 360,
) -> Markup:
    """An SVG scatter plot; points on the Pareto front are filled, joined by a step line and
    labelled; every point links to ``href`` when it has one."""
    pts = [p for p in points if math.isfinite(p.x) and math.isfinite(p.y)]
    if not pts:
        return _svg(
            width,
            height,
            [
                f'<text x="{width / 2:.0f}" y="{height / 2:.0f}" text-anchor="middle">'
                f"{escape(title)}: no succeeded job yet</text>"
            ],
            title,
        )
    xt, yt, sx, sy = _frame([p.x for p in pts], [p.y for p in pts], width, height)
    body = _axes(xt, yt, sx, sy, width, height, x_label, y_label, title)
    front = sorted((p for p in pts if p.front), key=lambda p: p.x)
    if len(front) > 1:
        steps = [f"{sx(front[0].x):.1f},{sy(front[0].y):.1f}"]
        for a, b in itertools.pairwise(front):
            steps += [f"{sx(b.x):.1f},{sy(a.y):.1f}", f"{sx(b.x):.1f},{sy(b.y):.1f}"]
        body.append(
            f'<polyline class="pareto-line" fill="none" points="{" ".join(steps)}">'
            "<title>Pareto front</title></polyline>"
        )
    for p in pts:
        cls = "point front" if p.front else "point"
        mark = (
            f'<circle cx="{sx(p.x):.1f}" cy="{sy(p.y):.1f}" r="{6 if p.front else 4}" '
            f'class="{cls}"><title>{escape(p.label)}: {p.y:.4g} at {p.x:.4g}'
            f"{' (Pareto front)' if p.front else ''}</title></circle>"
        )
        if p.href:
            mark = f'<a href="{escape(p.href)}">{mark}</a>'
        body.append(mark)
        if p.front:
            body.append(
                f'<text x="{sx(p.x) + 8:.1f}" y="{sy(p.y) - 8:.1f}" class="point-label">'
                f"{escape(p.label[:24])}</text>"
            )
    return _svg(width, height, body, title)


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 1] + "…"


def _hex(color: str) -> tuple[int, int, int]:
    return int(color[1:3], 16), int(color[3:5], 16), int(color[5:7], 16)


def ramp(t: float) -> str:
    """The :data:`BLUES` colour at ``t`` in [0, 1] (clamped; linear between its stops)."""
    t = min(max(t, 0.0), 1.0) if math.isfinite(t) else 0.0
    pos = t * (len(BLUES) - 1)
    i = min(int(pos), len(BLUES) - 2)
    a, b = _hex(BLUES[i]), _hex(BLUES[i + 1])
    f = pos - i
    r, g, bl = (round(x + (y - x) * f) for x, y in zip(a, b, strict=True))
    return f"#{r:02x}{g:02x}{bl:02x}"


def heatmap(
    matrix: Sequence[Sequence[float]],
    labels: Sequence[str],
    *,
    title: str,
    x_label: str = "predicted",
    y_label: str = "true",
) -> Markup:
    """An SVG heatmap of a (C, C) matrix, rows ``labels`` (``y_label``) and columns ``labels``
    (``x_label``): each cell coloured by :func:`ramp` of its value over the largest one, its
    value written in it up to :data:`ANNOTATED_CLASSES` classes (white on dark cells), a
    tooltip naming both classes; a five-step colour key. Class names longer than
    :data:`NAME_CHARS` are shortened on the axes.

    Raises:
        ValueError: ``matrix`` is not C rows of C values for the C ``labels``.
    """
    n = len(labels)
    if len(matrix) != n or any(len(row) != n for row in matrix):
        raise ValueError(f"heatmap: the matrix must be {n} x {n}, one row and column per label")
    names = [_short(str(label)) for label in labels]
    longest = max((len(name) for name in names), default=1)
    cell = max(12, min(64, 520 // max(n, 1)))
    slanted = n > 3 or longest > 8
    left = 30 + 7 * longest
    bottom = 40 + (round(5 * longest) if slanted else 10)
    top, key_w = 28, 90
    width = left + n * cell + key_w
    height = top + n * cell + bottom
    peak = max((max(row) for row in matrix if len(row)), default=0)
    body = [
        f'<text x="{left + n * cell / 2:.0f}" y="16" text-anchor="middle" class="chart-title">'
        f"{escape(title)}</text>"
    ]
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            t = value / peak if peak else 0.0
            x, y = left + j * cell, top + i * cell
            tip = f"{y_label} {labels[i]}, {x_label} {labels[j]}: {value:g}"
            body.append(
                f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{ramp(t)}">'
                f"<title>{escape(tip)}</title></rect>"
            )
            if n <= ANNOTATED_CLASSES:
                color = "#fff" if peak and value > peak / 2 else "#000"
                body.append(
                    f'<text x="{x + cell / 2:.1f}" y="{y + cell / 2 + 4:.1f}" '
                    f'text-anchor="middle" fill="{color}">{value:g}</text>'
                )
    grid_bottom = top + n * cell
    for k, name in enumerate(names):
        cy = top + k * cell + cell / 2 + 4
        body.append(f'<text x="{left - 6}" y="{cy:.1f}" text-anchor="end">{escape(name)}</text>')
        cx = left + k * cell + cell / 2
        if slanted:
            body.append(
                f'<text transform="translate({cx:.1f},{grid_bottom + 12}) rotate(-45)" '
                f'text-anchor="end">{escape(name)}</text>'
            )
        else:
            body.append(
                f'<text x="{cx:.1f}" y="{grid_bottom + 14}" text-anchor="middle">'
                f"{escape(name)}</text>"
            )
    body.append(
        f'<text x="{left + n * cell / 2:.0f}" y="{height - 6}" text-anchor="middle">'
        f"{escape(x_label)}</text>"
        f'<text transform="translate(14,{top + n * cell / 2:.0f}) rotate(-90)" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )
    kx = left + n * cell + 16
    for k in range(5):
        value = peak * (4 - k) / 4
        ky = top + k * 16
        body.append(
            f'<rect x="{kx}" y="{ky}" width="12" height="12" fill="{ramp((4 - k) / 4)}" '
            f'stroke="#ccc"/><text x="{kx + 16}" y="{ky + 10}" class="legend">'
            f"{fmt_tick(value)}</text>"
        )
    return _svg(width, height, body, title)
