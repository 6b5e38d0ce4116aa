"""The sizes of a teacher or student that a method needs to check a layer mapping and to build
its projections, known before any weights are loaded."""

from __future__ import annotations

from dataclasses import dataclass, replace

from kd_engine.errors import SpecError
from kd_engine.models.student import resolve_pretrained_layers
from kd_engine.models.text_students import BILSTM_MODEL_TYPE, CNN_MODEL_TYPE
from kd_engine.students_spec import (
    BiLSTMStudent,
    CNNStudent,
    FreshStudent,
    FromTeacherStudent,
    PretrainedStudent,
)


@dataclass(frozen=True)
class ModelShape:
    """Sizes of a classifier.

    Attributes:
        num_layers: transformer layers (hidden states are num_layers + 1: embeddings first);
            for a BiLSTM student its LSTM layers, for a CNN student its one convolution block.
        hidden_size: d, the width of each layer's hidden state (for a BiLSTM 2 x its units per
            direction, for a CNN kernel widths x filters; their embeddings may differ).
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
    """The shape of a transformers checkpoint from its ``config.json`` dict (a BiLSTM or CNN
    student is recognised by its model type and is not a transformer)."""
    model_type = config.get("model_type")
    if model_type == BILSTM_MODEL_TYPE:
        return ModelShape(
            num_layers=_int(config, "num_hidden_layers", 1),
            hidden_size=2 * _int(config, "hidden_size"),
            num_labels=num_labels,
            transformer=False,
        )
    if model_type == CNN_MODEL_TYPE:
        widths = config.get("kernel_sizes")
        n_widths = len(widths) if isinstance(widths, list) else 0
        return ModelShape(
            num_layers=1,
            hidden_size=n_widths * _int(config, "num_filters"),
            num_labels=num_labels,
            transformer=False,
        )
    return ModelShape(
        num_layers=_int(config, "num_hidden_layers"),
        hidden_size=_int(config, "hidden_size"),
        num_labels=num_labels,
        num_heads=_int(config, "num_attention_heads") or None,
    )


def planned_student_shape(
    student: FromTeacherStudent | FreshStudent | PretrainedStudent | BiLSTMStudent | CNNStudent,
    teacher: ModelShape,
    student_config: dict[str, object] | None = None,
) -> ModelShape:
    """The shape a student spec will have, from the teacher's shape (and, for a pretrained
    student, its ``config.json`` dict; cut to its chosen ``layers`` / ``num_layers``).

    Raises:
        SpecError: a pretrained student without its config (``student.model``), or whose
            chosen layers are out of range of its own ("student.layers: ..." /
            "student.num_layers: ..."; see :func:`~kd_engine.models.student.
            resolve_pretrained_layers`).
    """
    if isinstance(student, PretrainedStudent):
        if student_config is None:
            raise SpecError("student.model", "the pretrained student's config is needed")
        shape = shape_from_config(student_config, teacher.num_labels)
        if student.layers is None and student.num_layers is None:
            return shape
        if not shape.transformer:
            field = "student.layers" if student.layers is not None else "student.num_layers"
            raise SpecError(field, "only a transformer's layers can be chosen")
        kept = resolve_pretrained_layers(student, shape.num_layers)
        return replace(shape, num_layers=len(kept))
    if isinstance(student, BiLSTMStudent):
        return ModelShape(
            student.num_layers, 2 * student.hidden_size, teacher.num_labels, transformer=False
        )
    if isinstance(student, CNNStudent):
        width = len(student.kernel_sizes) * student.num_filters
        return ModelShape(1, width, teacher.num_labels, transformer=False)
    if isinstance(student, FreshStudent):
        return ModelShape(
            student.num_layers, student.hidden_size, teacher.num_labels, student.num_heads
        )
    if student.layers is not None:
        n = len(student.layers)
    else:
        n = student.num_layers or teacher.num_layers
    return ModelShape(n, teacher.hidden_size, teacher.num_labels, teacher.num_heads)
