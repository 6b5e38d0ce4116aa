"""ONNX export of students (kd_engine.onnx_export): real MiniLM-L6 layers, real BiLSTM/CNN
students, real onnx/onnxruntime, tiny rotten_tomatoes test rows, CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import onnxruntime
import pytest
import torch
from pydantic import ValidationError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_engine.checkpoint import spec_hash
from kd_engine.data import TransferSet
from kd_engine.data.batching import Encoded, collate, encode
from kd_engine.evaluation import agreement, predict_logits, task_metrics
from kd_engine.models.student import student_from_teacher
from kd_engine.models.text_students import (
    bidirectional_unpacked,
    bilstm_student,
    cnn_student,
    roll_rows,
)
from kd_engine.onnx_export import (
    INT8_FILE,
    ONNX_FILE,
    OPSET,
    export_report,
    ort_feed,
    ort_logits,
    ort_session,
)
from kd_engine.spec import ExportSpec, JobSpec
from kd_engine.spec_fields import unknown_field_reason

CPU = torch.device("cpu")
LABELS = ["rotten", "fresh"]


@pytest.fixture(scope="module")
def test_rows(rotten_tomatoes: TransferSet, tokenizer: PreTrainedTokenizerBase) -> Encoded:
    """24 test rows of rotten_tomatoes, at most 32 tokens: rows of different lengths."""
    return encode(rotten_tomatoes.test[:24], tokenizer, 32)


@pytest.fixture(scope="module")
def student(minilm_classifier: PreTrainedModel) -> PreTrainedModel:
    """A 2-layer student from MiniLM-L6's layers 0 and 3 (the head as drawn)."""
    return student_from_teacher(minilm_classifier, [0, 3]).eval()


@pytest.fixture(scope="module")
def fp32_run(
    student: PreTrainedModel, test_rows: Encoded, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict[str, Any], Path, list[str]]:
    out = tmp_path_factory.mktemp("onnx")
    warnings: list[str] = []
    report = export_report(student, test_rows, 0, out, ExportSpec(), 8, warnings.append)
    return report, out, warnings


def dims(value: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_export_writes_a_checked_model_with_dynamic_axes(
    fp32_run: tuple[dict[str, Any], Path, list[str]],
) -> None:
    report, out, warnings = fp32_run
    assert warnings == []
    path = out / ONNX_FILE
    assert report["file"] == ONNX_FILE and report["opset"] == OPSET == 17
    assert report["bytes"] == path.stat().st_size > 1_000_000
    assert report["int8"] is None
    assert sorted(p.name for p in out.iterdir()) == [ONNX_FILE]  # nothing partial left
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [OPSET]
    inputs = {i.name: dims(i) for i in model.graph.input}
    assert inputs == {
        "input_ids": ["batch", "sequence"],
        "attention_mask": ["batch", "sequence"],
        "token_type_ids": ["batch", "sequence"],
    }
    assert [(o.name, dims(o)) for o in model.graph.output] == [("logits", ["batch", 2])]


def test_onnxruntime_matches_pytorch_on_the_test_rows(
    fp32_run: tuple[dict[str, Any], Path, list[str]],
    student: PreTrainedModel,
    test_rows: Encoded,
) -> None:
    report, out, _ = fp32_run
    assert report["max_abs_diff_logits"] < 1e-4
    assert report["prediction_agreement"] == 1.0
    # Shapes the trace never saw (batch 5 and 1, other lengths) run and agree.
    session = ort_session(out / ONNX_FILE, 2)
    for size in (5, 1):
        expected = predict_logits(student, test_rows, size, 0, CPU)
        got = ort_logits(session, test_rows, size, 0)
        assert got.shape == expected.shape == (24, 2)
        assert (got - expected).abs().max() < 1e-4
    # Padding is masked: one row alone and padded to 32 tokens gives the same logits.
    short = min(range(len(test_rows)), key=lambda r: len(test_rows.input_ids[r]))
    longest = max(range(len(test_rows)), key=lambda r: len(test_rows.input_ids[r]))
    alone = session.run(["logits"], ort_feed(session, collate(test_rows, [short], 0)))[0]
    padded = session.run(["logits"], ort_feed(session, collate(test_rows, [short, longest], 0)))
    assert abs(alone[0] - padded[0][0]).max() < 1e-4


def test_latencies_of_both_runtimes_are_reported(
    fp32_run: tuple[dict[str, Any], Path, list[str]],
) -> None:
    report = fp32_run[0]
    for key in ("latency_s_batch1", "latency_s_batch32"):
        assert set(report[key]) == {"pytorch", "onnxruntime"}
        assert all(0 < s < 1 for s in report[key].values()), report[key]


def test_int8_quantisation_writes_a_smaller_valid_model_with_its_metrics(
    student: PreTrainedModel, test_rows: Encoded, tmp_path: Path
) -> None:
    warnings: list[str] = []
    report = export_report(
        student, test_rows, 0, tmp_path, ExportSpec(int8=True), 8, warnings.append
    )
    assert warnings == []
    int8 = report["int8"]
    path = tmp_path / INT8_FILE
    assert int8["file"] == INT8_FILE and int8["bytes"] == path.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == [INT8_FILE, ONNX_FILE]
    onnx.checker.check_model(str(path))
    # int8 weights: about a quarter of the fp32 file.
    assert int8["bytes"] < 0.4 * report["bytes"]
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "DynamicQuantizeLinear" in ops and ops & {"MatMulInteger", "DynamicQuantizeMatMul"}
    # Its test metrics and agreement are those of its own logits on the test rows.
    logits = ort_logits(ort_session(path, 2), test_rows, 8, 0)
    assert int8["test"] == task_metrics(logits, test_rows.labels)
    fp32 = predict_logits(student, test_rows, 8, 0, CPU)
    assert int8["agreement_with_fp32"] == agreement(fp32, logits)
    n = len(test_rows.labels)
    assert int8["agreement_with_fp32"] * n == pytest.approx(round(int8["agreement_with_fp32"] * n))
    assert int8["latency_s_batch1"] > 0 and int8["latency_s_batch32"] > 0


def test_export_off_is_skipped_with_its_reason(
    student: PreTrainedModel, test_rows: Encoded, tmp_path: Path
) -> None:
    report = export_report(student, test_rows, 0, tmp_path, ExportSpec(onnx=False))
    assert report == {"skipped": "export.onnx is false"}
    assert list(tmp_path.iterdir()) == []


def test_a_failed_export_is_recorded_not_raised(
    student: PreTrainedModel, test_rows: Encoded, tmp_path: Path
) -> None:
    """A folder where model.onnx should go: the export cannot be put in place. The report
    says why, a warning is given, the folder is left alone and nothing else is written."""
    (tmp_path / ONNX_FILE).mkdir()
    warnings: list[str] = []
    report = export_report(
        student, test_rows, 0, tmp_path, ExportSpec(int8=True), 8, warnings.append
    )
    assert set(report) == {"error"} and "IsADirectoryError" in report["error"]
    assert len(warnings) == 1 and warnings[0].startswith("ONNX export failed")
    assert [p.name for p in tmp_path.iterdir()] == [ONNX_FILE]
    assert (tmp_path / ONNX_FILE).is_dir() and not list((tmp_path / ONNX_FILE).iterdir())


def test_an_untraceable_input_is_an_error_not_a_raise(
    student: PreTrainedModel, test_rows: Encoded, tmp_path: Path
) -> None:
    """Token ids beyond the vocabulary: PyTorch's embedding refuses them while the export is
    checked; the job would go on with the reason in its metrics."""
    vocab = int(student.config.vocab_size)
    bad = Encoded([[vocab + 5, vocab + 6]] * 2, None, [0, 1], [0, 1])
    warnings: list[str] = []
    report = export_report(student, bad, 0, tmp_path, ExportSpec(), 8, warnings.append)
    assert set(report) == {"error"}
    assert "index out of range" in report["error"].lower()
    assert len(warnings) == 1
    assert list(tmp_path.iterdir()) == []
    assert not student.training  # left in eval mode, as it came


def test_cnn_students_export_too(
    minilm_classifier: PreTrainedModel, test_rows: Encoded, tmp_path: Path
) -> None:
    torch.manual_seed(0)
    model = cnn_student(words(minilm_classifier), LABELS, kernel_sizes=[2, 3, 5], num_filters=4)
    warnings: list[str] = []
    report = export_report(
        model.eval(), test_rows, 0, tmp_path, ExportSpec(int8=True), 8, warnings.append
    )
    assert warnings == []
    assert report["max_abs_diff_logits"] < 1e-4 and report["prediction_agreement"] == 1.0
    assert report["int8"]["bytes"] < report["bytes"]
    # Other batch sizes than the trace's; padding is masked (the masked max pooling).
    session = ort_session(tmp_path / ONNX_FILE, 2)
    for size in (5, 1):
        expected = predict_logits(model, test_rows, size, 0, CPU)
        assert (ort_logits(session, test_rows, size, 0) - expected).abs().max() < 1e-4


def test_bilstm_students_export_through_their_unpacked_path(
    minilm_classifier: PreTrainedModel, test_rows: Encoded, tmp_path: Path
) -> None:
    """A 2-layer BiLSTM (packed sequences in PyTorch) exports through its pack-free path and
    onnxruntime gives PyTorch's logits on rows of different lengths."""
    model = bilstm_student(words(minilm_classifier), LABELS, hidden_size=8, num_layers=2).eval()
    warnings: list[str] = []
    report = export_report(model, test_rows, 0, tmp_path, ExportSpec(), 8, warnings.append)
    assert warnings == [], warnings
    assert report["max_abs_diff_logits"] < 1e-5 and report["prediction_agreement"] == 1.0
    assert len({len(ids) for ids in test_rows.input_ids}) > 3  # real padding in the batches
    session = ort_session(tmp_path / ONNX_FILE, 1)
    for size in (1, 5):
        expected = predict_logits(model, test_rows, size, 0, CPU)
        assert (ort_logits(session, test_rows, size, 0) - expected).abs().max() < 1e-5


def test_the_unpacked_bilstm_layer_equals_the_packed_one() -> None:
    """bidirectional_unpacked against nn.LSTM on packed sequences: outputs (zero padding
    included) and the final states, rows of lengths 1..T in any order."""
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(6, 5, batch_first=True, bidirectional=True)
    lengths = torch.tensor([3, 7, 1, 5])
    x = torch.randn(4, 7, 6) * (torch.arange(7) < lengths[:, None]).unsqueeze(-1)
    packed = torch.nn.utils.rnn.pack_padded_sequence(
        x, lengths, batch_first=True, enforce_sorted=False
    )
    out, (h_n, _) = lstm(packed)
    expected, _ = torch.nn.utils.rnn.pad_packed_sequence(out, batch_first=True, total_length=7)
    got, last = bidirectional_unpacked(lstm, x, lengths)
    assert (got - expected).abs().max() < 1e-6
    assert (last - torch.cat([h_n[0], h_n[1]], dim=-1)).abs().max() < 1e-6
    rolled = roll_rows(x, 7 - lengths)  # left padded: row 0's 3 tokens at the end
    assert torch.equal(rolled[0, 4:], x[0, :3]) and torch.equal(rolled[1], x[1])
    assert torch.equal(roll_rows(rolled, lengths), x)


def words(teacher: PreTrainedModel) -> torch.Tensor:
    weight = teacher.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return weight


# --- the spec -------------------------------------------------------------------------------

BODY: dict[str, Any] = {
    "teacher": "builtin:minilm-l6",
    "method": {"name": "vanilla_kd"},
    "dataset": {"source": "builtin:rotten_tomatoes"},
}


def test_export_defaults_to_onnx_without_int8() -> None:
    spec = JobSpec.model_validate(BODY)
    assert spec.export == ExportSpec(onnx=True, int8=False)
    assert spec.model_dump(mode="json")["export"] == {
        "onnx": True,
        "int8": False,
        "latency": True,
        "report": True,
    }


def test_int8_without_onnx_names_the_field() -> None:
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate({**BODY, "export": {"onnx": False, "int8": True}})
    [error] = e.value.errors()
    assert error["loc"] == ("export", "int8")
    assert "needs export.onnx true" in error["msg"]


def test_bad_export_values_name_their_field() -> None:
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate({**BODY, "export": {"onnx": "sometimes"}})
    assert [err["loc"] for err in e.value.errors()] == [("export", "onnx")]
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate({**BODY, "export": {"onxx": True}})
    [error] = e.value.errors()
    assert error["loc"] == ("export", "onxx")
    assert unknown_field_reason(JobSpec, error["loc"]) == (
        "unknown field 'onxx' in export; valid fields: onnx, int8, latency, report"
    )


def test_export_settings_do_not_change_the_checkpoint_hash() -> None:
    """They act after training: a checkpoint resumes whatever they are (and one written before
    the section existed keeps its hash)."""
    plain = JobSpec.model_validate(BODY)
    other = JobSpec.model_validate({**BODY, "export": {"int8": True}})
    assert spec_hash(plain) == spec_hash(other)
    assert spec_hash(plain) != spec_hash(JobSpec.model_validate({**BODY, "training": {"seed": 1}}))


def test_onnxruntime_is_importable_for_workers() -> None:
    """A project dependency now (workers export): the CPU provider is there."""
    assert "CPUExecutionProvider" in onnxruntime.get_available_providers()
