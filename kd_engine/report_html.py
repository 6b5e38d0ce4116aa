"""A job's report as one self-contained HTML page, ``report.html``, built from its
``metrics.json`` alone, read through its typed model :class:`kd_engine.contracts.JobMetrics`
(:func:`render_report`, :func:`write_report`).

Sections: the job (method, task, classes, data, selection, warnings); test quality of the
teacher, the student (and a chain's earlier hops, an ensemble, an ONNX int8 student) with
accuracy, macro-F1, MCC, ECE, agreement with and KL divergence to the teacher (Pearson,
Spearman, MSE and mean |student - teacher| for regression); the extra evaluation sets; the
confusion matrices (classification); learning curves and the stages; latency and size (the
PyTorch models and, when ``metrics.onnx`` exists, the ONNX exports); the definition and
source of each number. A block the metrics lack (an older job, a job without a teacher, a
regression job) is left out, never an error.

The page is the Jinja2 template ``kd_engine/templates/report.html``, rendered with
autoescaping: this module turns the metrics into plain-text tables, notes and figures, and
every value taken from the job (class names, set names, warnings...) is HTML-escaped by the
template. Plots are inline SVG (:mod:`kd_engine.report_plots`, drawn by :mod:`kd_engine.charts`,
the dashboard's charts) and the page declares a Content-Security-Policy that allows no script
and no network request.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup

from kd_engine import charts, report_plots
from kd_engine.contracts.metrics import (
    Calibration,
    JobMetrics,
    ModelFigures,
    RuntimeLatency,
    Scores,
    Spread,
    load_metrics,
)
from kd_engine.evaluation import CLASSIFICATION_METRICS, ECE_BINS, REGRESSION_METRICS
from kd_engine.names import CSP, REPORT_FILE
from kd_engine.reports import retention

TEMPLATE = "report.html"
"""The page's template in ``kd_engine/templates``."""

METRIC_NAMES = {
    "accuracy": "accuracy",
    "macro_f1": "macro-F1",
    "mcc": "MCC",
    "pearson": "Pearson r",
    "spearman": "Spearman ρ",
    "mse": "MSE",
}
DASH = "—"

STYLE = (
    """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 72em; color: #222;
       padding: 0 1em; }
h1 { font-size: 1.6em; } h2 { font-size: 1.25em; margin-top: 2em; border-bottom: 1px solid #ccc; }
table { border-collapse: collapse; margin: 0.8em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
th { background: #f3f3f3; }
svg.chart { display: block; margin: 0.8em 0; }
dt { font-weight: 600; margin-top: 0.5em; } dd { margin-left: 1.5em; }
.note { color: #555; font-size: 0.92em; }
.figs { display: flex; flex-wrap: wrap; gap: 2em; }
"""
    + charts.CHART_CSS
)


Rows = list[list[str]]
"""A table's rows: every cell plain text (the template escapes it)."""


@functools.cache
def _environment() -> jinja2.Environment:
    """The report's Jinja2 environment (autoescaped; built on first use, not at import)."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("kd_engine", "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def format_number(value: object, digits: int = 4) -> str:
    """A value as the report writes it (plain text, not yet escaped): ints with thousands
    separators; floats with ``digits`` decimals, or 3 significant digits when nonzero and
    below 10^-digits (a KL of 6.4e-05 is not 0.0001); None as a dash."""
    if value is None:
        return DASH
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and abs(value) < 10**-digits:
            return f"{value:.3g}"
        return f"{value:.{digits}f}"
    return str(value)


_fmt = format_number


def _ms(seconds: object) -> str:
    return _fmt(seconds * 1000.0, 3) if isinstance(seconds, int | float) else DASH


def _mb(size: object) -> str:
    """Bytes as MiB (2**20 bytes, the dashboard's unit too), one decimal."""
    return _fmt(size / 2**20, 1) if isinstance(size, int | float) and size > 0 else DASH


def _trained(m: JobMetrics) -> str:
    """What the job trained: ``student``, or ``fine-tuned teacher`` for a finetune job
    (``metrics.json``'s ``trained``; its numbers stay under the ``student`` keys)."""
    return "fine-tuned teacher" if m.trained == "teacher" else "student"


def _ratio(a: float | None, b: float | None) -> float | None:
    """a / b for two positive numbers, else None."""
    if a is None or b is None or a <= 0 or b <= 0:
        return None
    return float(a) / float(b)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> dict[str, Any]:
    """A table for the template: ``header`` and ``rows`` of plain-text cells."""
    return {"header": list(header), "rows": [list(r) for r in rows]}


def _figure(svg: Markup | None) -> dict[str, Markup] | None:
    """A figure for the template (its inline SVG, inserted unescaped: :mod:`kd_engine.charts`
    escapes every text in it), or None when there is none."""
    return None if svg is None else {"svg": svg}


def _dict(d: Scores | None) -> str:
    """``{"accuracy": 0.8125}`` as ``accuracy 0.8125``."""
    if not d:
        return DASH
    return ", ".join(f"{METRIC_NAMES.get(k, k)} {_fmt(v)}" for k, v in d.items())


def _metric_keys(m: JobMetrics) -> tuple[str, ...]:
    return (*REGRESSION_METRICS, "mse") if m.regression else CLASSIFICATION_METRICS


def _scores(scores: Mapping[str, float | None] | None, keys: Sequence[str]) -> list[str]:
    """The cells of ``scores`` (metric name -> value) in the order of ``keys``; dashes for
    missing metrics or a missing block."""
    return [_fmt(scores.get(k)) if scores is not None else DASH for k in keys]


def _summary(m: JobMetrics) -> dict[str, Any]:
    """The Job section: its rows (label, value) and the job's warnings."""
    rows = [
        ("method", _fmt(m.method)),
        ("task", _fmt(m.task)),
        ("classes", ", ".join(str(x) for x in m.labels) or DASH),
        ("examples", ", ".join(f"{k} {_fmt(v)}" for k, v in m.data.items()) or DASH),
        ("device", _fmt(m.device)),
        ("training seconds", _fmt(m.train_seconds, 1)),
        (
            "selected checkpoint",
            f"by dev {m.selection_metric}: epoch {m.best_epoch}, step "
            f"{m.best_step}, stage {m.best_stage or DASH}; dev "
            f"{_dict(m.best_dev)}",
        ),
    ]
    if m.teacher_cache is not None and m.teacher_cache.status:
        rows.append(("teacher cache", _fmt(m.teacher_cache.status)))
    warnings = [str(w) for w in m.warnings if w]
    return {"rows": [list(r) for r in rows], "warnings": warnings}


def _quality(m: JobMetrics) -> dict[str, Any] | None:
    """The Test split section (a table and a note), or None without test metrics."""
    if m.test is None:
        return None
    regression = m.regression
    keys = _metric_keys(m)
    extra = (
        ["mean |student − teacher|"]
        if regression
        else ["ECE", "agreement with teacher", "KL(teacher ‖ student), nats"]
    )
    header = ["model", *[METRIC_NAMES.get(k, k) for k in keys], *extra]
    calibration = m.calibration or Calibration()
    rows: list[list[str]] = []
    teacher = m.teacher_test
    if teacher is not None:
        rest = [DASH] if regression else [_fmt(calibration.teacher_ece), DASH, DASH]
        rows.append(["teacher", *_scores(teacher, keys), *rest])
    hops = m.hops
    for hop in hops[:-1] if len(hops) > 1 else []:
        name = f"{hop.name} (earlier hop, taught by {hop.teacher or 'nobody'})"
        if regression:
            rest = [_fmt(hop.teacher_mean_abs_diff)]
        else:
            rest = [DASH, _fmt(hop.teacher_agreement), DASH]
        rows.append([name, *_scores(hop.test, keys), *rest])
    if regression:
        rest = [_fmt(m.teacher_mean_abs_diff)]
    else:
        rest = [
            _fmt(calibration.student_ece),
            _fmt(m.teacher_agreement),
            _fmt(m.teacher_kl),
        ]
    rows.append([_trained(m), *_scores(m.test, keys), *rest])
    int8 = m.onnx.int8 if m.onnx is not None else None
    if int8 is not None and int8.test is not None:
        rows.append([f"{_trained(m)}, ONNX int8", *_scores(int8.test, keys), *[DASH] * len(extra)])
    if m.ensemble is not None:
        rows.append(["ensemble of the hops", *_scores(m.ensemble.test, keys)])
        rows[-1] += [DASH] * len(extra)
    if teacher is not None:
        kept = retention(m.test, teacher)
        rows.append(["student / teacher", *[_fmt(kept.get(k)) for k in keys], *[DASH] * len(extra)])
    note = ""
    if len(hops) > 1 and not regression:
        note = "An earlier hop's agreement is with the model that taught it."
    return {**_table(header, rows), "note": note}


def _eval_sets(m: JobMetrics) -> dict[str, Any] | None:
    """The Evaluation sets table, or None without extra sets."""
    if not m.eval_sets:
        return None
    keys = _metric_keys(m)
    rows: list[list[str]] = []
    for name, entry in m.eval_sets.items():
        examples = _fmt(entry.examples)
        if entry.teacher is not None:
            rows.append([name, examples, "teacher", *_scores(entry.teacher, keys)])
            examples = ""
        rows.append([name, examples, _trained(m), *_scores(entry.student, keys)])
        if entry.retention is not None:
            rows.append([name, "", "student / teacher", *_scores(entry.retention, keys)])
    header = ["set", "examples", "model", *[METRIC_NAMES.get(k, k) for k in keys]]
    return _table(header, rows)


def _confusion(m: JobMetrics) -> list[dict[str, Any]]:
    """Each confusion matrix (teacher, student): its name, figure and table; empty for a
    regression job or without matrices."""
    block = m.confusion_matrix
    if m.regression or block is None:
        return []
    labels = block.labels
    out: list[dict[str, Any]] = []
    for who, matrix in (("teacher", block.teacher), ("student", block.student)):
        if matrix is None or len(matrix) != len(labels):
            continue
        name = _trained(m) if who == "student" else who
        title = f"{name}: test split"
        figure = _figure(report_plots.confusion_heatmap(matrix, labels, title))
        rows = [[label, *[_fmt(c) for c in row]] for label, row in zip(labels, matrix, strict=True)]
        out.append({"name": name, "figure": figure, **_table(["true \\ predicted", *labels], rows)})
    return out


def _curves(m: JobMetrics) -> dict[str, Any]:
    """The Learning curves section: the figure (None without dev evaluations) and the stages
    table (None without stages)."""
    out: dict[str, Any] = {"figure": None, "stages": None}
    if m.epochs:
        out["figure"] = _figure(report_plots.learning_curves(m.epochs))
    if m.stages:
        many = any(s.hop is not None for s in m.stages)
        header = [
            *(["hop"] if many else []),
            "stage",
            "loss",
            "steps",
            "epochs",
            "learning rate",
            "schedule",
            "trains",
            "best dev",
        ]
        rows = [
            [
                *([_fmt(s.hop)] if many else []),
                _fmt(s.name),
                _fmt(s.loss),
                _fmt(s.steps),
                _fmt(s.epochs),
                f"{s.learning_rate:.3g}" if s.learning_rate is not None else DASH,
                _fmt(s.schedule),
                ", ".join(_trained(m) if t == "student" else t for t in s.trains) or DASH,
                _dict(s.best_dev),
            ]
            for s in m.stages
        ]
        out["stages"] = _table(header, rows)
    return out


def _ort(value: RuntimeLatency | float | None) -> float | None:
    """An ONNX latency: the onnxruntime one of a ``{"pytorch", "onnxruntime"}`` pair."""
    return value.onnxruntime if isinstance(value, RuntimeLatency) else value


def _model_latency(figures: ModelFigures | None, batch: str) -> float | None:
    """``figures``' median seconds per example at ``batch`` (``batch1``, ``batch32``)."""
    if figures is None:
        return None
    return figures.latency_s_batch1 if batch == "batch1" else figures.latency_s_batch32


def _timed(m: JobMetrics, who: str, batch: str) -> Spread | None:
    """The interleaved timing of ``who`` (``student``, ``teacher``, ``speedup``) at ``batch``
    (``batch1``, ``batch32``) from ``metrics.latency``, or None (an older job)."""
    return m.latency.figure(who, batch) if m.latency is not None else None


def _flag(figure: Spread | None, before: str = "") -> str:
    """`` (spread 12%)``, or `` (spread 40%, unreliable)`` above the limit (``before`` first
    inside the brackets); empty without a spread."""
    if figure is None or figure.spread is None:
        return f" ({before})" if before else ""
    unreliable = ", unreliable" if figure.reliable is False else ""
    lead = f"{before}, " if before else ""
    return f" ({lead}spread {figure.spread:.0%}{unreliable})"


def _latency_cell(m: JobMetrics, who: str, d: ModelFigures, batch: str) -> str:
    return _ms(_model_latency(d, batch)) + _flag(_timed(m, who, batch))


def _speedup(m: JobMetrics, batch: str) -> str | None:
    """``faster at batch N`` of the comparison note: the median of the per-round speed-ups
    with their range and spread (flagged when unreliable), else the ratio of the medians."""
    figure = _timed(m, "speedup", batch)
    n = batch.removeprefix("batch")
    if figure is None or figure.median is None:
        r = _ratio(_model_latency(m.teacher, batch), _model_latency(m.student, batch))
        return None if r is None else f"faster at batch {n} {_fmt(r, 2)}×"
    rounds = f"rounds {_fmt(figure.min, 2)}–{_fmt(figure.max, 2)}×"
    return f"faster at batch {n} {_fmt(figure.median, 2)}×{_flag(figure, rounds)}"


def _speed_size(m: JobMetrics) -> dict[str, Any] | None:
    """The Latency and size section (a table and notes), or None without any model's size."""
    rows: list[list[str]] = []
    # (row name, key of its timing in metrics.latency, figures): a finetune job's model is
    # named "fine-tuned teacher" but timed, like every trained model, as "student"
    models = [("teacher", "teacher", m.teacher), (_trained(m), "student", m.student)]
    for name, who, d in models:
        if d is not None:
            rows.append(
                [
                    name,
                    "PyTorch",
                    _fmt(d.parameters),
                    _mb(d.bytes),
                    _latency_cell(m, who, d, "batch1"),
                    _latency_cell(m, who, d, "batch32"),
                ]
            )
    onnx = m.onnx
    notes: list[str] = []
    if onnx is not None:
        rows.append(
            [
                f"{_trained(m)}, ONNX fp32",
                "onnxruntime",
                DASH,
                _mb(onnx.bytes),
                _ms(_ort(onnx.latency_s_batch1)),
                _ms(_ort(onnx.latency_s_batch32)),
            ]
        )
        notes.append(
            f"ONNX export {onnx.file or DASH} (opset {onnx.opset or DASH}): max "
            f"|logit difference| to PyTorch {_fmt(onnx.max_abs_diff_logits, 6)}, "
            f"prediction agreement {_fmt(onnx.prediction_agreement)}."
        )
        int8 = onnx.int8
        if int8 is not None:
            rows.append(
                [
                    f"{_trained(m)}, ONNX int8",
                    "onnxruntime",
                    DASH,
                    _mb(int8.bytes),
                    _ms(int8.latency_s_batch1),
                    _ms(int8.latency_s_batch32),
                ]
            )
            notes.append(
                f"int8 {int8.file or DASH}: prediction agreement with the fp32 export "
                f"{_fmt(int8.agreement_with_fp32)}."
            )
    if not rows:
        return None
    teacher, student = m.teacher, m.student
    if teacher is not None and student is not None:
        compared = [
            f"{what} {_fmt(r, 2)}×"
            for what, r in (
                ("fewer parameters", _ratio(teacher.parameters, student.parameters)),
                ("smaller", _ratio(teacher.bytes, student.bytes)),
            )
            if r is not None
        ]
        compared += [f for f in (_speedup(m, "batch1"), _speedup(m, "batch32")) if f]
        if compared:
            notes.insert(0, "Student vs teacher: " + ", ".join(compared) + ".")
    notes.append(f"Latency measured on {m.device or DASH}, milliseconds per example.")
    if m.latency is not None:
        limit = m.latency.spread_limit
        limit_text = f"{limit:.0%}" if limit is not None else DASH
        notes.append(
            "Teacher and student were timed interleaved, in rounds on the same batches; the "
            "spread is the interquartile range of the rounds over their median. A figure whose "
            f"spread is above {limit_text} is unreliable: the machine's load changed while it "
            "was timed (time the models again on an idle machine before relying on it)."
        )
    header = [
        "model",
        "runtime",
        "parameters",
        "size (MiB)",
        "latency batch 1 (ms)",
        "latency batch 32 (ms)",
    ]
    return {**_table(header, rows), "notes": notes}


DEFINITIONS_CLASSIFICATION = [
    ("accuracy", "Fraction of test examples whose argmax class is the label."),
    (
        "macro-F1",
        "Unweighted mean over the classes of each class's F1 score (a class never predicted "
        "counts 0); scikit-learn f1_score(average='macro').",
    ),
    (
        "MCC",
        "Matthews correlation coefficient of the predicted and true classes (Matthews 1975; "
        "the multi-class form of Gorodkin 2004), from -1 to 1; scikit-learn matthews_corrcoef.",
    ),
    (
        "ECE",
        f"Expected calibration error (Guo et al. 2017, 'On Calibration of Modern Neural "
        f"Networks', eq. 3): the confidence of an example is its largest softmax probability; "
        f"the examples are put in {ECE_BINS} equal-width confidence bins ((m-1)/{ECE_BINS}, "
        f"m/{ECE_BINS}], and ECE = Σ_m |B_m|/n · |accuracy(B_m) − mean confidence(B_m)|. "
        "0 is perfectly calibrated.",
    ),
    (
        "agreement with teacher",
        "Fraction of test examples on which the student predicts the teacher's class.",
    ),
    (
        "KL(teacher ‖ student)",
        "Mean over the test examples of Σ_c p_t(c) (log p_t(c) − log p_s(c)), with p the "
        "softmax of the logits at temperature 1, in nats: how far the student's distribution "
        "is from the teacher's soft targets (Hinton et al. 2015). 0 when they are equal.",
    ),
    (
        "confusion matrix",
        "Counts of test examples by true class (row) and predicted class (column); "
        "scikit-learn confusion_matrix.",
    ),
]
DEFINITIONS_REGRESSION = [
    ("Pearson r", "Linear correlation of prediction and target (GLUE STS-B; scipy.stats)."),
    ("Spearman ρ", "Rank correlation of prediction and target (GLUE STS-B; scipy.stats)."),
    ("MSE", "Mean squared error, squared label units."),
    ("mean |student − teacher|", "Mean absolute difference of the two outputs, label units."),
]
DEFINITIONS_COMMON = [
    (
        "student / teacher",
        "The student's score divided by the teacher's, for each higher-is-better metric "
        "(blank where the teacher's score is <= 0).",
    ),
    (
        "latency",
        "Median wall-clock time per example of a forward pass over batches of real test "
        "examples, each padded to its longest sequence, on the job's device. Teacher and "
        "student are timed interleaved: 5 rounds, each running both models one after the other "
        "on the same batches (batch 1: 4 batches a round; batch 32: 1), after untimed warm-up "
        "batches; each figure is the median of the rounds, its spread their interquartile "
        "range over that median, and the speed-up the median of the rounds' teacher/student "
        "ratios.",
    ),
    (
        "size",
        "Bytes of the weights file(s) (safetensors; ONNX files for the exports); "
        "1 MiB = 2²⁰ bytes.",
    ),
]


def _definitions(m: JobMetrics) -> list[tuple[str, str]]:
    """The (term, definition) pairs of the job's task, then the common ones."""
    items = DEFINITIONS_REGRESSION if m.regression else DEFINITIONS_CLASSIFICATION
    return [*items, *DEFINITIONS_COMMON]


def render_report(metrics: JobMetrics | Mapping[str, Any]) -> str:
    """The report page of a job from its ``metrics.json`` (a :class:`JobMetrics`, or the dict,
    read once with :func:`kd_engine.contracts.load_metrics`; see the module docstring).

    Raises:
        pydantic.ValidationError: a dict's key holds a value of the wrong type (the error
        names it); ValueError: a confusion matrix is not C x C
        (:func:`kd_engine.charts.heatmap`); jinja2.TemplateError: the template is missing or
        broken (the caller decides whether a report matters).
    """
    m = load_metrics(metrics)
    title = f"Distillery report: {m.method or 'job'} ({m.task or ''})"
    return (
        _environment()
        .get_template(TEMPLATE)
        .render(
            title=title,
            csp=CSP,
            style=STYLE,
            job=_summary(m),
            quality=_quality(m),
            eval_sets=_eval_sets(m),
            confusion=_confusion(m),
            curves=_curves(m),
            speed=_speed_size(m),
            definitions=_definitions(m),
        )
    )


def write_report(metrics: JobMetrics | Mapping[str, Any], out_dir: Path) -> Path:
    """Render :func:`render_report` and write it as ``out_dir/report.html`` (UTF-8, through a
    temporary file renamed into place); returns the path. Nothing is left behind if rendering
    or writing fails.

    Raises:
        OSError: the file could not be written; whatever :func:`render_report` raises.
    """
    page = render_report(metrics)
    path = out_dir / REPORT_FILE
    partial = out_dir / f".{REPORT_FILE}.partial"
    try:
        partial.write_text(page, encoding="utf-8")
        partial.replace(path)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink(missing_ok=True)
        raise
    return path
