"""BiLSTM and CNN students: shapes, padding, save/load, embeddings from the teacher, the job spec,
the architecture check, and whole jobs through run_job (real MiniLM-L6 teacher, CPU, tiny)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kd_engine import registry
from kd_engine.data import TransferSet
from kd_engine.data.batching import collate, encode
from kd_engine.errors import SpecError
from kd_engine.evaluation import count_parameters, model_inputs
from kd_engine.export import save_student
from kd_engine.methods.base import (
    LossResult,
    Method,
    Needs,
    StepOutputs,
    check_student_architecture,
)
from kd_engine.methods.finetune import Finetune, FinetuneConfig
from kd_engine.methods.vanilla_kd import VanillaKD, VanillaKDConfig
from kd_engine.models.shapes import ModelShape, planned_student_shape, shape_from_config
from kd_engine.models.text_students import (
    BILSTM_MODEL_TYPE,
    CNN_MODEL_TYPE,
    BiLSTMForSequenceClassification,
    KimCNNForSequenceClassification,
    bilstm_student,
    cnn_student,
)
from kd_engine.onnx_export import ONNX_FILE
from kd_engine.run import RunResult, run_job
from kd_engine.spec import BiLSTMStudent, CNNStudent, JobSpec, TrainingSpec
from kd_engine.trainer import train

CPU = torch.device("cpu")
LABELS = ["rotten", "fresh"]
SENTENCES = ["a gripping , funny film .", "dull .", "the plot never quite comes together here ."]


def words(teacher: PreTrainedModel) -> torch.Tensor:
    weight = teacher.get_input_embeddings().weight
    assert isinstance(weight, torch.Tensor)
    return weight


def small_students(teacher: PreTrainedModel) -> list[PreTrainedModel]:
    torch.manual_seed(0)
    return [
        bilstm_student(words(teacher), LABELS, hidden_size=8, num_layers=2, dropout=0.1),
        cnn_student(words(teacher), LABELS, kernel_sizes=[2, 3, 5], num_filters=4),
    ]


def batch(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> dict[str, torch.Tensor]:
    enc = tokenizer(texts, padding=True, return_tensors="pt")
    return {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}


# --- the job spec ---------------------------------------------------------------------------


def test_student_specs_default_to_the_papers() -> None:
    assert BiLSTMStudent() == BiLSTMStudent(hidden_size=300, num_layers=1, dropout=0.1)
    assert CNNStudent() == CNNStudent(kernel_sizes=[3, 4, 5], num_filters=100, dropout=0.5)
    body: dict[str, Any] = {
        "teacher": "builtin:minilm-l6",
        "method": {"name": "vanilla_kd"},
        "dataset": {"source": "builtin:rotten_tomatoes"},
    }
    spec = JobSpec.model_validate({**body, "student": {"type": "bilstm", "hidden_size": 64}})
    assert spec.student == BiLSTMStudent(hidden_size=64)
    spec = JobSpec.model_validate({**body, "student": {"type": "cnn", "kernel_sizes": [2]}})
    assert spec.student == CNNStudent(kernel_sizes=[2])


@pytest.mark.parametrize(
    "student",
    [
        {"type": "bilstm", "hidden_size": 0},
        {"type": "bilstm", "dropout": 1.0},
        {"type": "bilstm", "heads": 2},
        {"type": "cnn", "kernel_sizes": []},
        {"type": "cnn", "kernel_sizes": [3, 0]},
        {"type": "cnn", "num_filters": 0},
    ],
)
def test_bad_student_specs_are_rejected_naming_the_student(student: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(
            {
                "teacher": "builtin:minilm-l6",
                "method": {"name": "vanilla_kd"},
                "dataset": {"source": "builtin:rotten_tomatoes"},
                "student": student,
            }
        )
    assert all(e["loc"][0] == "student" for e in info.value.errors())


# --- the models -----------------------------------------------------------------------------


def test_embeddings_start_as_a_copy_of_the_teachers(minilm_classifier: PreTrainedModel) -> None:
    teacher_words = words(minilm_classifier)
    for student in small_students(minilm_classifier):
        own = student.get_input_embeddings().weight
        assert isinstance(own, torch.Tensor)
        assert torch.equal(own, teacher_words)
        assert own.data_ptr() != teacher_words.data_ptr()  # a copy: training leaves the teacher


def test_logits_and_hidden_states_with_padding(
    minilm_classifier: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    inputs = batch(tokenizer, SENTENCES)
    b, t = inputs["input_ids"].shape
    mask = inputs["attention_mask"].bool()
    assert not mask.all()  # the batch has padding
    lstm, cnn = small_students(minilm_classifier)
    widths = {id(lstm): [384, 16, 16], id(cnn): [384, 12]}
    for model in (lstm, cnn):
        model.eval()
        out = model(**inputs, output_hidden_states=True, output_attentions=True)
        assert out.logits.shape == (b, 2)
        assert out.attentions is None
        assert [tuple(h.shape) for h in out.hidden_states] == [(b, t, d) for d in widths[id(model)]]
        for h in out.hidden_states:
            assert torch.all(h[~mask] == 0)  # padding positions are zero
        plain = model(**inputs)
        assert plain.hidden_states is None
        assert torch.equal(plain.logits, out.logits)


def test_padding_does_not_change_the_logits(
    minilm_classifier: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    padded = batch(tokenizer, SENTENCES)
    for model in small_students(minilm_classifier):
        model.eval()
        together = model(**padded).logits
        for i, text in enumerate(SENTENCES):
            alone = model(**batch(tokenizer, [text])).logits
            assert torch.allclose(alone[0], together[i], atol=1e-5), (type(model).__name__, i)


def test_labels_give_the_cross_entropy_and_tuples_without_return_dict(
    minilm_classifier: PreTrainedModel, tokenizer: PreTrainedTokenizerBase
) -> None:
    inputs = batch(tokenizer, SENTENCES)
    labels = torch.tensor([1, 0, 0])
    for model in small_students(minilm_classifier):
        model.eval()
        out = model(**inputs, labels=labels)
        expected = -torch.log_softmax(out.logits, -1)[torch.arange(3), labels].mean()
        assert torch.allclose(out.loss, expected)
        loss, logits = model(**inputs, labels=labels, return_dict=False)
        assert torch.equal(logits, out.logits) and torch.equal(loss, out.loss)


def test_save_and_load_round_trip(
    minilm_classifier: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, tmp_path: Path
) -> None:
    inputs = batch(tokenizer, SENTENCES)
    for model, model_type, cls in zip(
        small_students(minilm_classifier),
        [BILSTM_MODEL_TYPE, CNN_MODEL_TYPE],
        [BiLSTMForSequenceClassification, KimCNNForSequenceClassification],
        strict=True,
    ):
        out = tmp_path / model_type
        save_student(model, tokenizer, out)
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= {
            p.name for p in out.iterdir()
        }
        assert not list(out.glob("*.bin"))
        config = json.loads((out / "config.json").read_text())
        assert config["model_type"] == model_type
        assert config["id2label"] == {"0": "rotten", "1": "fresh"}
        assert AutoConfig.from_pretrained(out).model_type == model_type
        loaded, info = AutoModelForSequenceClassification.from_pretrained(
            out, output_loading_info=True
        )
        assert type(loaded) is cls
        assert not info["missing_keys"] and not info["unexpected_keys"]
        model.eval()
        loaded.eval()
        assert torch.equal(loaded(**inputs).logits, model(**inputs).logits)
        reloaded_tokenizer = AutoTokenizer.from_pretrained(out)
        assert reloaded_tokenizer(SENTENCES[0])["input_ids"] == tokenizer(SENTENCES[0])["input_ids"]


def test_parameter_count(minilm_classifier: PreTrainedModel) -> None:
    lstm, cnn = small_students(minilm_classifier)
    vocab, e = words(minilm_classifier).shape
    # Embeddings; 2 layers x 2 directions x (4H x in + 4H x H + 2 x 4H); fc 16->8; out 8->2.
    h = 8
    per_direction = [4 * h * (e + h + 2), 4 * h * (2 * h + h + 2)]
    expected_lstm = vocab * e + 2 * sum(per_direction) + (16 * 8 + 8) + (8 * 2 + 2)
    assert count_parameters(lstm) == expected_lstm
    # Embeddings; convolutions of widths 2, 3, 5 with 4 maps; out 12 -> 2.
    expected_cnn = vocab * e + sum(4 * e * k + 4 for k in (2, 3, 5)) + (12 * 2 + 2)
    assert count_parameters(cnn) == expected_cnn


# --- shapes and the architecture check ------------------------------------------------------


def test_shapes_of_the_students_are_not_transformers(minilm_classifier: PreTrainedModel) -> None:
    teacher = shape_from_config(minilm_classifier.config.to_dict(), 2)
    assert teacher == ModelShape(6, 384, 2, 12, transformer=True)
    lstm, cnn = small_students(minilm_classifier)
    planned_lstm = planned_student_shape(BiLSTMStudent(hidden_size=8, num_layers=2), teacher, None)
    assert planned_lstm == ModelShape(2, 16, 2, None, transformer=False)
    assert shape_from_config(lstm.config.to_dict(), 2) == planned_lstm
    planned_cnn = planned_student_shape(
        CNNStudent(kernel_sizes=[2, 3, 5], num_filters=4), teacher, None
    )
    assert planned_cnn == ModelShape(1, 12, 2, None, transformer=False)
    assert shape_from_config(cnn.config.to_dict(), 2) == planned_cnn
    assert planned_student_shape(BiLSTMStudent(), teacher).hidden_size == 600
    assert planned_student_shape(CNNStudent(), teacher).hidden_size == 300


class TokenAlignedMethod(Method):
    """A method such as pkd or tinybert (hidden states / attentions token by token); the flags
    are set per subclass by :func:`token_aligned`."""

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        return LossResult(total=student.logits.sum())


def token_aligned(hidden: bool, attentions: bool) -> type[Method]:
    flags = {"needs": Needs(hidden_states=hidden, attentions=attentions)}
    return type("TokenAligned", (TokenAlignedMethod,), flags)


def test_architecture_check_rejects_token_aligned_methods_for_text_students() -> None:
    lstm = ModelShape(1, 600, 2, transformer=False)
    cnn = ModelShape(1, 300, 2, transformer=False)
    bert = ModelShape(2, 384, 2, 12)
    for hidden, attentions in [(True, False), (False, True), (True, True)]:
        method = token_aligned(hidden, attentions)
        for student in (lstm, cnn):
            with pytest.raises(SpecError, match=r"^student: pkd_like .*universal_kd") as info:
                check_student_architecture(method, "pkd_like", student)
            assert info.value.field == "student"
            assert "not a transformer" in info.value.reason
        check_student_architecture(method, "pkd_like", bert)  # a transformer student is fine
    universal = registry.get("universal_kd").method_cls
    assert universal.needs.hidden_states and universal.any_student_architecture
    for cls in (universal, VanillaKD, Finetune):
        for student in (lstm, cnn, bert):
            check_student_architecture(cls, "any", student)


# --- training -------------------------------------------------------------------------------


def test_vanilla_kd_training_steps_lower_the_loss(
    minilm_classifier: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rotten_tomatoes: TransferSet,
) -> None:
    enc = encode(rotten_tomatoes.train[:8], tokenizer, 32)
    inputs = collate(enc, list(range(8)), int(tokenizer.pad_token_id or 0))
    labels = inputs["labels"]
    with torch.inference_mode():
        teacher = StepOutputs(minilm_classifier(**model_inputs(inputs, CPU)).logits)
    shape = ModelShape(2, 384, 2, 12)  # vanilla_kd reads no shapes
    method = VanillaKD(VanillaKDConfig(alpha=0.5, temperature=2.0), shape, shape)
    for model in small_students(minilm_classifier):
        model.train()
        # The (large) embedding matrix stays fixed here to keep the test fast.
        model.get_input_embeddings().requires_grad_(False)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.Adam(trainable, lr=1e-2)
        losses = []
        for _ in range(8):
            out = model(**model_inputs(inputs, CPU))
            res = method.loss(StepOutputs(out.logits), teacher, labels, inputs["attention_mask"])
            optimizer.zero_grad()
            res.total.backward()
            optimizer.step()
            losses.append(float(res.total.detach()))
        assert losses[-1] < losses[0], (type(model).__name__, losses)


DATASET = {"source": "builtin:rotten_tomatoes", "max_train_examples": 32, "max_eval_examples": 16}
TRAINING = {"epochs": 1, "batch_size": 16, "max_seq_length": 32, "device": "cpu"}


def no_files(ref: str) -> Path:
    raise ValueError(f"no file references in these tests: {ref!r}")


@pytest.fixture(scope="module")
def teacher_dir(
    tmp_path_factory: pytest.TempPathFactory,
    minilm_path: Path,
    tokenizer: PreTrainedTokenizerBase,
    rotten_tomatoes: TransferSet,
) -> Path:
    """A tiny finetuned MiniLM-L6 classifier (two steps of our trainer on real data), saved
    as a job would save it: the teacher of the jobs below."""
    from kd_engine.models.loading import load_classifier

    torch.manual_seed(0)
    model = load_classifier(minilm_path, rotten_tomatoes.label_names)
    train_enc = encode(rotten_tomatoes.train[:32], tokenizer, 32)
    dev_enc = encode(rotten_tomatoes.dev[:8], tokenizer, 32)
    cfg = TrainingSpec(epochs=1, batch_size=16, max_seq_length=32, device="cpu")
    shape = ModelShape(2, 384, 2, 12)  # finetune reads no shapes
    train(model, None, Finetune(FinetuneConfig(), shape, shape), train_enc, dev_enc, cfg, 0, CPU)
    out = tmp_path_factory.mktemp("teacher")
    save_student(model, tokenizer, out)
    return out


@pytest.mark.parametrize(
    ("method", "student", "model_type"),
    [
        ({"name": "vanilla_kd"}, {"type": "cnn", "num_filters": 8}, CNN_MODEL_TYPE),
        (
            {"name": "universal_kd", "probe_steps": 1},
            {"type": "bilstm", "hidden_size": 16, "num_layers": 2},
            BILSTM_MODEL_TYPE,
        ),
        ({"name": "universal_kd", "probe_steps": 2}, {"num_layers": 2}, "bert"),
    ],
    ids=["vanilla_kd-cnn", "universal_kd-bilstm", "universal_kd-bert2"],
)
def test_jobs_with_text_students_run_end_to_end(
    method: dict[str, Any],
    student: dict[str, Any],
    model_type: str,
    teacher_dir: Path,
    tmp_path: Path,
) -> None:
    spec = JobSpec.model_validate(
        {
            "teacher": "job:teacher",
            "student": student,
            "method": method,
            "dataset": DATASET,
            "training": TRAINING,
            "export": {"report": False},  # the latency and ONNX export are checked below
        }
    )
    result: RunResult = run_job(spec, teacher_dir, no_files, tmp_path)
    m = result.metrics
    assert m["method"] == method["name"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == model_type
    assert config["id2label"] == {"0": "rotten", "1": "fresh"}
    losses = m["epochs"][0]["train_losses"]
    expected = {"loss", "ce", "kd"} | ({"ukd"} if "universal" in method["name"] else set())
    assert expected <= losses.keys()
    assert all(math.isfinite(v) for v in losses.values())
    # Size and speed of the exported student, which plain transformers loads in this process.
    assert m["student"]["parameters"] < m["teacher"]["parameters"]
    assert m["student"]["bytes"] == (tmp_path / "model.safetensors").stat().st_size
    assert m["student"]["latency_s_batch1"] > 0 and m["student"]["latency_s_batch32"] > 0
    # ONNX: every student (BiLSTM through its pack-free path) is exported and matches PyTorch.
    assert m["onnx"]["max_abs_diff_logits"] < 1e-4
    assert (tmp_path / ONNX_FILE).stat().st_size == m["onnx"]["bytes"]
    assert m["warnings"] == []
    loaded = AutoModelForSequenceClassification.from_pretrained(tmp_path)
    assert count_parameters(loaded) == m["student"]["parameters"]
    assert (tmp_path / "tokenizer.json").is_file()
