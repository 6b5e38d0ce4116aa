"""Typed contracts of a job's results, each defined once: the progress record
(:mod:`~kd_engine.contracts.progress`), ``metrics.json`` (:mod:`~kd_engine.contracts.metrics`),
the structured event payloads (:mod:`~kd_engine.contracts.events`) and the checkpoint manifest
(:mod:`~kd_engine.contracts.checkpoints`). Import them from here.

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

from kd_engine.contracts.checkpoints import (
    CheckpointInfo,
    CheckpointManifest,
    FinishedHopRecord,
)
from kd_engine.contracts.events import (
    EVENT_PAYLOADS,
    CheckpointSaved,
    PausedAt,
    Resumed,
    Succeeded,
    event_payload,
)
from kd_engine.contracts.metrics import (
    ALWAYS_WRITTEN,
    METRICS_SCHEMA_VERSION,
    Block,
    Calibration,
    ConfusionMatrices,
    EnsembleReport,
    EvalSetReport,
    EvaluationRecord,
    HopReport,
    Int8Report,
    JobMetrics,
    LatencyReport,
    ModelFigures,
    OnnxReport,
    ReportFile,
    RuntimeLatency,
    Scores,
    Spread,
    StageSummary,
    TeacherCacheReport,
    load_metrics,
    unmodelled_keys,
)
from kd_engine.contracts.progress import (
    Progress,
)

__all__ = [
    "ALWAYS_WRITTEN",
    "EVENT_PAYLOADS",
    "METRICS_SCHEMA_VERSION",
    "Block",
    "Calibration",
    "CheckpointInfo",
    "CheckpointManifest",
    "CheckpointSaved",
    "ConfusionMatrices",
    "EnsembleReport",
    "EvalSetReport",
    "EvaluationRecord",
    "FinishedHopRecord",
    "HopReport",
    "Int8Report",
    "JobMetrics",
    "LatencyReport",
    "ModelFigures",
    "OnnxReport",
    "PausedAt",
    "Progress",
    "ReportFile",
    "Resumed",
    "RuntimeLatency",
    "Scores",
    "Spread",
    "StageSummary",
    "Succeeded",
    "TeacherCacheReport",
    "event_payload",
    "load_metrics",
    "unmodelled_keys",
]
