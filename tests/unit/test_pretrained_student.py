"""The built-in pretrained 3-layer student (paraphrase-MiniLM-L3-v2, mapped from ONNX)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertModel

from kd_engine.models.onnx_import import onnx_bert_state_dict
from kd_engine.models.shapes import ModelShape, planned_student_shape
from kd_engine.references import BUILTIN_MODELS, builtin_model_path, wheel_path
from kd_engine.run import run_job
from kd_engine.spec import JobSpec, PretrainedStudent

TRAINING = {"epochs": 1, "batch_size": 16, "max_seq_length": 32, "device": "cpu"}
DATASET = {"source": "builtin:rotten_tomatoes", "max_train_examples": 48, "max_eval_examples": 32}


def no_files(ref: str) -> Path:
    raise ValueError(ref)


@pytest.fixture(scope="module")
def l3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return builtin_model_path("minilm-l3", tmp_path_factory.mktemp("cache"))


def test_conversion_writes_a_checkpoint_once(l3_dir: Path) -> None:
    names = {p.name for p in l3_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt"} <= names
    mtime = (l3_dir / "model.safetensors").stat().st_mtime_ns
    again = builtin_model_path("minilm-l3", l3_dir.parent.parent)
    assert again == l3_dir
    assert (l3_dir / "model.safetensors").stat().st_mtime_ns == mtime  # not converted twice


def test_every_onnx_weight_is_mapped_to_a_bert_parameter() -> None:
    onnx_path = wheel_path(*BUILTIN_MODELS["minilm-l3"])
    state = onnx_bert_state_dict(onnx_path, "model.0.auto_model.")
    model = BertModel.from_pretrained(builtin_model_path("minilm-l6"), add_pooling_layer=False)
    expected = {
        f"bert.{k}"
        for k in model.state_dict()
        if "layer.3" not in k
        and "layer.4" not in k
        and "layer.5" not in k
        and "position_ids" not in k
    }
    assert set(state) == expected
    for key, tensor in state.items():
        assert tuple(tensor.shape) == tuple(model.state_dict()[key.removeprefix("bert.")].shape)


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime") is None, reason="needs onnxruntime")
def test_converted_model_computes_what_the_onnx_model_computes(l3_dir: Path) -> None:
    import onnxruntime as ort

    tok = AutoTokenizer.from_pretrained(l3_dir)
    model = BertModel.from_pretrained(l3_dir, add_pooling_layer=False).eval()
    enc = tok(
        ["a good movie", "what a dull and overlong film it was"], padding=True, return_tensors="np"
    )
    session = ort.InferenceSession(str(wheel_path(*BUILTIN_MODELS["minilm-l3"])))
    (expected,) = session.run(
        ["onnx::Shape_422"],  # the export's last hidden state, (B, T, 384)
        {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask")},
    )
    with torch.inference_mode():
        got = model(**{k: torch.tensor(v) for k, v in enc.items()}).last_hidden_state.numpy()
    assert got.shape == expected.shape == (2, enc["input_ids"].shape[1], 384)
    assert np.abs(got - expected).max() < 1e-4


def test_planned_shape_of_a_pretrained_student() -> None:
    teacher = ModelShape(6, 384, 2, 12)
    shape = planned_student_shape(
        PretrainedStudent(model="builtin:minilm-l3"),
        teacher,
        {"num_hidden_layers": 3, "hidden_size": 384, "num_attention_heads": 12},
    )
    assert shape == ModelShape(3, 384, 2, 12)
    with pytest.raises(ValueError, match=r"student\.model"):
        planned_student_shape(PretrainedStudent(model="builtin:minilm-l3"), teacher)


def spec(**overrides: Any) -> JobSpec:
    body: dict[str, Any] = {
        "teacher": "builtin:minilm-l6",
        "method": {"name": "finetune"},
        "dataset": DATASET,
        "training": TRAINING,
    }
    return JobSpec.model_validate({**body, **overrides})


def test_vanilla_kd_into_the_pretrained_student(l3_dir: Path, tmp_path: Path) -> None:
    teacher_dir = tmp_path / "teacher"
    run_job(spec(), builtin_model_path("minilm-l6"), no_files, teacher_dir)
    kd = spec(
        teacher="job:t",
        student={"type": "pretrained", "model": "builtin:minilm-l3"},
        method={"name": "vanilla_kd"},
    )
    result = run_job(kd, teacher_dir, no_files, tmp_path / "student", student_path=l3_dir)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "student")
    assert model.config.num_hidden_layers == 3
    assert model.config.id2label == {0: "rotten", 1: "fresh"}
    assert result.metrics["student"]["parameters"] < result.metrics["teacher"]["parameters"]
    # the student's encoder started from the L3 weights, not from the teacher's layers
    l3 = BertModel.from_pretrained(l3_dir, add_pooling_layer=False)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    q = model.bert.encoder.layer[0].attention.self.query.weight.detach()
    to_l3 = (q - l3.encoder.layer[0].attention.self.query.weight.detach()).norm()
    to_teacher = (q - teacher.bert.encoder.layer[0].attention.self.query.weight.detach()).norm()
    assert to_l3 < 0.1 * to_teacher


def test_a_pretrained_student_needs_its_path(tmp_path: Path) -> None:
    kd = spec(student={"type": "pretrained", "model": "builtin:minilm-l3"})
    with pytest.raises(ValueError, match=r"student\.model"):
        run_job(kd, builtin_model_path("minilm-l6"), no_files, tmp_path)
