"""/v1/jobs: submit, list, read, cancel, pause, resume, delete, metrics, report, artifacts,
archive, checkpoints."""

from __future__ import annotations

import os
import tarfile
import tempfile
from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Response
from fastapi.responses import FileResponse, StreamingResponse
from starlette.background import BackgroundTask

from api.auth import CallerDep
from api.deps import CeleryDep, SessionDep, SettingsDep
from api.job_labels import JobSubmit, parse_pair
from api.params import (
    ArtifactName,
    CheckpointName,
    Cursor,
    JobId,
    MetadataFilter,
    NameFilter,
    StatusFilter,
)
from api.schemas import (
    ArtifactList,
    ArtifactOut,
    CheckpointList,
    CheckpointOut,
    JobList,
    JobOut,
    MetricsOut,
)
from core import idempotency, repository, service, validation
from core.errors import Conflict, DomainError, NotFound
from core.job_status import JobStatus
from core.settings import Settings
from core.storage import (
    CHUNK_BYTES,
    FILE_MODE,
    LocalStorage,
    ObjectNotFound,
    Storage,
    artifact_storage,
    join_key,
)
from core.upload_names import name_uploads_in_error
from kd_engine.contracts import load_metrics
from kd_engine.errors import SpecError
from kd_engine.names import CSP, REPORT_FILE

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
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
    spec: JobSubmit,
    session: SessionDep,
    settings: SettingsDep,
    celery: CeleryDep,
    caller: CallerDep,
    response: Response,
    idempotency_key: IdempotencyKeyHeader = None,
) -> JobOut:
    """Submit a job, optionally with a ``name`` and ``metadata`` (string labels). 201 with
    the queued job; 422 names the bad field; 429 when a quota of the
    tenant is reached; 503 if the broker is down. A repeat with the same ``Idempotency-Key``
    and body answers 201 with the first job and the header ``Idempotent-Replayed: true``."""
    key = idempotency.check_key(idempotency_key)
    try:
        job, replayed = service.submit(
            session,
            celery,
            settings,
            spec.job_spec(),
            tenant_id=caller.tenant_id,
            idempotency_key=key,
            name=spec.name,
            metadata=spec.metadata,
        )
    except (DomainError, SpecError) as e:  # an upload named by its filename too, not its id
        name_uploads_in_error(session, e, caller.tenant_id)
        raise
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return JobOut.of(job, validation.stored_plan(session, job.id))


@router.get("", response_model=JobList)
def list_jobs(
    session: SessionDep,
    caller: CallerDep,
    status: StatusFilter = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
    cursor: Cursor = None,
    name: NameFilter = None,
    name_contains: NameFilter = None,
    metadata: MetadataFilter = None,
) -> JobList:
    """Jobs, newest first, with cursor pagination; ``status``, ``name`` (exact),
    ``name_contains`` (case-insensitive) and ``metadata=key=value`` (repeatable, all must
    match) filter them. 422 for an unknown ``status`` (the message lists them), a
    ``metadata`` that is not ``key=value`` or a ``cursor`` this API did not make."""
    try:
        pairs = dict(parse_pair(p) for p in metadata or [])
    except ValueError as e:
        raise SpecError("metadata", f"metadata: {e}") from None
    try:
        jobs, next_cursor = repository.list_jobs(
            session,
            status,
            limit,
            cursor,
            tenant_id=caller.tenant_id,
            name=name,
            name_contains=name_contains,
            metadata=pairs,
        )
    except ValueError as e:
        raise SpecError("cursor", str(e)) from None
    return JobList(items=[JobOut.of(j) for j in jobs], next_cursor=next_cursor)


@router.get("/{job_id}", response_model=JobOut)
def get_job(job_id: JobId, session: SessionDep, caller: CallerDep) -> JobOut:
    """Status, progress, timestamps and error reason of a job, and its plan."""
    job = service.get(session, job_id, tenant_id=caller.tenant_id)
    return JobOut.of(job, validation.stored_plan(session, job.id))


@router.post("/{job_id}/cancel", response_model=JobOut)
def cancel_job(
    job_id: JobId,
    session: SessionDep,
    settings: SettingsDep,
    celery: CeleryDep,
    caller: CallerDep,
) -> JobOut:
    """Cancel: a waiting or queued job at once (jobs waiting for it then fail), a running one
    within a few steps; 409 if it has already finished (succeeded, failed or cancelled)."""
    return JobOut.of(
        service.cancel(
            session, job_id, tenant_id=caller.tenant_id, settings=settings, celery=celery
        )
    )


@router.delete("/{job_id}", status_code=204, response_class=Response)
def delete_job(
    job_id: JobId, session: SessionDep, settings: SettingsDep, caller: CallerDep
) -> Response:
    """Delete a finished job and its artifacts (204). 409 while it is queued, running or
    cancelling (cancel it first), or while an unfinished job uses its model as
    ``job:<id>``."""
    service.delete(session, settings, job_id, tenant_id=caller.tenant_id)
    return Response(status_code=204)


@router.get("/{job_id}/metrics", response_model=MetricsOut, response_model_exclude_unset=True)
def job_metrics(job_id: JobId, session: SessionDep, caller: CallerDep) -> MetricsOut:
    """Per-epoch train loss and dev metrics so far; final test metrics once succeeded."""
    job = service.get(session, job_id, tenant_id=caller.tenant_id)
    stored = dict(job.metrics or {})
    epochs = load_metrics({"epochs": stored.pop("epochs", [])}).epochs
    final = load_metrics(stored) if job.status == JobStatus.SUCCEEDED else None  # less its epochs
    return MetricsOut(job_id=job.id, status=job.status, epochs=epochs, final=final)


@router.get(
    "/{job_id}/report",
    response_model=None,
    responses={
        200: {"content": {"text/html": {}}, "description": "The report, one HTML page."},
        404: {"description": "No such job, or it has no report (yet); the message says why."},
    },
)
def job_report(
    job_id: JobId, session: SessionDep, settings: SettingsDep, caller: CallerDep
) -> FileResponse | StreamingResponse:
    """The job's report, ``report.html`` (text/html): teacher vs student quality, calibration,
    agreement and KL, confusion matrices, learning curves, latency and size, with the plots
    embedded; one self-contained page that runs no script. 404 until the job has succeeded
    (or when it has none: a job from before reports, or one whose report could not be drawn:
    the message says which)."""
    job = service.get(session, job_id, tenant_id=caller.tenant_id)
    names = {a.name for a in service.artifacts(session, job_id, tenant_id=caller.tenant_id)}
    if REPORT_FILE not in names:
        if job.status in (JobStatus.FAILED, JobStatus.CANCELLED):
            why = f" ({job.error})" if job.error and job.status == JobStatus.FAILED else ""
            raise NotFound(
                f"job {job_id} is {job.status}{why}: it stopped before its report was "
                "written (only a job that succeeds has one); submit it again to get one"
            )
        if job.status != JobStatus.SUCCEEDED:
            raise NotFound(f"job {job_id} is {job.status}; its report is written when it succeeds")
        report = load_metrics(job.metrics).report
        error = report.error if report is not None else None
        if report is not None and report.skipped:
            error = f"{report.skipped} in its spec"
        raise NotFound(
            f"job {job_id} has no report: {error}"
            if error
            else f"job {job_id} has no report (it finished before reports were written)"
        )
    key = service.artifact_key(session, settings, job_id, REPORT_FILE, tenant_id=caller.tenant_id)
    return _send(
        artifact_storage(settings),
        key,
        "text/html; charset=utf-8",
        {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff"},
    )


@router.get("/{job_id}/artifacts", response_model=ArtifactList)
def list_artifacts(job_id: JobId, session: SessionDep, caller: CallerDep) -> ArtifactList:
    """The job's files with size (bytes) and sha256; empty until the job succeeds."""
    items = [
        ArtifactOut.of(a) for a in service.artifacts(session, job_id, tenant_id=caller.tenant_id)
    ]
    return ArtifactList(job_id=job_id, items=items, archive_url=f"/v1/jobs/{job_id}/archive")


@router.get("/{job_id}/artifacts/{name}", response_model=None)
def download_artifact(
    job_id: JobId, name: ArtifactName, session: SessionDep, settings: SettingsDep, caller: CallerDep
) -> FileResponse | StreamingResponse:
    """One file of the job."""
    key = service.artifact_key(session, settings, job_id, name, tenant_id=caller.tenant_id)
    return _send(
        artifact_storage(settings),
        key,
        "application/octet-stream",
        {"content-disposition": f'attachment; filename="{name}"'},
    )


def _send(
    store: Storage, key: str, media_type: str, headers: dict[str, str]
) -> FileResponse | StreamingResponse:
    """The object ``key`` of ``store`` as a response: the file itself from a local folder,
    streamed in ``CHUNK_BYTES`` pieces (with its content-length) from a bucket."""
    if isinstance(store, LocalStorage):
        return FileResponse(store.local_path(key), media_type=media_type, headers=headers)
    size = store.size(key)
    body = store.open(key)  # streamed from the bucket, closed once sent

    def chunks() -> Iterator[bytes]:
        with body:
            while chunk := body.read(CHUNK_BYTES):
                yield chunk

    return StreamingResponse(
        chunks(), media_type=media_type, headers={"content-length": str(size), **headers}
    )


@router.get("/{job_id}/archive")
def download_archive(
    job_id: JobId, session: SessionDep, settings: SettingsDep, caller: CallerDep
) -> FileResponse:
    """Every file of the job as one ``<job id>.tar.gz`` (a transformers directory; members
    are 0644 files in a 0755 folder, owned by uid 0)."""
    job = service.get(session, job_id, tenant_id=caller.tenant_id)
    names = [a.name for a in service.artifacts(session, job_id, tenant_id=caller.tenant_id)]
    if job.status != JobStatus.SUCCEEDED or not names:
        raise Conflict(f"job {job_id} is {job.status}; the archive exists once it succeeds")
    mtime = (job.finished_at or job.created_at).timestamp()
    members = [(join_key(job_id, name), f"{job_id}/{name}") for name in names]
    return _tar_gz(
        settings,
        members,
        f"{job_id}.tar.gz",
        mtime,
        f"job {job_id}: an artifact is missing from the store",
    )


def _tar_gz(
    settings: Settings, members: list[tuple[str, str]], filename: str, mtime: float, missing: str
) -> FileResponse:
    """A ``filename`` tar.gz of the stored objects ``members`` ((key, path in the archive));
    0644 files with ``mtime`` (Unix seconds), owned by uid 0. Built in a temporary file (not in
    memory: students can be gigabytes), removed after sending.

    Raises:
        NotFound: an object is missing from the store (``missing`` says which).
    """
    store = artifact_storage(settings)
    fd, tmp_name = tempfile.mkstemp(suffix=".tar.gz")
    os.close(fd)
    try:
        with tarfile.open(tmp_name, mode="w:gz") as tar:
            for key, path in members:
                info = tarfile.TarInfo(path)
                info.size, info.mode, info.mtime = store.size(key), FILE_MODE, mtime
                with store.open(key) as f:
                    tar.addfile(info, f)
    except BaseException as e:
        os.unlink(tmp_name)
        if isinstance(e, ObjectNotFound):
            raise NotFound(missing) from None
        raise
    return FileResponse(
        tmp_name,
        media_type="application/gzip",
        filename=filename,
        background=BackgroundTask(os.unlink, tmp_name),
    )


@router.post("/{job_id}/pause", response_model=JobOut)
def pause_job(job_id: JobId, session: SessionDep, caller: CallerDep) -> JobOut:
    """Pause: a queued job at once (``paused``); a running one becomes ``pausing``, and its
    worker writes a checkpoint within a few steps, sets it ``paused`` and moves on to other
    jobs. 409 in any other status (``error.details.status`` names it)."""
    return JobOut.of(service.pause(session, job_id, tenant_id=caller.tenant_id))


@router.post("/{job_id}/resume", response_model=JobOut)
def resume_job(
    job_id: JobId, session: SessionDep, settings: SettingsDep, celery: CeleryDep, caller: CallerDep
) -> JobOut:
    """Resume a paused job: it is queued again and continues from its newest checkpoint.
    409 if it is not paused; 503 if the broker is down (it stays paused)."""
    return JobOut.of(service.resume(session, celery, settings, job_id, tenant_id=caller.tenant_id))


@router.get("/{job_id}/checkpoints", response_model=CheckpointList)
def list_checkpoints(job_id: JobId, session: SessionDep, caller: CallerDep) -> CheckpointList:
    """The job's stored checkpoints, oldest first: step, stage, hop, reason, dev metrics,
    size (bytes), and the URL of each one's student archive."""
    rows = service.job_checkpoints(session, job_id, tenant_id=caller.tenant_id)
    return CheckpointList(job_id=job_id, items=[CheckpointOut.of(c) for c in rows])


@router.get("/{job_id}/checkpoints/{name}/archive")
def download_checkpoint_archive(
    job_id: JobId,
    name: CheckpointName,
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
) -> FileResponse:
    """The student of one checkpoint as ``<job id>-<name>.tar.gz`` (a transformers directory
    under ``<job id>-<name>/``; 0644 files, owned by uid 0). 404 for an unknown checkpoint
    (or one removed since the listing)."""
    files = service.checkpoint_student_files(
        session, settings, job_id, name, tenant_id=caller.tenant_id
    )
    folder = f"{job_id}-{name}"
    return _tar_gz(
        settings,
        [(key, f"{folder}/{rel}") for key, rel in files],
        f"{folder}.tar.gz",
        0.0,
        f"checkpoint {name!r} of job {job_id} was removed meanwhile",
    )
