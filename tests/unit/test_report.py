"""The job report: ECE, KL(teacher || student) and confusion matrices against hand-computed
values, and report.html built from realistic metrics (sections, inline SVG charts, escaping,
regression, missing blocks, a report that cannot be written)."""

from __future__ import annotations

import copy
import json
import math
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from xml.etree import ElementTree

import pydantic
import pytest
import torch

from kd_engine.contracts import EvaluationRecord, JobMetrics, load_metrics
from kd_engine.evaluation import confusion, expected_calibration_error, kl_teacher_student
from kd_engine.report_html import REPORT_FILE, format_number, render_report, write_report
from kd_engine.report_plots import curve_positions, stage_marks
from kd_engine.reports import split_diagnostics
from kd_engine.run import _write_report

EVIL = "<script>alert('x')</script>"


def from_probs(rows: list[list[float]]) -> torch.Tensor:
    """Logits whose softmax is ``rows`` (log probabilities, shifted: softmax ignores it)."""
    return torch.tensor(rows, dtype=torch.float64).log() + 3.0


# -- ECE --------------------------------------------------------------------------------------


def test_ece_one_example_per_bin_by_hand() -> None:
    # Confidences 0.9 (right), 0.75 (wrong), 0.7 (right), 0.62 (wrong): bins 14, 12, 11, 10 of
    # 15 (none on a bin edge); each bin's gap is |acc - conf| of its one example.
    logits = from_probs([[0.9, 0.1], [0.75, 0.25], [0.3, 0.7], [0.62, 0.38]])
    labels = [0, 1, 1, 1]
    expected = (abs(1 - 0.9) + abs(0 - 0.75) + abs(1 - 0.7) + abs(0 - 0.62)) / 4
    assert expected == pytest.approx(0.4425)
    assert expected_calibration_error(logits, labels) == pytest.approx(expected)


def test_ece_averages_within_a_bin_before_the_gap() -> None:
    # 0.90 (right) and 0.92 (wrong) share bin (14/15 - 1/15, 14/15]: accuracy 1/2, mean
    # confidence 0.91, gap 0.41, weight 2/3; 0.55 (right) alone in (8/15, 9/15]: gap 0.45.
    logits = from_probs([[0.9, 0.1], [0.08, 0.92], [0.55, 0.45]])
    labels = [0, 0, 0]
    expected = 2 / 3 * abs(0.5 - 0.91) + 1 / 3 * abs(1 - 0.55)
    assert expected == pytest.approx(0.4233333)
    assert expected_calibration_error(logits, labels) == pytest.approx(expected)
    # Per-example gaps would give (0.1 + 0.92 + 0.45) / 3 = 0.49: the bins matter.
    assert expected_calibration_error(logits, labels) != pytest.approx(0.49)


def test_ece_uses_the_largest_probability_of_many_classes() -> None:
    logits = from_probs([[0.2, 0.5, 0.3]])
    assert expected_calibration_error(logits, [2]) == pytest.approx(0.5)  # wrong at 0.5
    assert expected_calibration_error(logits, [1]) == pytest.approx(0.5)  # right at 0.5
    confident = torch.tensor([[30.0, -30.0], [-30.0, 30.0]])
    assert expected_calibration_error(confident, [0, 1]) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(confident, [1, 0]) == pytest.approx(1.0)


def test_ece_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="C >= 2"):
        expected_calibration_error(torch.zeros(3, 1), [0.0, 1.0, 2.0])
    with pytest.raises(ValueError, match="one label per row"):
        expected_calibration_error(torch.zeros(3, 2), [0, 1])


# -- KL(teacher || student) ------------------------------------------------------------------


def test_kl_teacher_student_by_hand() -> None:
    teacher = from_probs([[0.5, 0.5], [0.9, 0.1], [0.1, 0.9]])
    student = from_probs([[0.25, 0.75], [0.9, 0.1], [0.5, 0.5]])
    # sum_c p_t ln(p_t / p_s) per example: 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75); 0 (equal);
    # 0.1 ln(0.1/0.5) + 0.9 ln(0.9/0.5).
    kl = [
        0.5 * math.log(2.0) + 0.5 * math.log(2 / 3),
        0.0,
        0.1 * math.log(0.2) + 0.9 * math.log(1.8),
    ]
    assert kl[0] == pytest.approx(0.1438410362) and kl[2] == pytest.approx(0.3680642071)
    assert kl_teacher_student(teacher, student) == pytest.approx(sum(kl) / 3)
    # The direction matters: KL(student || teacher) is another number.
    reverse = [
        0.25 * math.log(0.5) + 0.75 * math.log(1.5),
        0.0,
        0.5 * math.log(5) + 0.5 * math.log(5 / 9),
    ]
    assert kl_teacher_student(student, teacher) == pytest.approx(sum(reverse) / 3)
    assert sum(reverse) / 3 == pytest.approx(0.2138792, abs=1e-6)
    assert kl_teacher_student(teacher, teacher) == pytest.approx(0.0, abs=1e-12)


def test_kl_rejects_regression_and_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="classifiers"):
        kl_teacher_student(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="shapes differ"):
        kl_teacher_student(torch.zeros(2, 2), torch.zeros(3, 2))


# -- confusion matrix and the metrics.json blocks ---------------------------------------------


def test_confusion_rows_are_true_classes_and_every_class_is_listed() -> None:
    logits = from_probs([[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.7, 0.2, 0.1]])
    # predictions 0, 0, 1, 0 against labels 0, 1, 1, 1; class 2 nowhere: a row and column of 0.
    assert confusion(logits, [0, 1, 1, 1]) == [[1, 0, 0], [2, 1, 0], [0, 0, 0]]


def test_split_diagnostics_blocks() -> None:
    student = from_probs([[0.9, 0.1], [0.75, 0.25], [0.3, 0.7], [0.62, 0.38]])
    teacher = from_probs([[0.95, 0.05], [0.4, 0.6], [0.2, 0.8], [0.3, 0.7]])
    labels = [0, 1, 1, 1]
    full = split_diagnostics(student, teacher, labels, ["neg", "pos"])
    assert full["calibration"] == {
        "student_ece": pytest.approx(0.4425),
        "teacher_ece": pytest.approx(expected_calibration_error(teacher, labels)),
        "bins": 15,
    }
    assert full["teacher_kl"] == pytest.approx(kl_teacher_student(teacher, student))
    assert full["confusion_matrix"] == {
        "labels": ["neg", "pos"],
        "student": [[1, 0], [2, 1]],
        "teacher": [[1, 0], [0, 3]],
    }
    json.dumps(full)  # plain JSON types (metrics.json)
    alone = split_diagnostics(student, None, labels, ["neg", "pos"])
    assert set(alone) == {"calibration", "confusion_matrix"}
    assert "teacher_ece" not in alone["calibration"] and "teacher" not in alone["confusion_matrix"]
    assert split_diagnostics(torch.zeros(4, 1), torch.zeros(4, 1), [0.1, 0.2, 0.3, 0.4], []) == {}


# -- report.html ------------------------------------------------------------------------------


def classification_metrics_dict() -> dict[str, Any]:
    """A vanilla_kd job's metrics as run_job writes them (two stages, an evaluation set, the
    new blocks), with a hostile class name and set name, and an ONNX block."""
    dev = [
        {"accuracy": 0.6, "macro_f1": 0.55, "mcc": 0.2},
        {"accuracy": 0.7, "macro_f1": 0.69, "mcc": 0.41},
        {"accuracy": 0.75, "macro_f1": 0.74, "mcc": 0.5},
    ]
    epochs = [
        {
            "stage": stage,
            "stage_index": i,
            "epoch": e,
            "stage_epoch": 1,
            "step": step,
            "stage_step": 3,
            "at": "epoch_end",
            "train_loss": loss,
            "train_losses": {"loss": loss, "ce": loss / 2, "kd": loss / 3},
            "dev": d,
            "seconds": 1.5 * e,
        }
        for (stage, i, e, step, loss), d in zip(
            [("warmup", 1, 1, 3, 0.9), ("distil", 2, 2, 6, 0.7), ("distil", 2, 3, 9, 0.5)],
            dev,
            strict=True,
        )
    ]
    stage = {
        "loss": "kd",
        "epochs": 1,
        "learning_rate": 5e-5,
        "schedule": "linear",
        "trains": ["student"],
        "selects_best": True,
        "restored_best": False,
        "seconds": 2.0,
    }
    return {
        "method": "vanilla_kd",
        "task": "classification",
        "labels": [EVIL, "fresh"],
        "data": {"train": 48, "dev": 32, "test": 32},
        "device": "cpu",
        "epochs": epochs,
        "stages": [
            {**stage, "name": "warmup", "index": 1, "steps": 3, "best_dev": dev[0]},
            {**stage, "name": "distil", "index": 2, "steps": 6, "best_dev": dev[2]},
        ],
        "selection_metric": "accuracy",
        "best_epoch": 3,
        "best_step": 9,
        "best_stage": "distil",
        "best_dev": dev[2],
        "train_seconds": 4.5,
        "warnings": [f"a warning naming {EVIL}"],
        "test": {"accuracy": 0.71875, "macro_f1": 0.7, "mcc": 0.44},
        "student": {
            "parameters": 11_000_000,
            "latency_s_batch1": 0.004,
            "latency_s_batch32": 0.0007,
            "bytes": 44_000_000,
        },
        "hops": [{"name": "student", "teacher": "teacher", "test": {"accuracy": 0.71875}}],
        "teacher_cache": {"status": "built", "build_seconds": 0.3},
        "teacher_test": {"accuracy": 0.8125, "macro_f1": 0.81, "mcc": 0.63},
        "teacher_agreement": 0.84375,
        "teacher": {
            "parameters": 22_700_000,
            "latency_s_batch1": 0.009,
            "latency_s_batch32": 0.0016,
            "bytes": 90_900_000,
        },
        "calibration": {"student_ece": 0.1234, "teacher_ece": 0.0567, "bins": 15},
        "teacher_kl": 0.0789,
        "confusion_matrix": {
            "labels": [EVIL, "fresh"],
            "student": [[12, 4], [5, 11]],
            "teacher": [[14, 2], [4, 12]],
        },
        "eval_sets": {
            "ood<b>x</b>": {
                "examples": 24,
                "student": {"accuracy": 0.66, "macro_f1": 0.65, "mcc": 0.3},
                "teacher": {"accuracy": 0.75, "macro_f1": 0.74, "mcc": 0.5},
                "retention": {"accuracy": 0.88, "macro_f1": 0.878, "mcc": 0.6},
            }
        },
        "onnx": {
            "opset": 17,
            "file": "model.onnx",
            "bytes": 44_100_000,
            "max_abs_diff_logits": 2.1e-6,
            "prediction_agreement": 1.0,
            "latency_s_batch1": {"pytorch": 0.004, "onnxruntime": 0.0021},
            "latency_s_batch32": {"pytorch": 0.0007, "onnxruntime": 0.0004},
            "int8": {
                "file": "model.int8.onnx",
                "bytes": 11_200_000,
                "test": {"accuracy": 0.6875, "macro_f1": 0.68, "mcc": 0.38},
                "agreement_with_fp32": 0.96875,
                "latency_s_batch1": 0.0013,
                "latency_s_batch32": 0.00025,
            },
        },
    }


def svgs(page: str) -> list[str]:
    """The inline SVG charts of a page, each parsed as XML (so each is well-formed)."""
    assert "<img" not in page
    found = re.findall(r'<svg class="chart".*?</svg>', page, flags=re.S)
    for svg in found:
        ElementTree.fromstring(svg)
    return found


class Tags(HTMLParser):
    """Start tags and attributes of a page, and whether every table closed."""

    def __init__(self) -> None:
        super().__init__()
        self.starts: list[tuple[str, dict[str, str | None]]] = []
        self.open_tables = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.starts.append((tag, dict(attrs)))
        self.open_tables += tag == "table"

    def handle_endtag(self, tag: str) -> None:
        self.open_tables -= tag == "table"


def test_report_has_every_section_and_draws_svg_charts(tmp_path: Path) -> None:
    metrics = classification_metrics_dict()
    before = copy.deepcopy(metrics)
    path = write_report(metrics, tmp_path)
    assert path == tmp_path / REPORT_FILE
    assert metrics == before  # the report only reads the metrics
    page = path.read_text(encoding="utf-8")
    # a dict is read through JobMetrics once: the model itself gives the same page
    assert render_report(load_metrics(metrics)) == page
    for heading in (
        "Job",
        "Test split",
        "Evaluation sets",
        "Confusion matrices",
        "Learning curves",
        "Latency and size",
        "Definitions",
    ):
        assert f"<h2>{heading}</h2>" in page, heading
    # the numbers, formatted: accuracies, ECE, agreement, KL, latency in ms, size in MiB
    for text in (
        "0.7188",
        "0.8125",
        "0.1234",
        "0.0567",
        "0.8438",
        "0.0789",
        "9.000",
        "4.000",
        "86.7",  # 90_900_000 bytes in MiB
        "42.0",  # 44_000_000 bytes
        "Guo et al. 2017",
        "KL(teacher ‖ student)",
    ):
        assert text in page, text
    # ONNX rows: fp32 (onnxruntime latency 2.1 ms) and int8 (its test accuracy, 10.7 MiB)
    assert "student, ONNX fp32" in page and "2.100" in page
    assert "student, ONNX int8" in page and "0.6875" in page and "10.7" in page
    assert "size (MiB)" in page and "(MB)" not in page
    assert "model.int8.onnx" in page and "0.9688" in page
    # student / teacher ratios: 2.06x fewer parameters, 2.25x faster at batch 1
    assert "fewer parameters 2.06×" in page and "faster at batch 1 2.25×" in page
    charts = svgs(page)
    # teacher and student confusion matrices, learning curves (training loss, dev metrics)
    assert len(charts) == 4
    teacher, student, loss, dev = charts
    assert 'aria-label="training loss"' in loss and loss.count("<polyline") == 3  # loss, ce, kd
    assert 'aria-label="dev metrics"' in dev and dev.count("<polyline") == 3
    # the stages: names at their first record, a dashed line where "distil" begins
    assert loss.count('class="mark"') == 1 and ">warmup<" in loss and ">distil<" in loss
    assert 'aria-label="teacher: test split"' in teacher
    # each 2 x 2 matrix: 4 cells with their counts, the largest the darkest, in white
    assert teacher.count("<rect") == 4 + 5  # the cells and a 5-step colour key
    assert '<rect x="' in student and ">12</text>" in student and ">11</text>" in student
    assert 'fill="#08306b"><title>true' in teacher  # 14, the peak, in the darkest blue
    assert 'fill="#fff">14</text>' in teacher and 'fill="#000">2</text>' in teacher
    tags = Tags()
    tags.feed(page)
    assert tags.open_tables == 0
    assert {t for t, _ in tags.starts} <= {
        "html",
        "head",
        "meta",
        "title",
        "style",
        "body",
        "h1",
        "h2",
        "h3",
        "section",
        "table",
        "thead",
        "tbody",
        "tr",
        "th",
        "td",
        "p",
        "div",
        "svg",
        "text",
        "line",
        "polyline",
        "circle",
        "rect",
        "ul",
        "li",
        "dl",
        "dt",
        "dd",
    }
    csp = [a for t, a in tags.starts if t == "meta" and a.get("http-equiv")]
    assert csp and "default-src 'none'" in str(csp[0]["content"])


def test_report_shows_the_latency_spread_and_flags_unreliable_figures() -> None:
    """Issue 24: a speed-up timed under a changing load ("0.60x faster") is flagged, not
    reported as a fact; a steady one shows its rounds' range and spread."""
    m = classification_metrics_dict()

    def figure(median: float, spread: float) -> dict[str, Any]:
        lo, hi = median * (1 - spread), median * (1 + spread)
        return {"median": median, "min": lo, "max": hi, "spread": spread, "rounds": 5,
                "reliable": spread <= 0.25}  # fmt: skip

    m["latency"] = {
        "protocol": "interleaved",
        "spread_limit": 0.25,
        "batch1": {
            "student": figure(0.004, 0.6),
            "teacher": figure(0.009, 0.1),
            "speedup": {**figure(0.6, 0.7), "reliable": False},
        },
        "batch32": {
            "student": figure(0.0007, 0.05),
            "teacher": figure(0.0016, 0.04),
            "speedup": figure(2.3, 0.05),
        },
    }
    page = render_report(load_metrics(m))
    assert "faster at batch 1 0.60× (rounds 0.18–1.02×, spread 70%, unreliable)" in page
    assert "faster at batch 32 2.30× (rounds 2.18–2.42×, spread 5%)" in page
    assert "4.000 (spread 60%, unreliable)" in page  # the student's batch-1 cell
    assert "9.000 (spread 10%)" in page
    assert "spread is above 25% is unreliable" in page
    # a finetune job's model ("fine-tuned teacher") is timed under latency's "student" key
    tuned = render_report(load_metrics({**m, "trained": "teacher"}))
    assert "<td>fine-tuned teacher</td>" in tuned and "4.000 (spread 60%, unreliable)" in tuned


def test_report_escapes_names_from_the_job(tmp_path: Path) -> None:
    page = render_report(classification_metrics_dict())
    assert "<script" not in page.lower()
    assert "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt;" in page  # class name, warning
    assert "ood&lt;b&gt;x&lt;/b&gt;" in page and "<b>" not in page  # evaluation set name


def test_report_without_onnx_teacher_or_epochs_leaves_those_out() -> None:
    m = classification_metrics_dict()
    for key in ("onnx", "teacher_test", "teacher", "teacher_agreement", "teacher_kl", "eval_sets"):
        del m[key]
    m["calibration"].pop("teacher_ece")
    m["confusion_matrix"].pop("teacher")
    m["epochs"] = []
    page = render_report(load_metrics(m))
    assert "student, ONNX" not in page and "Evaluation sets" not in page
    assert "No dev evaluation was recorded." in page
    assert len(svgs(page)) == 1  # the student's confusion matrix
    # an older job's metrics (no new blocks at all) still render
    old = JobMetrics(method="finetune", task="classification", test={"accuracy": 0.5})
    assert "<h2>Test split</h2>" in render_report(old)
    assert render_report(old) == render_report(old.to_json())
    # a finetune job (metrics.json trained: teacher) trained a teacher, not a student
    tuned = render_report(load_metrics(m).model_copy(update={"trained": "teacher"}))
    assert "fine-tuned teacher" in tuned and ">student<" not in tuned
    assert ">student<" in page


def test_report_of_a_regression_job(tmp_path: Path) -> None:
    reg = {"pearson": 0.8, "spearman": 0.78, "mse": 0.52}
    m = classification_metrics_dict()
    for key in ("calibration", "teacher_kl", "confusion_matrix", "teacher_agreement", "onnx"):
        del m[key]
    m.update(
        task="regression",
        labels=[],
        test=reg,
        teacher_test={**reg, "pearson": 0.9},
        teacher_mean_abs_diff=0.31,
    )
    for r in m["epochs"]:
        r["dev"] = {"pearson": 0.5, "spearman": 0.4, "mse": 1.1}
    m["eval_sets"] = {
        "tweets": {
            "examples": 24,
            "student": reg,
            "teacher": reg,
            "retention": {"pearson": 1.0, "spearman": 1.0},
        }
    }
    page = write_report(load_metrics(m), tmp_path).read_text(encoding="utf-8")
    assert "Pearson r" in page and "Spearman ρ" in page and "0.3100" in page
    assert "Confusion matrices" not in page and "ECE" not in page
    assert "<h2>Evaluation sets</h2>" in page and "tweets" in page
    assert len(svgs(page)) == 2  # the learning curves


def test_many_classes_and_odd_names_render() -> None:
    names = [f"$class_{i}^{{x}}$ {{ <&>" for i in range(25)]
    matrix = [[int(i == j) * 3 + (j % 2) for j in range(25)] for i in range(25)]
    m = {
        "method": "finetune",
        "task": "classification",
        "labels": names,
        "test": {"accuracy": 0.5},
        "confusion_matrix": {"labels": names, "student": matrix},
    }
    (chart,) = svgs(render_report(m))
    assert chart.count("<title>") == 25 * 25  # a tooltip per cell
    # over ANNOTATED_CLASSES classes: no count in the cells
    assert 'text-anchor="middle" fill=' not in chart
    assert "$class_0^{x}$ {…" in chart  # shortened on the axes
    assert (
        "true $class_24^{x}$ { &lt;&amp;&gt;, predicted $class_1^{x}$ { &lt;&amp;&gt;: 1" in chart
    )


def test_report_of_ill_typed_metrics_names_the_field() -> None:
    """A dict is validated as JobMetrics before anything is drawn: a value of the wrong type
    is a ValidationError naming its key, not a half-drawn page."""
    m = classification_metrics_dict()
    m["teacher"]["parameters"] = "many"
    with pytest.raises(pydantic.ValidationError, match=r"teacher\.parameters"):
        render_report(m)


def test_numbers_keep_small_values_visible() -> None:
    assert format_number(6.440157765932272e-05) == "6.44e-05"
    assert format_number(0.84375) == "0.8438" and format_number(0.0) == "0.0000"
    assert format_number(22_700_000) == "22,700,000" and format_number(None) == "—"
    assert format_number(float("nan")) == "nan"


def test_curve_positions_chain_the_hops() -> None:
    records = [
        EvaluationRecord(hop="a", step=2),
        EvaluationRecord(hop="a", step=4),
        EvaluationRecord(hop="b", step=1),
        EvaluationRecord(hop="b", step=3),
    ]
    assert curve_positions(records) == [2.0, 4.0, 5.0, 7.0]
    assert curve_positions([EvaluationRecord(step=1), EvaluationRecord(step=2)]) == [1.0, 2.0]
    records = [r.model_copy(update={"stage": "kd"}) for r in records]
    marks = stage_marks(records, curve_positions(records))
    assert [(m.text, m.label_x, m.line_x) for m in marks] == [
        ("a/kd", 2.0, None),
        ("b/kd", 5.0, 4.5),
    ]


def test_a_report_that_cannot_be_written_is_a_warning_not_a_failure(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    metrics = classification_metrics_dict()
    logged: list[dict[str, object]] = []
    block = _write_report(metrics, not_a_dir, logged.append)
    assert set(block) == {"error"} and "the report was not written" in block["error"]
    assert logged == [{"event": "warning", "message": block["error"]}]
    assert metrics["warnings"][-1] == block["error"]
    ok = _write_report(classification_metrics_dict(), tmp_path, logged.append)
    assert ok["file"] == REPORT_FILE and ok["bytes"] == (tmp_path / REPORT_FILE).stat().st_size
    assert 0 < ok["seconds"] < 30
