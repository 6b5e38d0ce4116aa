"""The dashboard's pure parts: the Pareto front, chart ticks and escaping, the main metric, the
teacher-vs-student table and the compare groups (kd_engine/charts.py, api/ui/views.py)."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest

from api.ui.routes import parse_spec_text
from api.ui.views import compare_groups, comparison_table, curves, main_metric, metrics_of
from core.db import Job
from kd_engine.charts import (
    Point,
    Series,
    heatmap,
    line_chart,
    nice_ticks,
    pareto_front,
    ramp,
    scatter_chart,
)
from kd_engine.contracts import load_metrics
from kd_engine.errors import SpecError


def test_pareto_front_keeps_points_nothing_beats() -> None:
    # (latency, accuracy): 1 is beaten by 0 (faster and better); 3 ties 2's accuracy slower
    pts = [(1.0, 0.80), (2.0, 0.70), (3.0, 0.90), (4.0, 0.90), (0.5, 0.60), (5.0, 0.95)]
    assert pareto_front(pts) == [4, 0, 2, 5]
    assert pareto_front([]) == []
    assert pareto_front([(math.nan, 0.9), (1.0, 0.5)]) == [1]
    # equal latency: only the better one
    assert pareto_front([(1.0, 0.5), (1.0, 0.7)]) == [1]


def test_nice_ticks_cover_the_range_with_round_steps() -> None:
    ticks = nice_ticks(0.13, 0.87)
    assert ticks[0] <= 0.13 and ticks[-1] >= 0.87
    steps = {round(b - a, 9) for a, b in itertools.pairwise(ticks)}
    assert len(steps) == 1 and steps.pop() in (0.1, 0.2, 0.25, 0.5)
    assert nice_ticks(5.0, 5.0)[0] <= 5.0 <= nice_ticks(5.0, 5.0)[-1]
    assert nice_ticks(math.nan, 1.0) == []


def test_charts_escape_text_and_say_when_empty() -> None:
    svg = line_chart(
        [Series("<script>x</script>", [(0, 1.0), (1, 0.5), (2, math.inf)])],
        title="a & b",
        x_label="step",
        y_label="loss",
    )
    assert "<script>" not in svg and "&lt;script&gt;" in svg and "a &amp; b" in svg
    assert svg.count("<polyline") == 1
    assert "no data yet" in line_chart([], title="t", x_label="x", y_label="y")
    plot = scatter_chart(
        [Point(1.0, 0.8, "a", "/ui/jobs/a", True), Point(2.0, 0.7, "b", "/ui/jobs/b")],
        title="t",
        x_label="ms",
        y_label="acc",
    )
    assert plot.count('class="point front"') == 1 and plot.count('class="point"') == 1
    assert 'href="/ui/jobs/a"' in plot


def test_main_metric_prefers_the_selection_metric() -> None:
    assert main_metric(load_metrics({"test": {"accuracy": 0.8, "macro_f1": 0.7}})) == "accuracy"
    assert (
        main_metric(
            load_metrics({"test": {"accuracy": 0.8, "mcc": 0.2}, "selection_metric": "mcc"})
        )
        == "mcc"
    )
    assert main_metric(
        load_metrics({"test": {"pearson": 0.8, "mse": 0.1}, "selection_metric": "mse"})
    ) == ("pearson")
    assert main_metric(load_metrics({})) is None


METRICS: dict[str, Any] = {
    "test": {"accuracy": 0.8, "macro_f1": 0.75},
    "teacher_test": {"accuracy": 0.9, "macro_f1": 0.88},
    "student": {
        "parameters": 1000,
        "latency_s_batch1": 0.002,
        "latency_s_batch32": 0.0005,
        "bytes": 4096,
    },
    "teacher": {"parameters": 4000, "latency_s_batch1": 0.008, "latency_s_batch32": 0.001},
    "teacher_agreement": 0.93,
    "epochs": [
        {
            "stage": "kd",
            "epoch": 1,
            "step": 5,
            "at": "epoch_end",
            "train_loss": 0.9,
            "dev": {"accuracy": 0.7},
        },
        {
            "stage": "kd",
            "epoch": 2,
            "step": 10,
            "at": "epoch_end",
            "train_loss": 0.6,
            "dev": {"accuracy": 0.75},
        },
    ],
    "stages": [{"name": "kd", "index": 1, "steps": 10, "epochs": 2, "best_dev": {}}],
}


def test_comparison_table_rows_and_ratios() -> None:
    rows = {r.label: r for r in comparison_table(load_metrics(METRICS))}
    assert rows["test accuracy"].teacher == "0.9" and rows["test accuracy"].student == "0.8"
    assert rows["parameters"].ratio == "0.25x"
    assert rows["latency per example, batch 1"].student == "2 ms"
    assert rows["latency per example, batch 1"].ratio == "0.25x"
    assert rows["weights size"].student == "4.0 KiB" and rows["weights size"].teacher == "—"
    assert rows["agreement with the teacher"].student == "0.93"
    # a finetune job: no teacher columns
    alone = {
        r.label: r
        for r in comparison_table(load_metrics({"test": {"accuracy": 0.5}, "student": {}}))
    }
    assert alone["test accuracy"].teacher == "—" and alone["test accuracy"].ratio == ""


def _job(job_id: str, metrics: dict[str, Any], source: str = "builtin:sst2") -> Job:
    return Job(
        id=job_id,
        method="vanilla_kd",
        status="succeeded",
        spec={"teacher": "job:t", "dataset": {"source": source}},
        metrics=metrics,
    )


def test_compare_groups_by_dataset_and_marks_the_front() -> None:
    def m(acc: float, lat: float) -> dict[str, Any]:
        return {"test": {"accuracy": acc}, "student": {"latency_s_batch1": lat}}

    jobs = [
        _job("a", m(0.80, 0.001)),
        _job("b", m(0.70, 0.002)),  # slower and worse than a
        _job("c", m(0.90, 0.004)),
        _job("d", m(0.5, 0.001), source="builtin:imdb"),
        _job("e", {"test": {}}),  # no test metric: left out
    ]
    groups = compare_groups(jobs)
    assert [(g.dataset, g.metric) for g in groups] == [
        ("builtin:imdb", "accuracy"),
        ("builtin:sst2", "accuracy"),
    ]
    sst2 = groups[1]
    assert [(r.job_id, r.front) for r in sst2.rows] == [("a", True), ("c", True), ("b", False)]
    assert sst2.chart.count('class="point front"') == 2


def test_an_unreliable_latency_is_plotted_but_left_off_the_front() -> None:
    """Issue 24: a collapsed student timed "fast" under load sat on the Pareto front."""

    def m(acc: float, lat: float, reliable: bool | None) -> dict[str, Any]:
        out: dict[str, Any] = {"test": {"accuracy": acc}, "student": {"latency_s_batch1": lat}}
        if reliable is not None:
            figure = {"median": lat, "spread": 0.05 if reliable else 0.6, "reliable": reliable}
            out["latency"] = {"batch1": {"student": figure}}
        return out

    jobs = [
        _job("noisy", m(0.457, 0.0005, False)),  # fastest, but its timing is noise
        _job("a", m(0.80, 0.001, True)),
        _job("old", m(0.70, 0.002, None)),  # timed before the flag: trusted as before
        _job("c", m(0.90, 0.004, True)),
    ]
    (group,) = compare_groups(jobs)
    fronts = {r.job_id: r.front for r in group.rows}
    assert fronts == {"a": True, "c": True, "noisy": False, "old": False}
    assert {r.job_id: r.reliable for r in group.rows}["noisy"] is False
    assert group.chart.count('class="point front"') == 2
    assert "vanilla_kd noisy" in group.chart  # still plotted


def test_curves_from_the_stored_evaluations_and_the_train_log() -> None:
    job = _job("x", METRICS)
    before = curves(job, [])
    assert "the mean train loss" in before.train_loss_source
    assert before.dev_metrics == ["accuracy"] and len(before.evaluations) == 2
    log = [{"event": "step", "stage": "kd", "step": s, "loss": 1.0 / s} for s in range(1, 11)]
    after = curves(job, [*log, {"event": "stage", "stage": "kd"}])
    assert "train_log.jsonl" in after.train_loss_source
    assert after.train_loss.count("<polyline") == 1 and "<circle" not in after.train_loss


def test_stored_metrics_that_break_the_model_show_as_empty_not_an_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    bad = _job("bad", {"test": {"accuracy": "high"}})
    assert metrics_of(bad).to_json() == {}
    assert "bad: its stored metrics do not fit" in caplog.text
    assert compare_groups([bad, _job("ok", {"test": {"accuracy": 0.5}})])[0].rows[0].job_id == "ok"
    assert metrics_of(_job("ok", METRICS)).teacher_agreement == 0.93


def test_a_pasted_spec_nested_too_deeply_is_a_422_naming_the_spec() -> None:
    """json.loads and yaml.safe_load raised RecursionError on it (a 500 page)."""
    for text in ("[" * 100_000 + "]" * 100_000, "a: " + "[" * 100_000):
        with pytest.raises(SpecError, match="too deeply") as e:
            parse_spec_text(text)
        assert e.value.field == "spec"


def test_heatmap_colours_cells_by_value_and_refuses_a_ragged_matrix() -> None:
    assert ramp(0.0) == "#f7fbff" and ramp(1.0) == "#08306b" and ramp(2.0) == "#08306b"
    assert ramp(0.5) == "#6baed6" and ramp(math.nan) == "#f7fbff"
    svg = heatmap([[0, 5], [10, 0]], ["a<b", "c"], title="t & u")
    assert svg.count("<rect") == 4 + 5  # the cells and the colour key
    assert 'fill="#08306b"><title>true c, predicted a&lt;b: 10</title>' in svg
    assert 'fill="#f7fbff"><title>true a&lt;b, predicted a&lt;b: 0</title>' in svg
    assert 'fill="#fff">10</text>' in svg and 'fill="#000">5</text>' in svg  # 5 is not dark
    assert "t &amp; u" in svg and "a<b" not in svg
    with pytest.raises(ValueError, match="2 x 2"):
        heatmap([[1, 2], [3]], ["a", "b"], title="t")
