"""Typed contracts of a job's results, each defined once: the progress record, ``metrics.json``
and the structured event payloads.

Pure pydantic, no torch: the engine writes these (:mod:`kd_engine.run`, :mod:`kd_engine.trainer`),
the worker stores them, the report (:mod:`kd_engine.report_html`), the dashboard
(:mod:`api.ui.views`) and the API read them. The SDK (``distillery_sdk``) keeps its own copies
(it installs without the server); ``tests/unit/test_contracts.py`` keeps them equal.

``metrics.json`` (:class:`JobMetrics`):

- ``schema_version``: written by the engine (:data:`METRICS_SCHEMA_VERSION`); a file written
  before the field existed reads as version 1 (the same layout). A change that renames or
  retypes a key raises the version.
- every block is optional when read: a job stored before a block existed, a running job's
  metrics (``epochs`` only) and a job without a teacher (no ``teacher_test``, ``teacher``)
  all validate, the missing blocks None (or empty). The writer's file always has the blocks
  :data:`ALWAYS_WRITTEN` lists.
- unknown keys are kept (``extra="allow"``), at every level: a reader older than the writer
  ignores a newer block and writes it back unchanged; ``model_dump(mode="json",
  exclude_unset=True)`` gives back the JSON it was read from. ``tests/unit/test_contracts.py``
  checks that a real job's file has no key this model does not name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.dataclasses import dataclass

METRICS_SCHEMA_VERSION = 1
"""The ``schema_version`` the engine writes into ``metrics.json``."""

ALWAYS_WRITTEN = (
    "schema_version",
    "method",
    "task",
    "labels",
    "data",
    "device",
    "epochs",
    "stages",
    "selection_metric",
    "best_epoch",
    "best_step",
    "best_stage",
    "best_dev",
    "train_seconds",
    "warnings",
    "trained",
    "test",
    "student",
    "hops",
    "teacher_cache",
    "latency",
    "onnx",
    "report",
)
"""The top-level keys of every ``metrics.json`` the engine writes (the others depend on the job:
a teacher, a classification task, a chain with an ensemble, extra evaluation sets)."""

Scores = dict[str, float]
"""Test or dev metrics by name: ``accuracy``, ``macro_f1``, ``mcc`` (classification) or
``pearson``, ``spearman``, ``mse`` (regression); see :mod:`kd_engine.evaluation`."""


@dataclass(frozen=True)
class Progress:
    """Where a running job is (the trainer's report, the API's ``progress`` field, stored in
    ``jobs.progress``): stage (``prepare``, a training stage of the method such as ``tinybert
    intermediate`` or ``annealing T=3/7``, ``teacher cache``, ``evaluate``, ``export``,
    ``done``) and its position (``stage_index`` of ``num_stages``), epochs and optimiser steps
    over the whole job and within the stage, and the latest losses (mean over the epoch so far).
    A job that trains several models (``takd``, ``born_again``, ``teacher_free_self``) also says
    which (``hop`` of ``num_hops``; its stage names start with ``hop 2/3 assistant_2: ``), and
    its epochs and steps then count within that model's training. In an adversarial stage
    (``mate_kd`` and its family) ``phase`` says whose steps a report is about: ``generator``
    (its max steps; ``losses`` holds the divergence reached, ``generator_kl`` or
    ``generator_mse``) or ``student`` (the min steps; the method's losses).

    Attributes:
        stage: the stage's name.
        epoch: epochs begun over the whole job (1-based; 0 outside training).
        step: optimiser steps taken over the whole job.
        total_steps: optimiser steps the whole job will take.
        losses: mean losses since the epoch began (or the dev metric, on evaluation).
        stage_index: 1-based position of the stage (0 outside training).
        num_stages: how many training stages the job has.
        stage_epoch: epochs begun within the stage.
        stage_step: optimiser steps taken within the stage.
        stage_steps: optimiser steps the stage will take.
        hop: 1-based position of the model being trained in a job that trains several, 0 when
            not set.
        num_hops: how many models the job trains (0 when not set).
        phase: ``generator``, ``student`` or '' (see above).
    """

    stage: str
    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    losses: dict[str, float] = dataclasses.field(default_factory=dict)
    stage_index: int = 0
    num_stages: int = 0
    stage_epoch: int = 0
    stage_step: int = 0
    stage_steps: int = 0
    hop: Annotated[
        int, Field(description="Which model of a multi-model job is training (1-based).")
    ] = 0
    num_hops: Annotated[
        int, Field(description="How many models the job trains (takd, born_again).")
    ] = 0
    phase: Annotated[
        str,
        Field(
            description="Within an adversarial stage (mate_kd and its family): 'generator' for "
            "a report of the generator's max steps (losses: the divergence they reached, e.g. "
            "generator_kl) and 'student' for the student's min steps; '' otherwise."
        ),
    ] = ""


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
    example at batch 1 and 32 (:mod:`kd_engine.latency`)."""

    parameters: int | None = None
    bytes: int | None = None
    latency_s_batch1: float | None = None
    latency_s_batch32: float | None = None


class Spread(Block):
    """A figure over timing rounds (:class:`kd_engine.latency.Spread`): median, min, max (seconds
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
    """``onnx`` (:func:`kd_engine.onnx_export.export_report`): ``skipped`` (why), ``error`` (the
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
    from being written."""

    file: str | None = None
    bytes: int | None = None
    seconds: float | None = None
    error: str | None = None


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
    """A job's ``metrics.json`` (written by :func:`kd_engine.run.run_job`; stored in
    ``jobs.metrics``, where a running job has ``epochs`` only). See the module docstring for
    the version and unknown keys; docs/usage.md describes each block.

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
others carry at most a ``message``-like detail; see docs/usage.md, "Events")."""


def event_payload(event_type: str, data: Mapping[str, Any]) -> Block | None:
    """The ``data`` of an event of type ``event_type`` as its typed payload
    (:data:`EVENT_PAYLOADS`), or None for a type without one.

    Raises:
        pydantic.ValidationError: ``data`` does not fit the payload (the error names the key).
    """
    model = EVENT_PAYLOADS.get(event_type)
    return model.model_validate(dict(data)) if model is not None else None


class FinishedHopRecord(BaseModel):
    """A finished hop in a checkpoint manifest: its training result
    (:class:`kd_engine.trainer.TrainResult` as a dict) and its ``hops[]`` report."""

    result: dict[str, Any]
    report: dict[str, Any]


class CheckpointInfo(BaseModel):
    """What a checkpoint's ``manifest.json`` says of it (:func:`kd_engine.checkpoint.
    read_checkpoint_info`): ``format`` (the checkpoint format's version), its ``name``, where it
    was taken (``step`` of ``total_steps`` of ``hop`` of ``num_hops``, ``stage`` and its 1-based
    ``stage_index``), why (``reason``: ``interval``, ``stage_end``, ``pause``) and the latest
    ``dev`` metrics. The rest of the manifest is ignored here (:class:`CheckpointManifest`)."""

    format: int
    name: str
    step: int
    total_steps: int
    hop: int
    num_hops: int
    stage: str
    stage_index: int
    reason: str
    dev: dict[str, float]


class CheckpointManifest(CheckpointInfo):
    """A checkpoint's whole ``manifest.json`` (:mod:`kd_engine.checkpoint`; written and read
    for a resume there): :class:`CheckpointInfo`, the ``spec_hash`` of the run that wrote it,
    the unix ``time`` it was written, whether the job's teacher taught a hop so far
    (``teacher_taught``), the loop's counters and running sums (``loop``: the scalar fields of
    :class:`kd_engine.checkpoint.LoopState`) and the ``finished`` hops. The tensors are in the
    checkpoint's safetensors and ``state.pt`` files, not here."""

    spec_hash: str
    time: float
    teacher_taught: bool
    loop: dict[str, Any]
    finished: list[FinishedHopRecord]


def load_metrics(data: Mapping[str, Any] | JobMetrics | None) -> JobMetrics:
    """``data`` (a ``metrics.json`` dict, ``jobs.metrics``, or None: an empty one) as
    :class:`JobMetrics`; a :class:`JobMetrics` is returned as it is.

    Raises:
        pydantic.ValidationError: a key holds a value of the wrong type (the error names it).
    """
    if isinstance(data, JobMetrics):
        return data
    return JobMetrics.model_validate(dict(data or {}))


def unmodelled_keys(model: BaseModel, path: str = "") -> list[str]:
    """Dotted paths of the keys in ``model`` (and its nested blocks) that no field names (kept
    as extras): [] when the model covers the whole JSON it was read from."""
    out = [f"{path}{key}" for key in model.model_extra or {}]
    for name in type(model).model_fields:
        value = getattr(model, name)
        items: list[tuple[str, Any]]
        if isinstance(value, list):
            items = [(f"{name}[{i}]", v) for i, v in enumerate(value)]
        elif isinstance(value, dict):
            items = [(f"{name}.{k}", v) for k, v in value.items()]
        else:
            items = [(name, value)]
        for where, item in items:
            if isinstance(item, BaseModel):
                out += unmodelled_keys(item, f"{path}{where}.")
    return out
