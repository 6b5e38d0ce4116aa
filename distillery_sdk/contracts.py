"""Typed ``metrics.json`` of a job, as :meth:`distillery_sdk.Client.metrics` returns it, and the
typed ``data`` of the job events that carry details (:meth:`distillery_sdk.models.Event.payload`).

A copy of the server's ``kd_engine.contracts`` (the SDK installs without the server):
``tests/unit/test_contracts.py`` checks that both have the same fields and types. Every block is
optional and unknown keys are kept (``extra="allow"``), so a newer server's blocks never break
this client.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Scores = dict[str, float]
"""Test or dev metrics by name: ``accuracy``, ``macro_f1``, ``mcc`` (classification) or
``pearson``, ``spearman``, ``mse`` (regression)."""


class Block(BaseModel):
    """Base of every ``metrics.json`` block: unknown keys are kept (see the module docstring)."""

    model_config = ConfigDict(extra="allow")


class EvaluationRecord(Block):
    """One dev evaluation (``epochs[]``; the training log's ``epoch`` and ``evaluation``
    records): where (``stage``, ``stage_index``, ``epoch``, ``stage_epoch``, ``step``,
    ``stage_step``, ``at``: ``epoch_end`` or ``step``), the mean train loss and its parts since
    the epoch began, the dev metrics, seconds since training began, and in a multi-model job
    the ``hop``'s name."""

    stage: str | None = None
    stage_index: int | None = None
    epoch: int | None = None
    stage_epoch: int | None = None
    step: int | None = None
    stage_step: int | None = None
    at: str | None = None
    train_loss: float | None = None
    train_losses: dict[str, float] = Field(default_factory=dict)
    dev: Scores = Field(default_factory=dict)
    seconds: float | None = None
    hop: str | None = None


class StageSummary(Block):
    """One training stage that ran (``stages[]``, ``hops[].stages[]``; the log's ``stage_end``):
    its name and 1-based index, the method's loss it used, optimiser steps and epochs run, peak
    learning rate, schedule, the parameter groups it trained, whether it could select the
    exported checkpoint and restored its best weights, its best dev metrics and seconds; in a
    multi-model job's top-level list, the ``hop``'s name."""

    name: str | None = None
    index: int | None = None
    loss: str | None = None
    steps: int | None = None
    epochs: int | None = None
    learning_rate: float | None = None
    schedule: str | None = None
    trains: list[str] = Field(default_factory=list)
    selects_best: bool | None = None
    restored_best: bool | None = None
    best_dev: Scores = Field(default_factory=dict)
    seconds: float | None = None
    hop: str | None = None


class ModelFigures(Block):
    """Size and speed of one PyTorch model (``student``, ``teacher``): parameters, bytes of its
    weights (safetensors; absent for a teacher stored otherwise) and the median seconds per
    example at batch 1 and 32."""

    parameters: int | None = None
    bytes: int | None = None
    latency_s_batch1: float | None = None
    latency_s_batch32: float | None = None


class Spread(Block):
    """A figure over timing rounds : median, min, max (seconds
    per example, or a ratio for a speed-up), spread ((q3 - q1) / median), rounds, and whether it
    is reliable (spread within the limit)."""

    median: float | None = None
    min: float | None = None
    max: float | None = None
    spread: float | None = None
    rounds: int | None = None
    reliable: bool | None = None


class LatencyReport(Block):
    """``latency``: how the models were timed (``protocol`` ``interleaved``, ``rounds`` and
    ``batches_per_round`` per batch size, ``spread_limit``) and, per batch size (``batch1``,
    ``batch32``), a :class:`Spread` per model (``student``, ``teacher``) and ``speedup``."""

    protocol: str | None = None
    rounds: dict[str, int] = Field(default_factory=dict)
    batches_per_round: dict[str, int] = Field(default_factory=dict)
    spread_limit: float | None = None
    batch1: dict[str, Spread] | None = None
    batch32: dict[str, Spread] | None = None

    def figure(self, who: str, batch: str) -> Spread | None:
        """The :class:`Spread` of ``who`` (``student``, ``teacher``, ``speedup``) at ``batch``
        (``batch1``, ``batch32``), or None."""
        block = {"batch1": self.batch1, "batch32": self.batch32}.get(batch)
        return block.get(who) if block is not None else None


class Calibration(Block):
    """``calibration`` (classification): expected calibration error of the student and the
    teacher on the test split, and the number of confidence ``bins``."""

    student_ece: float | None = None
    teacher_ece: float | None = None
    bins: int | None = None


class ConfusionMatrices(Block):
    """``confusion_matrix`` (classification): ``labels`` in class order and (C, C) counts of the
    ``student`` and the ``teacher`` (rows true, columns predicted)."""

    labels: list[str] = Field(default_factory=list)
    student: list[list[int]] | None = None
    teacher: list[list[int]] | None = None


class EvalSetReport(Block):
    """One of ``eval_sets``: its size, the student's and the teacher's metrics, and the
    retention (student / teacher; None where the teacher's score is <= 0)."""

    examples: int | None = None
    student: Scores = Field(default_factory=dict)
    teacher: Scores | None = None
    retention: dict[str, float | None] | None = None


class RuntimeLatency(Block):
    """An ONNX export's median seconds per example under PyTorch and onnxruntime."""

    pytorch: float | None = None
    onnxruntime: float | None = None


class Int8Report(Block):
    """``onnx.int8``: the int8-quantised export (file, bytes, test metrics, prediction agreement
    with the fp32 export, onnxruntime seconds per example), or the ``error`` that stopped it."""

    error: str | None = None
    file: str | None = None
    bytes: int | None = None
    test: Scores | None = None
    agreement_with_fp32: float | None = None
    latency_s_batch1: float | None = None
    latency_s_batch32: float | None = None


class OnnxReport(Block):
    """``onnx`` : ``skipped`` (why), ``error`` (the
    failed export), or the export: opset, file, bytes, max |logit difference| to PyTorch,
    prediction agreement, latencies and the ``int8`` export."""

    skipped: str | None = None
    error: str | None = None
    opset: int | None = None
    file: str | None = None
    bytes: int | None = None
    max_abs_diff_logits: float | None = None
    prediction_agreement: float | None = None
    latency_s_batch1: RuntimeLatency | None = None
    latency_s_batch32: RuntimeLatency | None = None
    int8: Int8Report | None = None


class TeacherCacheReport(Block):
    """``teacher_cache``: ``status`` (``hit``, ``built``, ``rebuilt``, ``off``), the build's
    seconds, the cache key and examples, or the ``reason`` it was off."""

    status: str | None = None
    build_seconds: float | None = None
    key: str | None = None
    examples: int | None = None
    reason: str | None = None


class EnsembleReport(Block):
    """``ensemble`` (a chain with an ensemble, e.g. ``born_again``): its members (hop names) and
    test metrics."""

    members: list[str] = Field(default_factory=list)
    test: Scores = Field(default_factory=dict)


class ReportFile(Block):
    """``report``: ``report.html``'s file name, bytes and seconds, or the ``error`` that kept it
    from being written, or why none was written (``skipped``: ``export.report`` is false)."""

    file: str | None = None
    bytes: int | None = None
    seconds: float | None = None
    error: str | None = None
    skipped: str | None = None


class HopReport(Block):
    """One model a job trained (``hops[]``; one for a single-model method): name, 1-based index,
    method settings, how its student started, who taught it (``teacher``, an earlier hop's name,
    or None), its stages, where its best checkpoint was, seconds, warnings, test metrics,
    parameters, its artifact (an earlier hop's ``.tar.gz``), its agreement with (or mean
    |difference| to) its teacher, the method's own report and augmented samples file."""

    name: str | None = None
    index: int | None = None
    method: dict[str, Any] = Field(default_factory=dict)
    student: dict[str, Any] = Field(default_factory=dict)
    teacher: str | None = None
    stages: list[StageSummary] = Field(default_factory=list)
    best_epoch: int | None = None
    best_step: int | None = None
    best_stage: str | None = None
    best_dev: Scores | None = None
    train_seconds: float | None = None
    warnings: list[str] = Field(default_factory=list)
    test: Scores | None = None
    parameters: int | None = None
    artifact: str | None = None
    teacher_agreement: float | None = None
    teacher_mean_abs_diff: float | None = None
    method_report: dict[str, Any] | None = None
    augmented_samples: str | None = None


class JobMetrics(Block):
    """A job's ``metrics.json`` (``final`` of :class:`~distillery_sdk.models.Metrics`): every
    block optional (an older job lacks some; a job without a teacher has no ``teacher_test``),
    unknown keys kept (``model_extra``); docs/usage.md describes each block.

    ``student`` holds the trained model's figures (the fine-tuned teacher of a ``finetune`` job:
    ``trained`` says which), ``teacher`` and ``teacher_test`` the job's teacher when it taught.
    """

    schema_version: int = 1
    method: str | None = None
    task: Literal["classification", "regression"] | None = None
    labels: list[str] = Field(default_factory=list)
    data: dict[str, int] = Field(default_factory=dict)
    device: str | None = None
    epochs: list[EvaluationRecord] = Field(default_factory=list)
    stages: list[StageSummary] = Field(default_factory=list)
    selection_metric: str | None = None
    best_epoch: int | None = None
    best_step: int | None = None
    best_stage: str | None = None
    best_dev: Scores | None = None
    train_seconds: float | None = None
    warnings: list[str] = Field(default_factory=list)
    trained: Literal["teacher", "student"] = "student"
    test: Scores | None = None
    student: ModelFigures | None = None
    hops: list[HopReport] = Field(default_factory=list)
    teacher_cache: TeacherCacheReport | None = None
    ensemble: EnsembleReport | None = None
    teacher_test: Scores | None = None
    teacher_agreement: float | None = None
    teacher_mean_abs_diff: float | None = None
    teacher: ModelFigures | None = None
    latency: LatencyReport | None = None
    calibration: Calibration | None = None
    teacher_kl: float | None = None
    confusion_matrix: ConfusionMatrices | None = None
    eval_sets: dict[str, EvalSetReport] | None = None
    onnx: OnnxReport | None = None
    report: ReportFile | None = None

    @property
    def regression(self) -> bool:
        """Whether the job is a regression (one output)."""
        return self.task == "regression"

    def to_json(self) -> dict[str, Any]:
        """The JSON the model was read from (keys it did not have stay absent)."""
        return self.model_dump(mode="json", exclude_unset=True)


class CheckpointSaved(Block):
    """The ``data`` of a ``checkpoint`` event: a checkpoint stored (``name``; at ``step`` of
    ``total_steps`` of ``hop`` of ``num_hops``, in ``stage``), why (``reason``: ``interval``,
    ``stage_end``, ``pause``) and its ``size_bytes`` in the artifact store."""

    name: str | None = None
    step: int | None = None
    total_steps: int | None = None
    hop: int | None = None
    num_hops: int | None = None
    stage: str | None = None
    reason: str | None = None
    size_bytes: int | None = None


class Resumed(Block):
    """The ``data`` of a ``resumed`` event: the ``checkpoint`` an attempt continued from, its
    ``step`` of ``total_steps``, ``hop`` of ``num_hops``, ``stage``, and the ``attempt``."""

    checkpoint: str | None = None
    step: int | None = None
    total_steps: int | None = None
    hop: int | None = None
    num_hops: int | None = None
    stage: str | None = None
    attempt: int | None = None


class PausedAt(Block):
    """The ``data`` of a ``paused`` event of a running job: the ``checkpoint`` it paused at and
    its ``step`` of ``total_steps`` (empty for a job paused while queued)."""

    checkpoint: str | None = None
    step: int | None = None
    total_steps: int | None = None


class Succeeded(Block):
    """The ``data`` of a ``succeeded`` event: the trained model's ``test`` metrics and the
    names of the job's ``artifacts``."""

    test: Scores = Field(default_factory=dict)
    artifacts: list[str] = Field(default_factory=list)


EVENT_PAYLOADS: dict[str, type[Block]] = {
    "checkpoint": CheckpointSaved,
    "resumed": Resumed,
    "paused": PausedAt,
    "succeeded": Succeeded,
    "epoch": EvaluationRecord,
}
"""The typed ``data`` of the job events that carry structured details, by event type (the
others carry at most a ``message``-like detail; see the API docs)."""


def event_payload(event_type: str, data: Mapping[str, Any]) -> Block | None:
    """The ``data`` of an event of type ``event_type`` as its typed payload
    (:data:`EVENT_PAYLOADS`), or None for a type without one.

    Raises:
        pydantic.ValidationError: ``data`` does not fit the payload (the error names the key).
    """
    model = EVENT_PAYLOADS.get(event_type)
    return model.model_validate(dict(data)) if model is not None else None
