"""API response schemas (distinct from the ORM models). The request schema is
:class:`kd_engine.spec.JobSpec`."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator

from core.db import ApiKey, Artifact, File, Job, JobCheckpoint
from core.job_status import JobStatus
from core.tenants import KEY_NAME_MAX, check_key_name
from kd_engine.contracts import EvaluationRecord, JobMetrics, Progress


class PlanValueOut(BaseModel):
    """One setting of a planned stage and where it comes from: ``user`` (a setting the job
    gave), ``recipe`` (the method's own: a method setting left at its default, or a value fixed
    in the method; ``fields`` is then empty) or ``default`` (a ``training`` default)."""

    value: int | float | str
    source: Literal["user", "recipe", "default"]
    fields: list[str] = Field(description="The spec fields the value is computed from.")


class PlanStageOut(BaseModel):
    """One stage the job will run: its length (``epochs``, or ``steps`` when a setting fixes
    it; the steps of an epoch follow the training set's size), ``max_steps`` (the per-stage
    cap ``training.max_steps``), its peak learning rate, warm-up fraction and schedule."""

    hop: str = Field(description="The model the stage trains: 'student', or a chain's hop.")
    method: str
    name: str
    epochs: PlanValueOut | None
    steps: PlanValueOut | None
    max_steps: int | None
    learning_rate: PlanValueOut
    warmup_ratio: PlanValueOut
    schedule: PlanValueOut


class PlanOut(BaseModel):
    """The job's effective plan, computed at submit: every stage in order, and notes (a stage
    that ``training.max_steps`` cuts short)."""

    stages: list[PlanStageOut]
    notes: list[str] = Field(default_factory=list)


class JobOut(BaseModel):
    """A job as the API shows it."""

    id: str
    name: str | None = Field(description="The job's name, if it was given one.")
    metadata: dict[str, str] = Field(description="The job's free-form string labels.")
    status: JobStatus = Field(
        description="waiting (for a job it names as job:<id>), queued, running, pausing, paused, "
        "cancelling, succeeded, failed, cancelled"
    )
    method: str
    queue: str = Field(
        description="The worker queue the job is sent to (the submitting API's "
        "DISTILLERY_QUEUE); its memory was checked against that queue's budget, and only "
        "workers of that queue run it."
    )
    spec: dict[str, Any]
    attempt: int
    progress: Progress | None
    error: str | None = Field(description="Why the job failed, when it did.")
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    heartbeat_at: datetime | None
    links: dict[str, str]
    plan: PlanOut | None = Field(
        None,
        description="The effective plan computed at submit (stages with their lengths, "
        "learning rates and where each value comes from); given by POST /v1/jobs and GET "
        "/v1/jobs/{id}, null in lists and for a chain method whose models were not known yet.",
    )

    @classmethod
    def of(cls, job: Job, plan: dict[str, Any] | None = None) -> JobOut:
        """Build from the ORM row (with the job's stored plan, when given)."""
        base = f"/v1/jobs/{job.id}"
        return cls(
            plan=PlanOut.model_validate(plan) if plan is not None else None,
            id=job.id,
            name=job.name,
            metadata=job.labels or {},
            status=job.status,
            method=job.method,
            queue=job.queue,
            spec=job.spec,
            attempt=job.attempt,
            progress=Progress(**job.progress) if job.progress else None,
            error=job.error,
            created_at=job.created_at,
            updated_at=job.updated_at,
            started_at=job.started_at,
            finished_at=job.finished_at,
            heartbeat_at=job.heartbeat_at,
            links={
                "self": base,
                "metrics": f"{base}/metrics",
                "artifacts": f"{base}/artifacts",
                "archive": f"{base}/archive",
                "cancel": f"{base}/cancel",
                "pause": f"{base}/pause",
                "resume": f"{base}/resume",
                "checkpoints": f"{base}/checkpoints",
            },
        )


class JobList(BaseModel):
    """A page of jobs, newest first; pass ``next_cursor`` as ``cursor`` for the next page."""

    items: list[JobOut]
    next_cursor: str | None


class ArtifactOut(BaseModel):
    """One stored file: name, size in bytes, sha256 (hex) and its download URL."""

    name: str
    size_bytes: int
    sha256: str
    url: str

    @classmethod
    def of(cls, a: Artifact) -> ArtifactOut:
        """Build from the ORM row."""
        return cls(
            name=a.name,
            size_bytes=a.size_bytes,
            sha256=a.sha256,
            url=f"/v1/jobs/{a.job_id}/artifacts/{a.name}",
        )


class CheckpointOut(BaseModel):
    """A training checkpoint of a job: where it was taken (``step`` of ``total_steps``
    optimiser steps of hop ``hop``, in stage ``stage``), why (``interval``, ``stage_end`` or
    ``pause``), the dev metrics then, its stored size in bytes, and the URL of its student as
    a .tar.gz (a transformers directory that loads like the final student)."""

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

    @classmethod
    def of(cls, c: JobCheckpoint) -> CheckpointOut:
        """Build from the ORM row."""
        return cls(
            name=c.name,
            step=c.step,
            total_steps=c.total_steps,
            hop=c.hop,
            stage=c.stage,
            reason=c.reason,
            dev=c.dev,
            size_bytes=c.size_bytes,
            attempt=c.attempt,
            created_at=c.created_at,
            archive_url=f"/v1/jobs/{c.job_id}/checkpoints/{c.name}/archive",
        )


class CheckpointList(BaseModel):
    """A job's checkpoints, oldest first (the newest ``checkpoints_keep`` are kept while it
    runs; none once it has succeeded)."""

    job_id: str
    items: list[CheckpointOut]


class ArtifactList(BaseModel):
    """A job's files and the URL of the whole student as one .tar.gz archive."""

    job_id: str
    items: list[ArtifactOut]
    archive_url: str


class MetricsOut(BaseModel):
    """Per-epoch train loss and dev metrics; test metrics, size and latency once finished.
    Served with ``exclude_unset``: a block the job's ``metrics.json`` lacks stays absent."""

    job_id: str
    status: JobStatus
    epochs: list[EvaluationRecord]
    final: JobMetrics | None = Field(
        description="The job's metrics.json less its epochs (kd_engine.contracts.JobMetrics): "
        "test metrics, teacher comparison, parameters, bytes, latency (seconds), ONNX, report."
    )


class Health(BaseModel):
    """Health of the backing services."""

    status: str
    database: str
    broker: str


class KeyCreate(BaseModel):
    """A new API key: an optional label (at most 100 characters) to tell keys apart."""

    name: str = Field("", max_length=KEY_NAME_MAX, description="A label, e.g. 'ci' or 'alice'.")

    model_config = {"extra": "forbid"}

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_key_name(v)


class KeyOut(BaseModel):
    """An API key as listed: never its secret or hash. ``prefix`` is how the key starts."""

    id: str
    prefix: str = Field(description="The key's first characters (dk_ and 8 more).")
    name: str
    created_at: datetime
    revoked_at: datetime | None
    last_used_at: datetime | None

    @classmethod
    def of(cls, k: ApiKey) -> KeyOut:
        """Build from the ORM row."""
        return cls(
            id=k.id,
            prefix=k.prefix,
            name=k.name,
            created_at=k.created_at,
            revoked_at=k.revoked_at,
            last_used_at=k.last_used_at,
        )


class KeyCreated(KeyOut):
    """A key just created, with the key itself: shown this once, stored only as a hash."""

    key: str = Field(description="Send as 'Authorization: Bearer <key>'. Shown only once.")


class KeyList(BaseModel):
    """The tenant's keys, oldest first."""

    items: list[KeyOut]


class FileOut(BaseModel):
    """An uploaded file. Jobs name it by its ``id`` (``file-<32 hex>``) in ``teacher``,
    ``student.model``, ``method.generator`` (a model) or ``dataset.source``, ``dev_source``,
    ``test_source``, ``eval_sets.N.source``, ``method.corpus`` (a dataset)."""

    id: str = Field(description="The file's id, also its reference in a job spec.")
    purpose: str = Field(description="dataset or model")
    filename: str = Field(description="The uploaded file's name (without folders).")
    size_bytes: int = Field(
        description="Bytes stored: the dataset file, or a model's unpacked files."
    )
    sha256: str = Field(
        description="sha256 (hex) of the uploaded file as received (empty until it is ready)."
    )
    status: str = Field(
        description="uploading (received or being checked; size_bytes counts what arrived), "
        "ready (usable by jobs) or failed (refused by its checks: error says why; nothing is "
        "stored)"
    )
    error: str | None = Field(None, description="Why the upload was refused, when it was.")
    created_at: datetime
    report: dict[str, Any] = Field(
        description="What the checks found: a dataset's encoding, format, columns, rows, "
        "labels with counts (or label_stats), text_length; a model's model_type, "
        "architectures, task, label_names, layers, parameters, files."
    )

    @classmethod
    def of(cls, f: File) -> FileOut:
        """The API view of a file row."""
        return cls(
            id=f.id,
            purpose=f.kind,
            filename=f.filename,
            size_bytes=f.size_bytes,
            sha256=f.sha256,
            status=f.status,
            error=f.error,
            created_at=f.created_at,
            report=f.report,
        )


class FileList(BaseModel):
    """The tenant's uploaded files, newest first."""

    items: list[FileOut]
