"""What the dashboard shows, read from a job's stored state: its learning curves, the teacher
vs student table and the compare page's points. Plain data (no HTTP, no templates).

Sources: ``jobs.metrics``, read as :class:`kd_engine.contracts.JobMetrics` (``epochs``: one
record per dev evaluation, written while the job runs; once it succeeded, the whole
``metrics.json``: ``test``, ``teacher_test``, ``student`` and ``teacher`` sizes and latencies,
``stages``) and the job's ``train_log.jsonl`` artifact (its ``step`` records: the losses every
``progress_every_steps`` steps), see :mod:`kd_engine.run`.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from markupsafe import Markup
from pydantic import ValidationError

from core.db import Job
from core.settings import Settings
from core.storage import ObjectNotFound, StorageError, artifact_storage, join_key
from core.upload_names import label as upload_label
from kd_engine.charts import PALETTE, Point, Series, line_chart, pareto_front, scatter_chart
from kd_engine.contracts import (
    EvaluationRecord,
    JobMetrics,
    ModelFigures,
    StageSummary,
    load_metrics,
)
from kd_engine.names import CLASSIFICATION_METRICS, LOG_FILE, REGRESSION_METRICS

MAIN_METRICS = ("accuracy", "pearson", "spearman", "macro_f1", "mcc")
"""A job's main metric: its selection metric when higher is better, else the first of these
its test metrics have."""
MAX_CURVE_POINTS = 2000
"""At most this many points per train-loss curve (a longer log is thinned evenly)."""
MAX_LOG_BYTES = 32 * 1024**2
"""A train log larger than this is read up to here only."""

log = logging.getLogger(__name__)


def metrics_of(job: Job) -> JobMetrics:
    """The job's stored metrics as :class:`~kd_engine.contracts.JobMetrics` (empty when it has
    none). Stored metrics that do not fit the model (never written by the engine) are logged
    and shown as empty, so that one bad row never breaks a page."""
    try:
        return load_metrics(job.metrics)
    except ValidationError as e:
        log.warning("job %s: its stored metrics do not fit metrics.json's model: %s", job.id, e)
        return JobMetrics()


def main_metric(metrics: JobMetrics) -> str | None:
    """The metric a job is ranked by: ``selection_metric`` when it is a higher-is-better test
    metric, else the first of :data:`MAIN_METRICS` in ``test``; None without test metrics."""
    test = metrics.test or {}
    chosen = metrics.selection_metric
    if chosen in test and chosen in (*CLASSIFICATION_METRICS, *REGRESSION_METRICS):
        return chosen
    return next((m for m in MAIN_METRICS if m in test), None)


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def fmt_value(value: Any, digits: int = 4) -> str:
    """A metric for a table: 4 significant digits, integers as they are, '—' when missing."""
    if isinstance(value, bool) or value is None:
        return "—" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if math.isfinite(value) else "—"
    return str(value)


def fmt_bytes(n: Any) -> str:
    """Bytes as B, KiB, MiB or GiB; '—' when missing."""
    if not isinstance(n, int | float):
        return "—"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def fmt_ms(seconds: Any) -> str:
    """Seconds as milliseconds with 3 significant digits; '—' when missing."""
    value = _num(seconds)
    return "—" if value is None else f"{value * 1000:.3g} ms"


@dataclass(frozen=True)
class TableRow:
    """One row of the teacher-vs-student table: what, the teacher's and the student's value
    (formatted) and student / teacher when both are numbers."""

    label: str
    teacher: str
    student: str
    ratio: str = ""


def _ratio(student: Any, teacher: Any) -> str:
    s, t = _num(student), _num(teacher)
    return f"{s / t:.3g}x" if s is not None and t else ""


def comparison_table(metrics: JobMetrics) -> list[TableRow]:
    """Teacher vs student from a succeeded job's metrics: each test metric, parameters, weights
    size, CPU/GPU latency per example at batch 1 and 32, and teacher agreement. Teacher cells
    are '—' where the job did not use a teacher (``finetune``)."""
    test = metrics.test or {}
    teacher_test = metrics.teacher_test or {}
    student = metrics.student or ModelFigures()
    teacher = metrics.teacher or ModelFigures()
    rows = [
        TableRow(
            f"test {name}",
            fmt_value(teacher_test.get(name)),
            fmt_value(value),
            _ratio(value, teacher_test.get(name)),
        )
        for name, value in test.items()
    ]
    rows.append(
        TableRow(
            "parameters",
            fmt_value(teacher.parameters),
            fmt_value(student.parameters),
            _ratio(student.parameters, teacher.parameters),
        )
    )
    rows.append(TableRow("weights size", fmt_bytes(teacher.bytes), fmt_bytes(student.bytes)))
    for batch, t, s in (
        (1, teacher.latency_s_batch1, student.latency_s_batch1),
        (32, teacher.latency_s_batch32, student.latency_s_batch32),
    ):
        rows.append(
            TableRow(f"latency per example, batch {batch}", fmt_ms(t), fmt_ms(s), _ratio(s, t))
        )
    for value, label in (
        (metrics.teacher_agreement, "agreement with the teacher"),
        (metrics.teacher_mean_abs_diff, "mean |student - teacher|"),
    ):
        if value is not None:
            rows.append(TableRow(label, "", fmt_value(value)))
    return rows


def read_train_log(settings: Settings, job_id: str, names: Iterable[str]) -> list[dict[str, Any]]:
    """The records of the job's ``train_log.jsonl`` artifact ([] when it has none, or it is
    missing from the store); at most :data:`MAX_LOG_BYTES` are read, bad lines skipped."""
    if LOG_FILE not in set(names):
        return []
    try:
        with artifact_storage(settings).open(join_key(job_id, LOG_FILE)) as f:
            blob = f.read(MAX_LOG_BYTES)
    except (ObjectNotFound, StorageError, OSError):
        return []
    out: list[dict[str, Any]] = []
    for line in blob.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            out.append(record)
    return out


def _thin(
    points: list[tuple[float, float]], limit: int = MAX_CURVE_POINTS
) -> list[tuple[float, float]]:
    if len(points) <= limit:
        return points
    stride = math.ceil(len(points) / limit)
    return points[::stride] + ([points[-1]] if (len(points) - 1) % stride else [])


def _by_stage(records: Iterable[Any], y_of: Any, markers: bool = False) -> list[Series]:
    """One series per stage (and hop) of ``records``: train-log dicts or
    :class:`~kd_engine.contracts.EvaluationRecord` (read through :func:`_field`)."""
    series: dict[str, Series] = {}
    for r in records:
        x, y = _num(_field(r, "step")), _num(y_of(r))
        if x is None or y is None:
            continue
        name = str(_field(r, "stage") or "training")
        hop = _field(r, "hop")
        if hop:
            name = f"{hop}: {name}" if not name.startswith("hop ") else name
        s = series.setdefault(
            name, Series(name, color=PALETTE[len(series) % len(PALETTE)], markers=markers)
        )
        s.points.append((x, y))
    for s in series.values():
        s.points = _thin(s.points)
    return list(series.values())


def _field(record: Any, name: str) -> Any:
    """``record[name]`` of a train-log dict, or the attribute of a typed record."""
    return record.get(name) if isinstance(record, dict) else getattr(record, name, None)


@dataclass
class Curves:
    """A job's learning curves, drawn, and the per-evaluation and per-stage tables."""

    train_loss: Markup
    dev: Markup
    train_loss_source: str
    evaluations: list[EvaluationRecord] = field(default_factory=list)
    dev_metrics: list[str] = field(default_factory=list)
    stages: list[StageSummary] = field(default_factory=list)


def curves(job: Job, log_records: Sequence[dict[str, Any]]) -> Curves:
    """The learning curves of ``job``: the train loss against the optimiser step, one line per
    stage (from the train log's ``step`` records once the job has succeeded; before that, the
    mean train loss of each dev evaluation), and every dev metric against the step (one line
    per metric, a marker per evaluation)."""
    metrics = metrics_of(job)
    evaluations = metrics.epochs
    steps = [r for r in log_records if r.get("event") == "step" and "loss" in r]
    if steps:
        loss = _by_stage(steps, lambda r: r.get("loss"))
        source = (
            f"{LOG_FILE}: at each reported step, the mean train loss since its epoch began "
            "(so each curve restarts at an epoch boundary)"
        )
    else:
        loss = _by_stage(evaluations, lambda r: r.train_loss, markers=True)
        source = "the mean train loss at each dev evaluation"
    names: list[str] = []
    for e in evaluations:
        for k in e.dev:
            if k not in names:
                names.append(k)
    dev_series = []
    for i, name in enumerate(names):
        pts = [
            (float(e.step), float(e.dev[name]))
            for e in evaluations
            if e.step is not None and _num(e.dev.get(name)) is not None
        ]
        dev_series.append(Series(f"dev {name}", pts, PALETTE[i % len(PALETTE)], markers=True))
    return Curves(
        train_loss=line_chart(loss, title="train loss", x_label="optimiser step", y_label="loss"),
        dev=line_chart(dev_series, title="dev metrics", x_label="optimiser step", y_label="metric"),
        train_loss_source=source,
        evaluations=evaluations,
        dev_metrics=names,
        stages=metrics.stages,
    )


@dataclass(frozen=True)
class CompareRow:
    """One succeeded job on the compare page."""

    job_id: str
    method: str
    dataset: str
    metric: str
    value: float
    latency_s: float | None
    parameters: Any
    bytes: Any
    teacher: str
    front: bool = False
    reliable: bool = True
    """False when the latency's spread over its timing rounds was too wide (metrics.json's
    ``latency.batch1.student.reliable``): such a point is never on the Pareto front."""


@dataclass
class CompareGroup:
    """The jobs of one dataset ranked by one metric: their plot and rows (the Pareto front's
    first)."""

    dataset: str
    metric: str
    rows: list[CompareRow]
    chart: Markup


def dataset_ref(spec: dict[str, Any]) -> str:
    """The dataset a stored job spec names (``dataset.source``), ``?`` if none."""
    ds = spec.get("dataset") or {}
    return str(ds.get("source") or ds.get("train") or "?") if isinstance(ds, dict) else "?"


def _latency_reliable(metrics: JobMetrics) -> bool:
    """Whether the student's batch-1 latency was timed reliably (metrics.json's
    ``latency.batch1.student.reliable``; True for a job timed before the flag existed)."""
    figure = metrics.latency.figure("student", "batch1") if metrics.latency is not None else None
    return figure is None or figure.reliable is not False


def compare_groups(
    jobs: Iterable[Job], filenames: dict[str, str] | None = None
) -> list[CompareGroup]:
    """The students of ``jobs`` (succeeded ones with test metrics) grouped by dataset and main
    metric, each group with its scatter plot (main test metric against latency per example at
    batch 1) and its Pareto front marked (no other student both faster and better; a student
    whose latency is unreliable is left off it). An upload (dataset or teacher) is named by its
    filename beside its id (``filenames``: ``{id: filename}``)."""
    names = filenames or {}
    groups: dict[tuple[str, str], list[CompareRow]] = {}
    for job in jobs:
        metrics = metrics_of(job)
        metric = main_metric(metrics)
        value = _num((metrics.test or {}).get(metric)) if metric else None
        if metric is None or value is None:
            continue
        student = metrics.student or ModelFigures()
        row = CompareRow(
            job_id=job.id,
            method=job.method,
            dataset=upload_label(dataset_ref(job.spec), names),
            metric=metric,
            value=value,
            latency_s=_num(student.latency_s_batch1),
            parameters=student.parameters,
            bytes=student.bytes,
            teacher=upload_label(str(job.spec.get("teacher", "")), names),
            reliable=_latency_reliable(metrics),
        )
        groups.setdefault((row.dataset, metric), []).append(row)
    out = []
    for (dataset, metric), rows in sorted(groups.items()):
        # An unreliable latency (too wide a spread) is plotted but never on the front.
        xy = [
            (r.latency_s if r.latency_s is not None and r.reliable else math.nan, r.value)
            for r in rows
        ]
        on_front = set(pareto_front(xy))
        rows = [CompareRow(**{**r.__dict__, "front": i in on_front}) for i, r in enumerate(rows)]
        rows.sort(key=lambda r: (not r.front, r.latency_s if r.latency_s is not None else math.inf))
        chart = scatter_chart(
            [
                Point(
                    r.latency_s * 1000,
                    r.value,
                    f"{r.method} {r.job_id[:8]}",
                    f"/ui/jobs/{r.job_id}",
                    r.front,
                )
                for r in rows
                if r.latency_s is not None
            ],
            title=f"{dataset}: test {metric} against latency (batch 1)",
            x_label="latency per example at batch 1 (ms)",
            y_label=f"test {metric}",
        )
        out.append(CompareGroup(dataset, metric, rows, chart))
    return out
