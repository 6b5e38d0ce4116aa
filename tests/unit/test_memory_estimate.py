"""The training memory estimate (kd_engine.memory): parameter counts against real models built
by transformers and kd_engine, and the byte formulas against hand-computed values."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, BertConfig, BertForSequenceClassification

from kd_engine import memory
from kd_engine.memory import ModelSize, estimate_training_memory, over_budget
from kd_engine.models.text_students import bilstm_student, cnn_student
from kd_engine.references import builtin_model_path
from kd_engine.spec import BiLSTMStudent, CNNStudent, FreshStudent, FromTeacherStudent

GIB = 1024**3


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def minilm_config() -> dict[str, object]:
    config: dict[str, object] = json.loads(
        (builtin_model_path("minilm-l6") / "config.json").read_text()
    )
    return config


def test_transformer_parameters_match_the_real_minilm_and_bert_base() -> None:
    real = n_params(AutoModel.from_pretrained(builtin_model_path("minilm-l6")))
    assert memory.transformer_parameters(30522, 384, 6, 1536, 512, 2, num_labels=0) == real
    # bert-base-uncased with its pooler: 109,482,240 (its published count)
    assert memory.transformer_parameters(30522, 768, 12, 3072, 512, 2, 0) == 109_482_240


def test_teacher_and_fresh_student_sizes_match_built_models() -> None:
    config = minilm_config()
    teacher = memory.teacher_size(config, 3)
    built = BertForSequenceClassification(BertConfig(**{**config, "num_labels": 3}))
    assert teacher.parameters == n_params(built)
    assert (teacher.num_layers, teacher.hidden_size, teacher.num_heads) == (6, 384, 12)

    fresh = FreshStudent(num_layers=2, hidden_size=64, num_heads=4, intermediate_size=128)
    size = memory.student_size(fresh, config, None, 3)
    cfg = BertConfig(
        vocab_size=30522, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=128, max_position_embeddings=512, num_labels=3,
    )  # fmt: skip
    assert size.parameters == n_params(BertForSequenceClassification(cfg))

    cut = memory.student_size(FromTeacherStudent(num_layers=2), config, None, 3)
    two = BertForSequenceClassification(
        BertConfig(**{**config, "num_hidden_layers": 2, "num_labels": 3})
    )
    assert cut.parameters == n_params(two)


def test_bilstm_and_cnn_sizes_match_built_models() -> None:
    config = minilm_config()
    words = torch.zeros(30522, 384)
    lstm = BiLSTMStudent(hidden_size=32, num_layers=2)
    built = bilstm_student(words, ["a", "b"], hidden_size=32, num_layers=2)
    assert memory.student_size(lstm, config, None, 2).parameters == n_params(built)
    cnn = CNNStudent(kernel_sizes=[2, 3], num_filters=8)
    built_cnn = cnn_student(words, ["a", "b", "c"], kernel_sizes=[2, 3], num_filters=8)
    assert memory.student_size(cnn, config, None, 3).parameters == n_params(built_cnn)


SMALL = ModelSize(parameters=1000, num_layers=1, hidden_size=8, num_heads=2, intermediate_size=16)


def test_layer_activation_bytes_by_hand() -> None:
    # B=2, T=4, d=8, heads=2: 2*4*8*102 + 2*2*4*4*15 = 6528 + 960
    assert memory.layer_activation_bytes(2, 4, SMALL) == 7488
    # no-grad forward: 2 * 4 bytes * (8 tokens * (8 + 16) + 2*2*4*4 scores) = 8 * 256
    assert memory.forward_bytes(2, 4, SMALL) == 2048
    # teacher outputs: 4 bytes * ((1 + 1) * 8 tokens * 8 + 1 * 2*2*4*4) = 4 * 192
    assert memory.teacher_output_bytes(2, 4, SMALL) == 768


def test_estimate_by_hand_without_and_with_a_teacher_forward() -> None:
    teacher = ModelSize(2000, 1, 8, 2, 16)
    alone = estimate_training_memory(teacher, SMALL, 2, 4, 2, teacher_forward=False)
    # activations: one layer 7488 + embeddings 2 * 4 * 2*4 tokens * 8 = 512
    assert alone.activation_bytes == 8000
    assert alone.student_bytes == 16_000  # 1000 parameters * (4 + 4 + 8)
    assert alone.teacher_bytes == 8000  # loaded even when not run: 2000 * 4
    assert alone.runtime_bytes == memory.RUNTIME_BYTES
    assert alone.total_bytes == 8000 + 16_000 + 8000 + memory.RUNTIME_BYTES

    both = estimate_training_memory(teacher, SMALL, 2, 4, 2, teacher_forward=True)
    # + the teacher's outputs (768) and one no-grad layer's working set (2048)
    assert both.activation_bytes == 8000 + 768 + 2048
    assert both.parameter_bytes == 24_000

    # a large evaluation batch makes the evaluation forward the peak
    big_eval = estimate_training_memory(teacher, SMALL, 2, 4, 100, teacher_forward=False)
    assert big_eval.activation_bytes == memory.forward_bytes(100, 4, SMALL) == 102_400


@pytest.mark.parametrize(
    ("teacher_params", "student_params", "batch", "field"),
    [
        (10**12, 1000, 1, "teacher"),
        (1000, 10**11, 1, "student"),
        (1000, 1000, 10**6, "training.batch_size"),
    ],
)
def test_over_budget_names_the_larger_part(
    teacher_params: int, student_params: int, batch: int, field: str
) -> None:
    estimate = estimate_training_memory(
        ModelSize(teacher_params, 1, 8, 2, 16),
        ModelSize(student_params, 1, 8, 2, 16),
        batch_size=batch,
        seq_length=128,
        eval_batch_size=1,
    )
    over = over_budget(estimate, 2 * GIB, "cpu")
    assert over is not None
    assert over[0] == field
    assert f"{estimate.total_bytes / GIB:.1f} GiB" in over[1]
    assert "limit 2.0 GiB of queue cpu" in over[1]
    assert over_budget(estimate, estimate.total_bytes, "cpu") is None
