"""The built-in pretrained 3-layer student (paraphrase-MiniLM-L3-v2, mapped from ONNX)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, BertModel

from kd_engine.models.onnx_import import onnx_bert_state_dict
from kd_engine.models.shapes import ModelShape, planned_student_shape
from kd_engine.models.text_students import BILSTM_MODEL_TYPE
from kd_engine.references import BUILTIN_MODELS, builtin_model_path, wheel_path
from kd_engine.run import run_job
from kd_engine.spec import JobSpec, PretrainedStudent
from tests.checks import NO_EXTRAS

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


def test_planned_shape_of_a_cut_pretrained_student(minilm_path: Path) -> None:
    teacher = ModelShape(6, 384, 2, 12)
    config = json.loads((minilm_path / "config.json").read_text())  # all-MiniLM-L6-v2: 6 layers

    def planned(**choice: Any) -> ModelShape:
        student = PretrainedStudent.model_validate({"model": "builtin:minilm-l6", **choice})
        return planned_student_shape(student, teacher, config)

    assert planned() == ModelShape(6, 384, 2, 12)
    assert planned(num_layers=2) == ModelShape(2, 384, 2, 12)
    assert planned(layers=[0, 1]) == ModelShape(2, 384, 2, 12)
    assert planned(layers=[1, 3, 5]) == ModelShape(3, 384, 2, 12)
    with pytest.raises(ValueError, match=r"^student\.layers: index 6 is out of range"):
        planned(layers=[2, 6])
    with pytest.raises(ValueError, match=r"^student\.num_layers: 7 is more than"):
        planned(num_layers=7)
    bilstm = {"model_type": BILSTM_MODEL_TYPE, "num_hidden_layers": 1, "hidden_size": 8}
    student = PretrainedStudent(model="job:x", num_layers=1)
    with pytest.raises(ValueError, match=r"^student\.num_layers: only a transformer"):
        planned_student_shape(student, teacher, bilstm)


def spec(**overrides: Any) -> JobSpec:
    body: dict[str, Any] = {
        "teacher": "builtin:minilm-l6",
        "method": {"name": "finetune"},
        "dataset": DATASET,
        "training": TRAINING,
        "export": NO_EXTRAS,  # exported and checked in test_onnx_export / test_run_job
    }
    return JobSpec.model_validate({**body, **overrides})


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM-L6 fine-tuned briefly on rotten_tomatoes (its layers have left the pretrained
    weights)."""
    out = tmp_path_factory.mktemp("teacher")
    run_job(spec(), builtin_model_path("minilm-l6"), no_files, out)
    return out


def test_vanilla_kd_into_the_pretrained_student(
    l3_dir: Path, teacher_dir: Path, tmp_path: Path
) -> None:
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


def test_pkd_into_the_first_layers_of_the_pretrained_encoder(
    minilm_path: Path, teacher_dir: Path, tmp_path: Path
) -> None:
    # PKD's initialisation: the student is pre-trained MiniLM-L6 cut to 2 of its layers (the
    # first 2 by default; an explicit choice is tested in test_student_models.py), not the
    # fine-tuned teacher's layers. A learning rate of 1e-12 leaves the weights where they
    # started (to ~1e-11), so the export shows the initialisation.
    kd = spec(
        teacher="job:t",
        student={"type": "pretrained", "model": "builtin:minilm-l6", "num_layers": 2},
        method={"name": "pkd"},
        training={**TRAINING, "learning_rate": 1e-12, "max_steps": 1},
    )
    out = tmp_path / "student"
    result = run_job(kd, teacher_dir, no_files, out, student_path=minilm_path)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_hidden_layers == 2
    assert len(model.bert.encoder.layer) == 2
    assert result.metrics["student"]["parameters"] < result.metrics["teacher"]["parameters"]
    pretrained = BertModel.from_pretrained(minilm_path)
    teacher = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    for i, j in enumerate([0, 1]):
        s_state = model.bert.encoder.layer[i].state_dict()
        p_state = pretrained.encoder.layer[j].state_dict()
        t_state = teacher.bert.encoder.layer[j].state_dict()
        for key, value in s_state.items():
            torch.testing.assert_close(value, p_state[key], rtol=0, atol=1e-9)
        # ...and not the teacher's: fine-tuning moved every layer's weights well beyond that
        to_teacher = max((s_state[k] - t_state[k]).abs().max() for k in s_state)
        assert to_teacher > 1e-6
    torch.testing.assert_close(
        model.bert.embeddings.word_embeddings.weight,
        pretrained.embeddings.word_embeddings.weight,
        rtol=0,
        atol=1e-9,
    )
    # a new head, not the teacher's trained one
    assert model.classifier.weight.shape == teacher.classifier.weight.shape == (2, 384)
    assert (model.classifier.weight - teacher.classifier.weight).abs().max() > 1e-6


def test_the_engine_rejects_pretrained_layers_out_of_range(
    minilm_path: Path, tmp_path: Path
) -> None:
    for choice, field in (
        ({"layers": [0, 6]}, "student.layers"),
        ({"num_layers": 7}, "student.num_layers"),
    ):
        kd = spec(student={"type": "pretrained", "model": "builtin:minilm-l6", **choice})
        with pytest.raises(ValueError, match=rf"^{field.replace('.', '[.]')}: .*6 layers"):
            run_job(kd, minilm_path, no_files, tmp_path / field, student_path=minilm_path)


def test_a_pretrained_student_needs_its_path(tmp_path: Path) -> None:
    kd = spec(student={"type": "pretrained", "model": "builtin:minilm-l3"})
    with pytest.raises(ValueError, match=r"student\.model"):
        run_job(kd, builtin_model_path("minilm-l6"), no_files, tmp_path)
