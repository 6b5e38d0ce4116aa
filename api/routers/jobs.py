"""/v1/jobs: submit, list, read, cancel, metrics, artifacts, archive."""

from __future__ import annotations

import os
import tarfile
import tempfile
from typing import Annotated

from fastapi import APIRouter, Header, Path, Query, Response
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from api import idempotency, repository, service
from api.auth import CallerDep
from api.deps import CeleryDep, SessionDep, SettingsDep
from api.errors import Conflict, InvalidSpec
from api.refs import job_dir
from api.schemas import ArtifactList, ArtifactOut, JobList, JobOut, MetricsOut
from kd_engine.spec import JobSpec

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
JobId = Annotated[str, Path(description="The job id (a UUID).", max_length=64)]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias=idempotency.HEADER,
        description="Any string of up to 255 characters (a UUID is a good choice): a retry "
        "with the same key and body returns the first job instead of creating another.",
    ),
]


@router.post("", status_code=201, response_model=JobOut)
def submit_job(
    spec: JobSpec,
    session: SessionDep,
    settings: SettingsDep,
    celery: CeleryDep,
    caller: CallerDep,
    response: Response,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobOut:
    """Submit a job. 201 with the queued job; 422 names the bad field; 429 when a quota of the
    tenant is reached; 503 if the broker is down. A repeat with the same ``Idempotency-Key``
    and body answers 201 with the first job and the header ``Idempotent-Replayed: true``."""
    key = idempotency.check_key(idempotency_key)
    job, replayed = service.submit(
        session, celery, settings, spec, tenant_id=caller.tenant_id, idempotency_key=key
    )
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return JobOut.of(job)


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    caller: CallerDep,
    status: Annotated[str | None, Query(description="Only jobs in this status.")] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> JobList:
    """Jobs, newest first, with cursor pagination."""
    try:
        jobs, next_cursor = repository.list_jobs(
            session, status, limit, cursor, tenant_id=caller.tenant_id
        )
    except ValueError as e:
        raise InvalidSpec(str(e), "cursor") from None
    return JobList(items=[JobOut.of(j) for j in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: JobId, session: SessionDep, settings: SettingsDep, caller: CallerDep) -> JobOut:
    """Status, progress, timestamps and error reason of a job."""
    return JobOut.of(service.get(session, job_id, settings, tenant_id=caller.tenant_id))


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(job_id: JobId, session: SessionDep, caller: CallerDep) -> JobOut:
    """Cancel: a queued job at once, a running one within a few steps; 409 if finished."""
    return JobOut.of(service.cancel(session, job_id, tenant_id=caller.tenant_id))


@router.get("/{job_id}/metrics", response_model=MetricsOut)
def job_metrics(job_id: JobId, session: SessionDep, caller: CallerDep) -> MetricsOut:
    """Per-epoch train loss and dev metrics so far; final test metrics once succeeded."""
    job = service.get(session, job_id, tenant_id=caller.tenant_id)
    metrics = dict(job.metrics or {})
    epochs = metrics.pop("epochs", [])
    return MetricsOut(
        job_id=job.id,
        status=job.status,
        epochs=epochs,
        final=metrics if job.status == "succeeded" else None,
    )


@router.get("/{job_id}/artifacts", response_model=ArtifactList)
def list_artifacts(job_id: JobId, session: SessionDep, caller: CallerDep) -> ArtifactList:
    """The job's files with size (bytes) and sha256; empty until the job succeeds."""
    items = [
        ArtifactOut.of(a) for a in service.artifacts(session, job_id, tenant_id=caller.tenant_id)
    ]
    return ArtifactList(job_id=job_id, items=items, archive_url=f"/v1/jobs/{job_id}/archive")


@router.get("/{job_id}/artifacts/{name}")
def download_artifact(
    job_id: JobId, name: str, session: SessionDep, settings: SettingsDep, caller: CallerDep
) -> FileResponse:
    """One file of the job."""
    path = service.artifact_path(session, settings, job_id, name, tenant_id=caller.tenant_id)
    return FileResponse(path, filename=name, media_type="application/octet-stream")


@router.get("/{job_id}/archive")
def download_archive(
    job_id: JobId, session: SessionDep, settings: SettingsDep, caller: CallerDep
) -> FileResponse:
    """Every file of the job as one ``<job id>.tar.gz`` (a transformers directory)."""
    job = service.get(session, job_id, tenant_id=caller.tenant_id)
    names = [a.name for a in service.artifacts(session, job_id, tenant_id=caller.tenant_id)]
    if job.status != "succeeded" or not names:
        raise Conflict(f"job {job_id} is {job.status}; the archive exists once it succeeds")
    root = job_dir(settings, job_id)
    # Built in a temporary file (not in memory: students can be gigabytes), removed after sending.
    fd, tmp_name = tempfile.mkstemp(suffix=".tar.gz")
    os.close(fd)
    with tarfile.open(tmp_name, mode="w:gz") as tar:
        for name in names:
            tar.add(root / name, arcname=f"{job_id}/{name}")
    return FileResponse(
        tmp_name,
        media_type="application/gzip",
        filename=f"{job_id}.tar.gz",
        background=BackgroundTask(os.unlink, tmp_name),
    )
