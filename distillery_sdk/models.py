"""Typed answers of the API: pydantic models mirroring ``api/schemas.py``.

The API's own schemas import the ORM (SQLAlchemy), so the SDK keeps these small mirrors;
``tests/e2e/test_sdk_cli.py`` checks that their fields match the API's, and
``tests/unit/test_contracts.py`` that the engine's contracts (``Progress``, ``metrics.json``)
and the SDK's copies have the same fields and types. Unknown fields a newer
API adds are ignored.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from distillery_sdk.contracts import Block, EvaluationRecord, JobMetrics, event_payload

FINAL_STATUSES = ("succeeded", "failed", "cancelled")
"""A job in one of these statuses will not change any more."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Progress(_Model):
    """Where a running job is: ``stage`` (``prepare``, a training stage, ``evaluate``,
    ``export``, ``done``), ``stage_index`` of ``num_stages``, ``epoch`` and optimiser ``step``
    of ``total_steps`` over the job, ``stage_step`` of ``stage_steps`` within the stage, the
    latest ``losses`` (name to mean value), and ``hop``/``num_hops``/``phase`` for multi-model
    and adversarial methods."""

    stage: str
    epoch: int = 0
    step: int = 0
    total_steps: int = 0
    losses: dict[str, float] = Field(default_factory=dict)
    stage_index: int = 0
    num_stages: int = 0
    stage_epoch: int = 0
    stage_step: int = 0
    stage_steps: int = 0
    hop: int = 0
    num_hops: int = 0
    phase: str = ""


class Job(_Model):
    """A job: ``status`` (waiting, queued, running, pausing, paused, cancelling, succeeded,
    failed, cancelled), its ``name`` and ``metadata`` (string labels) if given, its stored
    ``spec``, ``progress`` and ``error`` (why it failed)."""

    id: str
    name: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    status: str
    method: str
    queue: str = "cpu"  # the worker queue it is sent to (older servers do not say: cpu)
    spec: dict[str, Any]
    attempt: int
    progress: Progress | None
    error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    links: dict[str, str]
    plan: dict[str, Any] | None = None
    """The effective plan computed at submit (stages, lengths, learning rates and where each
    value comes from; see docs/usage.md "The plan"); None in lists."""

    @property
    def finished(self) -> bool:
        """True once the status is final (succeeded, failed or cancelled)."""
        return self.status in FINAL_STATUSES


class JobList(_Model):
    """A page of jobs, newest first; ``next_cursor`` is None on the last page."""

    items: list[Job]
    next_cursor: str | None


class Artifact(_Model):
    """One file of a succeeded job: ``size_bytes``, ``sha256`` (hex) and its download ``url``
    (a path under the API's base URL)."""

    name: str
    size_bytes: int
    sha256: str
    url: str


class ArtifactList(_Model):
    """The files of a job (empty until it succeeds) and the URL of its .tar.gz archive."""

    job_id: str
    items: list[Artifact]
    archive_url: str


class Checkpoint(_Model):
    """A stored checkpoint: where (``step`` of ``total_steps``, ``hop``, ``stage``), why
    (``reason``: interval, stage_end, pause), its dev metrics, size and student archive URL."""

    name: str
    step: int
    total_steps: int
    hop: int
    stage: str
    reason: str
    dev: dict[str, Any]
    size_bytes: int
    attempt: int
    created_at: datetime
    archive_url: str


class CheckpointList(_Model):
    """A job's checkpoints, oldest first."""

    job_id: str
    items: list[Checkpoint]


class Metrics(_Model):
    """Per-epoch train loss and dev metrics so far (``epochs``) and, once the job succeeded,
    ``final``: its ``metrics.json`` less the epochs (test metrics of the student and teacher,
    agreement, parameters, latency, ONNX...; :class:`~distillery_sdk.contracts.JobMetrics`)."""

    job_id: str
    status: str
    epochs: list[EvaluationRecord]
    final: JobMetrics | None


class Event(_Model):
    """One event of a job's log: ``id`` orders them; ``type`` (queued, started, stage, epoch,
    checkpoint, warning, retried, paused, succeeded, failed...); ``level`` info, warning or
    error; ``time`` ISO 8601 UTC."""

    id: int
    time: str
    level: str
    type: str
    message: str
    data: dict[str, Any]

    @property
    def payload(self) -> Block | None:
        """``data`` typed for the events that carry details (``checkpoint``, ``resumed``,
        ``paused``, ``succeeded``, ``epoch``: :data:`~distillery_sdk.contracts.EVENT_PAYLOADS`),
        None for the others.

        Raises:
            pydantic.ValidationError: ``data`` does not fit its type's payload.
        """
        return event_payload(self.type, self.data)


class EventList(_Model):
    """A page of events, oldest first; ``next_after`` is the next page's ``after`` or None."""

    events: list[Event]
    next_after: int | None = None


class File(_Model):
    """An uploaded dataset or model: its ``id`` is its reference in a job spec (once
    ``status`` is ``ready``); ``report`` is what the API's checks found (columns, rows,
    labels; model type, layers...)."""

    id: str
    purpose: str
    filename: str
    size_bytes: int
    sha256: str
    status: str  # uploading, ready or failed
    error: str | None = None  # why a failed upload was refused
    created_at: datetime
    report: dict[str, Any]


class FileList(_Model):
    """The tenant's uploads, newest first."""

    items: list[File]


class Key(_Model):
    """An API key of the tenant (never its secret): ``prefix`` is its first characters."""

    id: str
    prefix: str
    name: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None


class KeyCreated(Key):
    """A new key with its secret ``key`` (shown only in this answer)."""

    key: str


class KeyList(_Model):
    """The tenant's keys, revoked ones included."""

    items: list[Key]
