"""The sizes of a teacher or student that a method needs to check a layer mapping and to build
its projections, known before any weights are loaded."""

from __future__ import annotations

from dataclasses import dataclass

from kd_engine.spec import FreshStudent, FromTeacherStudent, PretrainedStudent


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a classifier.

    Attributes:
        num_layers: transformer layers (hidden states are num_layers + 1: embeddings first).
        hidden_size: d, the width of each hidden state.
        num_labels: C.
        num_heads: attention heads (None for a non-transformer).
        transformer: True when hidden states and attentions are token-aligned transformer
            outputs (False for BiLSTM/CNN students).
    """

    num_layers: int
    hidden_size: int
    num_labels: int
    num_heads: int | None = None
    transformer: bool = True


def _int(config: dict[str, object], key: str, default: int = 0) -> int:
    value = config.get(key, default)
    return int(value) if isinstance(value, int | float | str) else default


def shape_from_config(config: dict[str, object], num_labels: int) -> ModelShape:
    """The shape of a transformers checkpoint from its ``config.json`` dict."""
    return ModelShape(
        num_layers=_int(config, "num_hidden_layers"),
        hidden_size=_int(config, "hidden_size"),
        num_labels=num_labels,
        num_heads=_int(config, "num_attention_heads") or None,
    )


def planned_student_shape(
    student: FromTeacherStudent | FreshStudent | PretrainedStudent,
    teacher: ModelShape,
    student_config: dict[str, object] | None = None,
) -> ModelShape:
    """The shape a student spec will have, from the teacher's shape (and, for a pretrained
    student, its ``config.json`` dict).

    Raises:
        ValueError: a pretrained student without its config.
    """
    if isinstance(student, PretrainedStudent):
        if student_config is None:
            raise ValueError("student.model: the pretrained student's config is needed")
        return shape_from_config(student_config, teacher.num_labels)
    if isinstance(student, FreshStudent):
        return ModelShape(
            student.num_layers, student.hidden_size, teacher.num_labels, student.num_heads
        )
    if student.layers is not None:
        n = len(student.layers)
    else:
        n = student.num_layers or teacher.num_layers
    return ModelShape(n, teacher.hidden_size, teacher.num_labels, teacher.num_heads)
