"""The student specs of a job: which model is trained and how it starts.

In their own module (re-exported by :mod:`kd_engine.spec`) so that method settings can name
student specs (the assistants of ``takd``) without importing the job spec, which imports the
method registry to build its union of method settings.
"""

from __future__ import annotations

import itertools
from typing import Annotated, Any, Literal

from pydantic import (
    Discriminator,
    Field,
    Tag,
    field_validator,
    model_validator,
)

from kd_engine.spec_fields import SpecModel


class _Strict(SpecModel):
    """Base of the spec sections: see :class:`kd_engine.spec_fields.SpecModel`."""


def _check_layer_indices(v: list[int] | None) -> list[int] | None:
    """A chosen layer list: 0-based, strictly increasing (a field validator's body).

    Raises:
        ValueError: a negative index, or indices not strictly increasing.
    """
    if v is None:
        return v
    if any(i < 0 for i in v):
        raise ValueError("layer indices are 0-based and must be >= 0")
    if any(b <= a for a, b in itertools.pairwise(v)):
        raise ValueError("layer indices must be strictly increasing")
    return v


def _check_layer_count(num_layers: int | None, layers: list[int] | None) -> None:
    """``num_layers`` and ``layers``, when both are given, must agree.

    Raises:
        ValueError: ``len(layers) != num_layers``.
    """
    if layers is not None and num_layers is not None and len(layers) != num_layers:
        raise ValueError(f"num_layers is {num_layers} but layers lists {len(layers)}")


class FromTeacherStudent(_Strict):
    """A student that keeps some of the teacher's transformer layers (and its embeddings).

    Attributes:
        num_layers: how many layers to keep; None keeps them all (a full copy, as for finetune).
        layers: which teacher layers (0-based, increasing) initialise the student layers;
            None spaces them evenly: layer floor(i * n / m) for i in 0..m-1 (6 -> 2 keeps 0, 3;
            6 -> 3 keeps 0, 2, 4, as DistilBERT does).
    """

    type: Literal["from_teacher"] = "from_teacher"
    num_layers: int | None = Field(None, ge=1, le=48)
    layers: list[int] | None = Field(None, min_length=1, max_length=48)

    @field_validator("layers")
    @classmethod
    def _increasing(cls, v: list[int] | None) -> list[int] | None:
        return _check_layer_indices(v)

    @model_validator(mode="after")
    def _consistent(self) -> FromTeacherStudent:
        _check_layer_count(self.num_layers, self.layers)
        return self


class FreshStudent(_Strict):
    """A BERT student with a new configuration, randomly initialised (teacher's vocabulary).

    Attributes:
        allow_larger_than_teacher: the API refuses a fresh student with more parameters than
            its teacher (counted from both configs) unless this is true.
    """

    type: Literal["fresh"] = "fresh"
    num_layers: int = Field(ge=1, le=48)
    hidden_size: int = Field(ge=8, le=4096)
    num_heads: int = Field(ge=1, le=64)
    intermediate_size: int = Field(ge=8, le=16384)
    allow_larger_than_teacher: bool = Field(
        False,
        description="Accept a student with more parameters than its teacher (refused "
        "otherwise, with both counts).",
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> FreshStudent:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        return self


class PretrainedStudent(_Strict):
    """A student loaded from its own pretrained checkpoint (a model reference such as
    ``builtin:minilm-l3``), with a new classifier head. It must share the teacher's vocabulary:
    the job tokenises once, with the teacher's tokenizer.

    Its encoder may be cut to some of its layers (embeddings kept, head new), as PKD initialises
    its k-layer students from the first k layers of pre-trained BERT (Sun et al. 2019, "Patient
    Knowledge Distillation for BERT Model Compression"; the authors' intersun/PKD-for-BERT-Model-
    Compression src/utils.py ``load_model``, mode "student", keeps the checkpoint's keys that the
    k-layer model has: layers 0..k-1), and as the ALP-KD and RAIL-KD experiments do.

    Attributes:
        model: the model reference.
        num_layers: how many of its layers to keep; with ``layers`` None, the FIRST
            ``num_layers`` (PKD's choice). None (and ``layers`` None) keeps the whole encoder.
        layers: which of its layers (0-based, strictly increasing) initialise the student
            layers, in order.
    """

    type: Literal["pretrained"] = "pretrained"
    model: str = Field(min_length=1, max_length=2048, description="Model reference.")
    num_layers: int | None = Field(None, ge=1, le=48)
    layers: list[int] | None = Field(None, min_length=1, max_length=48)

    @field_validator("layers")
    @classmethod
    def _increasing(cls, v: list[int] | None) -> list[int] | None:
        return _check_layer_indices(v)

    @model_validator(mode="after")
    def _consistent(self) -> PretrainedStudent:
        _check_layer_count(self.num_layers, self.layers)
        return self


class BiLSTMStudent(_Strict):
    """A BiLSTM text classifier (Tang et al. 2019, "Distilling Task-Specific Knowledge from BERT
    into Simple Neural Networks"): the teacher's tokenizer, word embeddings initialised from the
    teacher's, a bidirectional LSTM, the last states of both directions into a ReLU layer and the
    output layer. Not a transformer: methods that match transformer states token by token are
    rejected for it (``universal_kd`` and output-only methods work).

    Attributes:
        hidden_size: LSTM units per direction (the paper's 300).
        num_layers: stacked bidirectional LSTM layers.
        dropout: dropout on the embeddings, between LSTM layers and in the classifier.
    """

    type: Literal["bilstm"] = "bilstm"
    hidden_size: int = Field(300, ge=1, le=4096)
    num_layers: int = Field(1, ge=1, le=8)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)


class CNNStudent(_Strict):
    """A CNN text classifier (Kim 2014, "Convolutional Neural Networks for Sentence
    Classification"): the teacher's tokenizer, word embeddings initialised from the teacher's,
    parallel convolutions of several widths with ReLU, max-over-time pooling, dropout and the
    output layer. Not a transformer (see :class:`BiLSTMStudent`).

    Attributes:
        kernel_sizes: convolution widths in tokens (the paper's 3, 4, 5).
        num_filters: feature maps per width (the paper's 100).
        dropout: dropout before the output layer (the paper's 0.5).
    """

    type: Literal["cnn"] = "cnn"
    kernel_sizes: list[int] = Field(default_factory=lambda: [3, 4, 5], min_length=1, max_length=16)
    num_filters: int = Field(100, ge=1, le=4096)
    dropout: float = Field(0.5, ge=0.0, lt=1.0)

    @field_validator("kernel_sizes")
    @classmethod
    def _widths(cls, v: list[int]) -> list[int]:
        if any(not 1 <= k <= 64 for k in v):
            raise ValueError("kernel sizes must be between 1 and 64 tokens")
        return v


def _student_type(value: Any) -> str:
    """``type`` of a student spec; ``from_teacher`` when omitted."""
    if isinstance(value, dict):
        return str(value.get("type", "from_teacher"))
    return str(getattr(value, "type", "from_teacher"))


StudentSpec = Annotated[
    Annotated[FromTeacherStudent, Tag("from_teacher")]
    | Annotated[FreshStudent, Tag("fresh")]
    | Annotated[PretrainedStudent, Tag("pretrained")]
    | Annotated[BiLSTMStudent, Tag("bilstm")]
    | Annotated[CNNStudent, Tag("cnn")],
    Discriminator(_student_type),
]
