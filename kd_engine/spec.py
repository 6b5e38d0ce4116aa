"""The typed job spec: teacher, student, method, dataset and training settings.

Validated by pydantic; the API uses the same classes, so a bad job is rejected (HTTP 422,
naming the field) before anything is queued. ``method`` is a discriminated union on ``name``
over every registered method config.

Every string of a spec (references, column names, method settings) is refused when it holds a
control character or is longer than 2048 characters (column names: 256), and seeds must be
``0 <= seed < 2**32``; see :mod:`kd_engine.spec_fields`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import Field, ValidationError, ValidationInfo, field_validator, model_validator

from kd_engine import methods as _methods  # noqa: F401  (fills the registry)
from kd_engine import registry
from kd_engine.errors import SpecError
from kd_engine.methods.born_again import resolve_init
from kd_engine.spec_fields import MAX_TEXT_CHARS, ColumnName, Seed
from kd_engine.students_spec import (
    BiLSTMStudent,
    CNNStudent,
    FreshStudent,
    FromTeacherStudent,
    PretrainedStudent,
    StudentSpec,
    _Strict,
)

if TYPE_CHECKING:
    from kd_engine.methods.base import MethodConfig as MethodSpec
else:
    _configs = tuple(registry.get(n).config_cls for n in registry.names())
    MethodSpec = Annotated[Union[_configs], Field(discriminator="name")]  # noqa: UP007

__all__ = [
    "BiLSTMStudent",
    "CNNStudent",
    "DatasetSpec",
    "ExportSpec",
    "FreshStudent",
    "FromTeacherStudent",
    "JobSpec",
    "MethodSpec",
    "PretrainedStudent",
    "SelectionMetric",
    "StudentSpec",
    "TrainingSpec",
]


Task = Literal["auto", "classification", "regression"]
MAX_EVAL_SETS = 8


class EvalSetSpec(_Strict):
    """A labelled set evaluated at the end of the job besides the test split (for example an
    out-of-domain set, as the KD papers evaluate on HANS, PAWS or IMDB), for the student and the
    teacher.

    Attributes:
        name: short identifier, the set's key in ``metrics.json`` (unique within the job).
        source: ``file://<path>`` (a .csv or .jsonl under the data root, read whole) or
            ``builtin:<name>``: a built-in training dataset (all of its rows) other than the
            job's own ``source``, or an evaluation-only built-in (``vader_amazon``,
            ``vader_tweets``, ``vader_nyt``; see :mod:`kd_engine.data.builtins`).
        text_column, text_pair_column, label_column: columns of a file; None means the
            dataset's own (``dataset.text_column`` ...). Ignored for built-ins.
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    source: str = Field(min_length=1, max_length=2048)
    text_column: ColumnName | None = None
    text_pair_column: ColumnName | None = None
    label_column: ColumnName | None = None


class DatasetSpec(_Strict):
    """Where the transfer set comes from and how to read it.

    ``source`` is ``builtin:<name>`` (rotten_tomatoes, trec6, sms_spam, vader_movies: columns
    and splits are fixed), ``file://<path>`` (a .csv, .jsonl or .parquet under the data root), or
    ``hf://<id>``. Without ``dev_source``/``test_source`` the file is split with ``split_seed``
    (stratified by label for classification).

    ``task`` says what the label column holds. ``classification``: class names (any strings).
    ``regression``: one real number per example (STS-B style); the model has one output and
    KD terms become MSE on it. ``auto`` (the default) follows the teacher: a fine-tuned teacher
    with one output (``problem_type`` ``regression``, or ``num_labels`` 1) means regression, a
    classifier with several means classification; with a base-encoder teacher (a finetune job)
    the labels decide: regression when every label is a number and at least one is not an
    integer (``3.8``), classification otherwise (so integer scores such as 1..5 are classes
    unless ``task`` is ``regression``).

    ``eval_sets`` (at most 8) are evaluated at the end and reported by name in ``metrics.json``.
    """

    source: str = Field(min_length=1, max_length=2048)
    task: Task = "auto"
    text_column: ColumnName = "text"
    text_pair_column: ColumnName | None = None
    label_column: ColumnName = "label"
    dev_source: str | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS)
    test_source: str | None = Field(None, min_length=1, max_length=MAX_TEXT_CHARS)
    dev_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    test_fraction: float = Field(0.1, gt=0.0, lt=0.5)
    split_seed: Seed = 0
    max_train_examples: int | None = Field(None, ge=2)
    max_eval_examples: int | None = Field(None, ge=2)
    eval_sets: list[EvalSetSpec] = Field(default_factory=list, max_length=MAX_EVAL_SETS)

    @field_validator("eval_sets")
    @classmethod
    def _unique_names(cls, v: list[EvalSetSpec]) -> list[EvalSetSpec]:
        seen: set[str] = set()
        for s in v:
            if s.name in seen:
                raise ValueError(f"eval set names must be unique; {s.name!r} is used twice")
            seen.add(s.name)
        return v


SelectionMetric = Literal["accuracy", "macro_f1", "mcc", "pearson", "spearman"]


class TrainingSpec(_Strict):
    """Optimisation settings shared by every stage unless a method's stage sets its own.

    AdamW; LR warm-up over ``warmup_ratio`` of each stage's steps, then ``schedule``
    (``linear`` decay to zero, or ``constant``). ``epochs`` is the length of single-stage
    methods (multi-stage methods give each stage its length in their settings).
    ``max_steps`` caps every stage (for smoke tests). The dev set is evaluated at epoch ends
    and every ``eval_every_steps`` optimiser steps; the exported checkpoint is the best
    evaluation by ``selection_metric`` (None: ``accuracy`` for classification, ``pearson`` for
    regression; ``mcc`` for CoLA-like tasks, ``macro_f1`` for imbalanced ones) among the stages
    that may select. ``teacher_cache`` (default True): see :mod:`kd_engine.teacher_cache`.
    """

    epochs: int = Field(3, ge=1, le=200)
    batch_size: int = Field(32, ge=1, le=4096)
    eval_batch_size: int = Field(64, ge=1, le=4096)
    learning_rate: float = Field(5e-5, gt=0.0, le=1.0)
    warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    weight_decay: float = Field(0.01, ge=0.0, le=1.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    schedule: Literal["linear", "constant"] = "linear"
    eval_every_steps: int | None = Field(
        None, ge=1, le=1_000_000, description="Also evaluate every N optimiser steps."
    )
    selection_metric: SelectionMetric | None = None
    max_seq_length: int = Field(128, ge=8, le=512)
    grad_accumulation_steps: int = Field(1, ge=1, le=1024)
    max_steps: int | None = Field(
        None, ge=1, description="Cap every stage at this many optimiser steps (smoke tests)."
    )
    seed: Seed = 42
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="auto: bf16 autocast and a half-precision teacher on CUDA (bf16, fp16 on "
        "GPUs without bf16), fp32 on the CPU; fp32: everywhere; bf16: bf16 autocast and teacher "
        "(on the CPU too, slowly).",
    )
    teacher_cache: bool = Field(
        True,
        description=(
            "For a method that needs only the teacher's logits (see docs/methods.md), compute "
            "them once per job before training and read them by example id instead of running "
            "the teacher on every batch (the same result up to float rounding); a worker keeps "
            "the cache for the tenant's later jobs with the same teacher and data. False runs "
            "the teacher live on every batch."
        ),
    )
    group_by_length: bool = Field(
        False,
        description=(
            "Batch examples of similar length together (shuffled mega-batches of 16 batches, "
            "sorted by length, cut into batches, batches shuffled): less padding, faster "
            "steps, slightly less random batches. Off by default (results stay as they were)."
        ),
    )


class ExportSpec(_Strict):
    """What the job exports besides the student's transformers directory (safetensors).

    Attributes:
        onnx: also write ``model.onnx``: the student exported to ONNX (opset
            :data:`kd_engine.onnx_export.OPSET`; inputs ``input_ids``, ``attention_mask`` and,
            when the tokenizer makes them, ``token_type_ids``, each (batch, sequence) int64 with
            both axes dynamic; output ``logits`` (batch, C) float32), checked with
            ``onnx.checker`` and against PyTorch with onnxruntime on the test split;
            ``metrics.json``'s ``onnx`` reports the differences and both runtimes' CPU latency.
            A failed export never fails the job: ``onnx`` then holds ``error`` and a warning is
            recorded. See :mod:`kd_engine.onnx_export`.
        int8: also write ``model.int8.onnx``, ``model.onnx`` with its weights quantised to
            int8 (onnxruntime's dynamic quantisation), with its test metrics, agreement with
            the fp32 student and latency. Needs ``onnx``.
        latency: time the PyTorch student (and teacher) at batch 1 and 32
            (:mod:`kd_engine.latency`): ``metrics.json``'s ``latency_s_batch1`` /
            ``latency_s_batch32`` per model and its ``latency`` block. Off: neither is
            written (as for a job from before latency); about 4 s of CPU saved on a tiny
            MiniLM job (2 cores).
        report: write ``report.html`` (:mod:`kd_engine.report_html`). Off: no report
            (``metrics.json``'s ``report`` is ``{"skipped": ...}``, ``GET .../report`` is a
            404 that says so); about 3 s of CPU saved per job (2 cores).
    """

    onnx: bool = Field(
        True,
        description="Write model.onnx (opset 17, dynamic batch and sequence axes), checked "
        "against PyTorch with onnxruntime; metrics.json's onnx block reports it.",
    )
    int8: bool = Field(
        False,
        description="Also write model.int8.onnx (onnxruntime dynamic quantisation, int8 "
        "weights) with its test metrics and latency. Needs onnx.",
    )
    latency: bool = Field(
        True,
        description="Time the PyTorch student (and teacher) at batch 1 and 32 into "
        "metrics.json (latency_s_batch1/_batch32 and the latency block); off: none written.",
    )
    report: bool = Field(
        True,
        description="Write report.html (the job's one-page report); off: no report, "
        'metrics.json\'s report is {"skipped": ...}.',
    )

    @field_validator("int8")
    @classmethod
    def _needs_onnx(cls, v: bool, info: ValidationInfo) -> bool:
        if v and info.data.get("onnx") is False:
            raise ValueError("needs export.onnx true: the int8 model is quantised from model.onnx")
        return v


class JobSpec(_Strict):
    """A whole distillation job."""

    teacher: str = Field(min_length=1, max_length=2048, description="Model reference.")
    student: StudentSpec = Field(default_factory=FromTeacherStudent)
    method: MethodSpec
    dataset: DatasetSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    export: ExportSpec = Field(default_factory=ExportSpec)

    @model_validator(mode="before")
    @classmethod
    def _method_defaults_from_the_job(cls, data: Any) -> Any:
        """Method settings whose default depends on the rest of the spec, filled in before
        validation so that the stored spec writes them out (see
        :func:`kd_engine.methods.born_again.resolve_init`)."""
        return resolve_init(data)


def stored_spec(data: Any) -> JobSpec:
    """The typed spec of a job as stored (the JSON the API validated at submit): what the
    worker and the dependency release work from, parsed once.

    Raises:
        SpecError: the stored JSON is no longer a valid spec (a spec stored by an older
            version); ``field`` is the path of the first bad value (``spec`` for the whole).
    """
    try:
        return JobSpec.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()) if not str(p).startswith("function"))
        raise SpecError(
            field or "spec", f"the stored job spec is invalid: {first.get('msg')}"
        ) from None
