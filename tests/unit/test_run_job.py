"""run_job end to end on tiny jobs (real MiniLM-L6, real data, CPU)."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from kd_engine.contracts import (
    ALWAYS_WRITTEN,
    METRICS_SCHEMA_VERSION,
    JobMetrics,
    unmodelled_keys,
)
from kd_engine.data import Example, load_transfer_set
from kd_engine.data.batching import encode
from kd_engine.data.split_artifact import SPLIT_FILE
from kd_engine.evaluation import (
    agreement,
    classification_metrics,
    confusion,
    expected_calibration_error,
    kl_teacher_student,
    predict_logits,
)
from kd_engine.latency import SPREAD_LIMIT
from kd_engine.onnx_export import INT8_FILE, ONNX_FILE, ort_logits, ort_session
from kd_engine.references import local_path_under
from kd_engine.report_html import REPORT_FILE, format_number
from kd_engine.run import LOG_FILE, METRICS_FILE, REPORT_SKIPPED, RunResult, run_job
from kd_engine.spec import JobSpec
from kd_engine.trainer import Cancelled, Progress, TrainHooks
from tests.checks import NO_EXTRAS, check_classification_metrics

CPU = torch.device("cpu")
DATASET = {
    "source": "builtin:rotten_tomatoes",
    "max_train_examples": 48,
    "max_eval_examples": 32,
}
TRAINING = {"epochs": 1, "batch_size": 16, "max_seq_length": 32, "device": "cpu"}


def make_spec(**overrides: Any) -> JobSpec:
    body: dict[str, Any] = {
        "teacher": "builtin:minilm-l6",
        "method": {"name": "finetune"},
        "dataset": DATASET,
        "training": TRAINING,
    }
    body.update(overrides)
    return JobSpec.model_validate(body)


def no_files(ref: str) -> Path:
    raise ValueError(f"no file references in these tests: {ref!r}")


def saved_test_logits(out_dir: Path, spec: JobSpec) -> tuple[torch.Tensor, list[int]]:
    """Test-split logits of the saved model, loaded by plain transformers."""
    model = AutoModelForSequenceClassification.from_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    data = load_transfer_set(spec.dataset, no_files)
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    assert sorted(names) == sorted(data.label_names)
    examples = [
        Example(e.id, e.text, e.text_pair, names.index(data.label_names[e.label]))
        for e in data.test
    ]
    enc = encode(examples, tokenizer, spec.training.max_seq_length)
    return predict_logits(model, enc, spec.training.eval_batch_size, 0, CPU), enc.labels


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> RunResult:
    """A tiny finetune of the built-in MiniLM: the teacher of the later jobs."""
    out = tmp_path_factory.mktemp("teacher")
    records: list[dict[str, object]] = []
    progress: list[Progress] = []
    hooks = TrainHooks(on_progress=progress.append, log=records.append, every=1)
    result = run_job(make_spec(), minilm_path, no_files, out, hooks)
    result.metrics["_records"] = records  # for the tests below, not written anywhere
    result.metrics["_progress"] = progress
    return result


def test_finetune_writes_the_student_and_reports(teacher_run: RunResult) -> None:
    out = teacher_run.out_dir
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        METRICS_FILE,
        LOG_FILE,
        SPLIT_FILE,
    ):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin"))
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["BertForSequenceClassification"]
    assert config["id2label"] == {"0": "rotten", "1": "fresh"}
    assert config["num_hidden_layers"] == 6


def test_finetune_metrics(teacher_run: RunResult) -> None:
    written = json.loads((teacher_run.out_dir / METRICS_FILE).read_text())
    m = teacher_run.metrics
    assert written["test"] == m["test"]
    assert written["method"] == "finetune"
    assert written["labels"] == ["rotten", "fresh"]
    assert written["data"] == {"train": 48, "dev": 32, "test": 32}
    assert written["device"] == "cpu"
    assert set(written["test"]) == {"accuracy", "macro_f1", "mcc"}
    check_classification_metrics(written, 32)  # no teacher: no agreement
    assert written["best_epoch"] == 1 and len(written["epochs"]) == 1
    assert written["student"]["parameters"] > 20_000_000
    assert written["student"]["bytes"] == (teacher_run.out_dir / "model.safetensors").stat().st_size
    assert written["student"]["latency_s_batch1"] > 0
    assert "teacher_agreement" not in written and "teacher" not in written


def test_finetune_train_log(teacher_run: RunResult) -> None:
    lines = (teacher_run.out_dir / LOG_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert all("time" in r for r in records)
    stages = [r["stage"] for r in records if r["event"] == "stage"]
    assert stages == ["prepare", "train", "evaluate", "export"]  # "train": finetune's one stage
    [stage_end] = [r for r in records if r["event"] == "stage_end"]
    assert (stage_end["name"], stage_end["steps"], stage_end["epochs"]) == ("train", 3, 1)
    events = [r["event"] for r in records]
    assert events[0] == "stage" and events[-1] == "done"
    assert events.count("epoch") == 1
    # 48 examples in batches of 16, one epoch: steps 1..3, each reported (every=1).
    assert [r["step"] for r in records if r["event"] == "step"] == [1, 2, 3]
    data = next(r for r in records if r["event"] == "data")
    assert data["labels"] == ["rotten", "fresh"] and data["train"] == 48
    assert records[-1]["test"] == teacher_run.metrics["test"]
    # The caller's log hook saw the same records (without the time stamp).
    assert teacher_run.metrics["_records"] == [
        {k: v for k, v in r.items() if k != "time"} for r in records
    ]
    stages_seen = [p.stage for p in teacher_run.metrics["_progress"] if p.step == 0]
    assert stages_seen == ["prepare", "evaluate", "export"]


def test_saved_model_reproduces_the_test_metrics(teacher_run: RunResult) -> None:
    spec = make_spec()
    logits, labels = saved_test_logits(teacher_run.out_dir, spec)
    assert logits.shape == (32, 2)
    assert classification_metrics(logits, labels) == teacher_run.metrics["test"]


def test_saved_weights_load_without_missing_keys(teacher_run: RunResult) -> None:
    model, info = AutoModelForSequenceClassification.from_pretrained(
        teacher_run.out_dir, output_loading_info=True
    )
    assert not info["missing_keys"]
    tensors = load_file(str(teacher_run.out_dir / "model.safetensors"))
    state = model.state_dict()
    for k, v in tensors.items():
        assert torch.equal(state[k], v), k


@pytest.fixture(scope="module")
def kd_run(tmp_path_factory: pytest.TempPathFactory, teacher_run: RunResult) -> RunResult:
    spec = make_spec(
        teacher="job:teacher",
        student={"num_layers": 2},
        method={"name": "vanilla_kd", "alpha": 0.5, "temperature": 2.0},
        export={"int8": True},
    )
    return run_job(spec, teacher_run.out_dir, no_files, tmp_path_factory.mktemp("kd"))


def test_vanilla_kd_from_the_finetuned_teacher(kd_run: RunResult, teacher_run: RunResult) -> None:
    m = kd_run.metrics
    assert m["method"] == "vanilla_kd"
    assert m["labels"] == ["rotten", "fresh"]
    assert m["warnings"] == []
    config = json.loads((kd_run.out_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert m["student"]["parameters"] < m["teacher"]["parameters"]
    assert m["student"]["bytes"] < teacher_run.metrics["student"]["bytes"]
    # Same teacher, same test split: its test metrics are those of the finetune job.
    assert m["teacher_test"] == teacher_run.metrics["test"]
    steps = [h["train_losses"] for h in m["epochs"]]
    assert all({"loss", "ce", "kd"} <= s.keys() for s in steps)


def test_vanilla_kd_latency_is_timed_interleaved_with_its_spread(kd_run: RunResult) -> None:
    """Issue 24: teacher and student timed in the same rounds; every figure with its spread
    and reliability in metrics.json, the headline medians kept where they were."""
    m = json.loads((kd_run.out_dir / "metrics.json").read_text())
    latency = m["latency"]
    assert latency["protocol"] == "interleaved" and latency["spread_limit"] == SPREAD_LIMIT
    for batch in ("batch1", "batch32"):
        block = latency[batch]
        for who in ("student", "teacher"):
            figure = block[who]
            assert figure["rounds"] == latency["rounds"][batch] == 5
            assert 0 < figure["min"] <= figure["median"] <= figure["max"]
            assert figure["reliable"] == (figure["spread"] <= SPREAD_LIMIT)
            assert m[who][f"latency_s_{batch}"] == figure["median"]
        speedup = block["speedup"]
        assert speedup["min"] <= speedup["median"] <= speedup["max"]
        assert speedup["reliable"] == (speedup["spread"] <= SPREAD_LIMIT)
    report = (kd_run.out_dir / "report.html").read_text(encoding="utf-8")
    assert "timed interleaved" in report and "faster at batch 1" in report


@pytest.mark.parametrize("which", ["teacher_run", "kd_run"])
def test_metrics_json_fits_its_model(which: str, request: pytest.FixtureRequest) -> None:
    """A real job's metrics.json validates against kd_engine.contracts.JobMetrics: every key
    it holds is a field (none kept as an unknown extra), every always-written block is there,
    the version is the writer's, and reading it back gives the same JSON."""
    run: RunResult = request.getfixturevalue(which)
    written = json.loads((run.out_dir / METRICS_FILE).read_text())
    m = JobMetrics.model_validate(written)
    assert written["schema_version"] == METRICS_SCHEMA_VERSION == m.schema_version
    assert set(ALWAYS_WRITTEN) <= set(written)
    assert unmodelled_keys(m) == []
    assert m.to_json() == written
    assert m.test == run.metrics["test"] and m.student is not None and m.report is not None
    assert m.report.file == REPORT_FILE and m.onnx is not None and m.onnx.file == "model.onnx"
    assert (m.teacher is not None) == (which == "kd_run")


def test_vanilla_kd_agreement_matches_the_saved_models(
    kd_run: RunResult, teacher_run: RunResult
) -> None:
    spec = make_spec()
    s_logits, labels = saved_test_logits(kd_run.out_dir, spec)
    t_logits, _ = saved_test_logits(teacher_run.out_dir, spec)
    assert classification_metrics(s_logits, labels) == kd_run.metrics["test"]
    assert kd_run.metrics["teacher_agreement"] == pytest.approx(agreement(s_logits, t_logits))


def test_vanilla_kd_calibration_kl_confusion_and_report(
    kd_run: RunResult, teacher_run: RunResult
) -> None:
    """The new metrics blocks match the saved models' own test logits; report.html is written
    (after them) and named in metrics.json."""
    spec = make_spec()
    s_logits, labels = saved_test_logits(kd_run.out_dir, spec)
    t_logits, _ = saved_test_logits(teacher_run.out_dir, spec)
    m = json.loads((kd_run.out_dir / METRICS_FILE).read_text())
    assert m["calibration"]["bins"] == 15
    assert m["calibration"]["student_ece"] == pytest.approx(
        expected_calibration_error(s_logits, labels), abs=1e-5
    )
    assert m["calibration"]["teacher_ece"] == pytest.approx(
        expected_calibration_error(t_logits, labels), abs=1e-5
    )
    assert m["teacher_kl"] == pytest.approx(kl_teacher_student(t_logits, s_logits), abs=1e-5)
    assert m["teacher_kl"] > 0
    assert m["confusion_matrix"] == {
        "labels": ["rotten", "fresh"],
        "student": confusion(s_logits, labels),
        "teacher": confusion(t_logits, labels),
    }
    assert sum(map(sum, m["confusion_matrix"]["student"])) == 32
    assert m["teacher"]["bytes"] == (teacher_run.out_dir / "model.safetensors").stat().st_size
    report = kd_run.out_dir / REPORT_FILE
    assert m["report"] == {"file": REPORT_FILE, "bytes": report.stat().st_size,
                           "seconds": m["report"]["seconds"]}  # fmt: skip
    page = report.read_text(encoding="utf-8")
    assert "<h2>Confusion matrices</h2>" in page and "<img" not in page
    assert page.count('<svg class="chart"') == 4  # two confusion matrices, two curves
    assert format_number(m["teacher_kl"]) in page


def test_finetune_calibration_without_a_teacher(teacher_run: RunResult) -> None:
    m = teacher_run.metrics
    assert set(m["calibration"]) == {"student_ece", "bins"}
    logits, labels = saved_test_logits(teacher_run.out_dir, make_spec())
    assert m["calibration"]["student_ece"] == pytest.approx(
        expected_calibration_error(logits, labels), abs=1e-5
    )
    assert "teacher_kl" not in m and set(m["confusion_matrix"]) == {"labels", "student"}
    assert m["report"]["file"] == REPORT_FILE
    assert (teacher_run.out_dir / REPORT_FILE).is_file()


def test_onnx_exports_reproduce_the_job_metrics(kd_run: RunResult) -> None:
    """model.onnx and model.int8.onnx are written beside the student; onnxruntime on the test
    split gives the job's test metrics (fp32) and the int8 block's (int8)."""
    out, m = kd_run.out_dir, kd_run.metrics
    written = json.loads((out / METRICS_FILE).read_text())["onnx"]
    assert written == m["onnx"]
    assert written["file"] == ONNX_FILE and written["bytes"] == (out / ONNX_FILE).stat().st_size
    assert written["max_abs_diff_logits"] < 1e-4 and written["prediction_agreement"] == 1.0
    int8 = written["int8"]
    assert int8["file"] == INT8_FILE and int8["bytes"] == (out / INT8_FILE).stat().st_size
    spec = make_spec()
    _, labels = saved_test_logits(out, spec)
    tokenizer = AutoTokenizer.from_pretrained(out)
    data = load_transfer_set(spec.dataset, no_files)
    enc = encode(data.test, tokenizer, spec.training.max_seq_length)
    assert enc.labels == labels  # the teacher's label order is the dataset's here
    fp32 = ort_logits(ort_session(out / ONNX_FILE, 1), enc, 64, 0)
    assert classification_metrics(fp32, labels) == m["test"]
    int8_logits = ort_logits(ort_session(out / INT8_FILE, 1), enc, 64, 0)
    assert classification_metrics(int8_logits, labels) == int8["test"]
    assert int8["agreement_with_fp32"] == pytest.approx(agreement(fp32, int8_logits))


def test_a_failed_onnx_export_is_a_warning_not_a_failed_job(
    tmp_path: Path, minilm_path: Path
) -> None:
    (tmp_path / ONNX_FILE).mkdir()  # nothing can be put in its place
    result = run_job(fresh_spec(0), minilm_path, no_files, tmp_path)
    error = result.metrics["onnx"]["error"]
    assert "IsADirectoryError" in error
    assert result.metrics["warnings"] == [f"ONNX export failed, model.onnx not written: {error}"]
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / ONNX_FILE).is_dir()
    records = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert [r["message"] for r in records if r["event"] == "warning"] == result.metrics["warnings"]
    assert json.loads((tmp_path / METRICS_FILE).read_text())["onnx"] == {"error": error}


def test_vanilla_kd_needs_a_finetuned_teacher(tmp_path: Path, minilm_path: Path) -> None:
    spec = make_spec(method={"name": "vanilla_kd"})
    with pytest.raises(ValueError, match="run a finetune job first"):
        run_job(spec, minilm_path, no_files, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_label_mismatch_names_both_label_lists(tmp_path: Path, teacher_run: RunResult) -> None:
    spec = make_spec(
        method={"name": "vanilla_kd"},
        dataset={"source": "builtin:sms_spam", "max_train_examples": 20, "max_eval_examples": 10},
    )
    with pytest.raises(ValueError) as info:
        run_job(spec, teacher_run.out_dir, no_files, tmp_path)
    message = str(info.value)
    assert "['rotten', 'fresh']" in message
    assert "['ham', 'spam']" in message


def write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        writer.writerows(rows)


def test_file_dataset_is_relabelled_to_the_teacher_order(
    tmp_path: Path, teacher_run: RunResult, rotten_tomatoes: Any
) -> None:
    names = rotten_tomatoes.label_names
    root = tmp_path / "data"
    root.mkdir()
    write_csv(root / "train.csv", [(e.text, names[e.label]) for e in rotten_tomatoes.train[:24]])
    test_rows = [(e.text, names[e.label]) for e in rotten_tomatoes.test[:32]]
    write_csv(root / "test.csv", test_rows)
    spec = make_spec(
        teacher="job:teacher",
        student={
            "type": "fresh",
            "num_layers": 1,
            "hidden_size": 32,
            "num_heads": 2,
            "intermediate_size": 64,
        },
        method={"name": "vanilla_kd"},
        dataset={
            "source": "file://train.csv",
            "test_source": "file://test.csv",
            "text_column": "review",
            "label_column": "sentiment",
        },
        training={**TRAINING, "max_steps": 1},
        export=NO_EXTRAS,
    )
    result = run_job(
        spec, teacher_run.out_dir, lambda ref: local_path_under(ref, root), tmp_path / "out"
    )
    # The file's own order would be sorted (fresh, rotten); the teacher's is kept.
    assert result.metrics["labels"] == ["rotten", "fresh"]
    # split.json: the test rows are the test file's rows, train and dev share the train file.
    split = json.loads((tmp_path / "out" / "split.json").read_text(encoding="utf-8"))
    assert split["splits"]["test"] == {"source": "file://test.csv", "rows": list(range(32))}
    train, dev = split["splits"]["train"], split["splits"]["dev"]
    assert train["source"] == dev["source"] == "file://train.csv"
    assert sorted(train["rows"] + dev["rows"]) == list(range(24))
    assert len(dev["rows"]) == result.metrics["data"]["dev"]
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["id2label"] == {"0": "rotten", "1": "fresh"}
    # The teacher's accuracy on the file's test rows, computed from label names directly.
    model = AutoModelForSequenceClassification.from_pretrained(teacher_run.out_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_run.out_dir)
    enc = tokenizer(
        [t for t, _ in test_rows], truncation=True, max_length=32, padding=True, return_tensors="pt"
    )
    with torch.inference_mode():
        predicted = model(**enc).logits.argmax(-1).tolist()
    gold = [label for _, label in test_rows]
    correct = sum(model.config.id2label[p] == g for p, g in zip(predicted, gold, strict=True))
    assert result.metrics["teacher_test"]["accuracy"] == pytest.approx(correct / len(gold))


def fresh_spec(seed: int, export: dict[str, bool] | None = None) -> JobSpec:
    return make_spec(
        student={
            "type": "fresh",
            "num_layers": 1,
            "hidden_size": 32,
            "num_heads": 2,
            "intermediate_size": 64,
        },
        dataset={**DATASET, "max_train_examples": 16, "max_eval_examples": 8},
        training={**TRAINING, "max_steps": 1, "seed": seed},
        **({} if export is None else {"export": export}),
    )


def test_same_seed_same_job_same_weights(tmp_path: Path, minilm_path: Path) -> None:
    """Also: a job with export.onnx, .latency and .report off writes none of the three."""
    weights = []
    for i, seed in enumerate([3, 3, 4]):
        out = tmp_path / f"run{i}"
        m = run_job(fresh_spec(seed, NO_EXTRAS), minilm_path, no_files, out).metrics
        weights.append(load_file(str(out / "model.safetensors")))
        assert m["report"] == {"skipped": REPORT_SKIPPED} and "skipped" in m["onnx"]
        assert "latency" not in m and not any("latency" in k for k in m["student"]), m
        assert json.loads((out / METRICS_FILE).read_text())["report"] == m["report"]
        assert not {REPORT_FILE, ONNX_FILE} & {p.name for p in out.iterdir()}
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_cancelled_job_raises_cancelled(tmp_path: Path, minilm_path: Path) -> None:
    hooks = TrainHooks(should_stop=lambda: True, every=1)
    with pytest.raises(Cancelled):
        run_job(fresh_spec(0), minilm_path, no_files, tmp_path, hooks)
    records = [json.loads(line) for line in (tmp_path / LOG_FILE).read_text().splitlines()]
    assert [r["event"] for r in records][-1] == "step"
    assert not (tmp_path / METRICS_FILE).exists()
