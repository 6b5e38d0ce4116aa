"""Rules of the job lifecycle: what may be submitted, cancelled, downloaded."""

from __future__ import annotations

import logging
import uuid
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session

from core import (
    checkpoints,
    dependencies,
    events,
    idempotency,
    quotas,
    refs,
    repository,
    tenants,
    validation,
)
from core.db import Artifact, Job, JobCheckpoint, utcnow
from core.errors import Conflict, NotFound, Unavailable
from core.job_status import FINISHED, JobStatus
from core.queue import BrokerUnavailable, enqueue
from core.settings import Settings
from core.storage import InvalidKey, StorageError, artifact_storage, join_key
from kd_engine.names import STUDENT_DIR
from kd_engine.spec import (
    JobSpec,
)

log = logging.getLogger("distillery.api")


SUBMIT_ROUTE = "POST /v1/jobs"
NOT_QUEUED = "the job could not be queued"
"""How the ``error`` of a job the broker never took starts (see :func:`submit`)."""


def submit(
    session: Session,
    celery: Celery,
    settings: Settings,
    spec: JobSpec,
    *,
    tenant_id: str,
    idempotency_key: str | None = None,
    name: str | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[Job, bool]:
    """Validate references, check the tenant's quotas, persist a queued job of ``tenant_id``,
    commit, then enqueue it (holding no database connection while the broker is waited for).
    With an ``idempotency_key`` already used for the same spec, the earlier job is returned
    instead and nothing is created; returns the job and whether it is that earlier one
    (replayed). ``name`` and ``metadata`` (validated by :mod:`api.job_labels`) are stored on
    the job and count in the idempotency check like the spec.

    A job the broker did not take is kept as failed (its ``error`` starts with
    :data:`NOT_QUEUED`) and keeps its idempotency key: a retry with the same key and spec
    returns that same job, queued again (:func:`_queue_again`), rather than a new one. A
    submit that stored nothing (it failed before its commit) left no key behind either, so its
    retry creates the job.

    Raises:
        SpecError: a reference does not exist (or is another tenant's job) or does not fit
            the method (422).
        SpecError: the idempotency key was used with another spec (422).
        QuotaExceeded: the tenant has its maximum of active jobs or of stored bytes (429).
        Unavailable: the broker is down or did not answer within
            ``settings.broker_publish_timeout_s``; the job is kept as failed with that reason
            (503, ``details.job_id`` names it), never left queued without a message.
    """
    stored_spec = validation.spec_to_store(spec)
    labels = {k: v for k, v in (("name", name), ("metadata", metadata)) if v}
    request_sha256 = idempotency.body_sha256({**stored_spec, **labels})
    if idempotency_key is not None:
        earlier = idempotency.find(
            session,
            tenant_id,
            SUBMIT_ROUTE,
            idempotency_key,
            request_sha256,
            settings.idempotency_ttl_s,
        )
        if earlier is not None:
            return _replay(session, celery, settings, earlier, tenant_id), True
    pending = dependencies.check_references(session, spec, tenant_id)
    configs = validation.validate_references(
        session, spec, settings, tenant_id, defer_pending=bool(pending)
    )
    plan = validation.job_plan(spec, configs)
    planned: dict[str, Any] = {"plan": plan.as_dict()} if plan is not None else {}

    def create() -> str:
        quotas.check_active_jobs(session, tenant_id, settings)
        quotas.check_stored_bytes(session, tenant_id, settings)
        job_id = str(uuid.uuid4())
        row = repository.create_job(
            session,
            job_id,
            spec.method.name,
            stored_spec,
            tenant_id=tenant_id,
            queue=settings.queue,
            status=JobStatus.WAITING if pending else JobStatus.QUEUED,
        )
        row.name, row.labels = name, metadata or None
        if pending:
            dependencies.add_dependencies(session, job_id, pending)
            events.record(
                session,
                job_id,
                "waiting",
                f"{spec.method.name} job waiting for job {', '.join(pending)} to succeed",
                data={"method": spec.method.name, "depends_on": pending, **planned},
            )
            return job_id
        events.record(
            session,
            job_id,
            "queued",
            f"{spec.method.name} job queued",
            data={"method": spec.method.name, **planned},
        )
        return job_id

    outcome = idempotency.create_once(
        session,
        tenant_id=tenant_id,
        route=SUBMIT_ROUTE,
        key=idempotency_key,
        request_sha256=request_sha256,
        ttl_s=settings.idempotency_ttl_s,
        create=create,
    )
    job = get(session, outcome.resource_id, tenant_id=tenant_id)
    if outcome.replayed:
        return job, True
    if job.status == JobStatus.WAITING:  # not sent; released here if its dependency just finished
        dependencies.release_waiting(session, settings, celery, only=[job.id])
        return get(session, job.id, tenant_id=tenant_id), False
    _send(session, celery, settings, job)
    return job, False


def _send(session: Session, celery: Celery, settings: Settings, job: Job) -> None:
    """Enqueue the queued ``job``; the session's transaction is ended first, so that no
    database connection is held while the broker is waited for (up to
    ``settings.broker_publish_timeout_s``, however many submits wait at once).

    Raises:
        Unavailable: the broker did not take it; the job is then failed with a reason that
            starts with :data:`NOT_QUEUED` (503).
    """
    session.commit()  # nothing pending: returns the connection to the pool (rows stay loaded)
    try:
        enqueue(celery, job.id, job.queue, settings.broker_publish_timeout_s)
    except BrokerUnavailable as e:
        repository.transition(
            session,
            job.id,
            (JobStatus.QUEUED,),
            JobStatus.FAILED,
            error=f"{NOT_QUEUED} (broker unavailable: {e}); submit it again with the same "
            "Idempotency-Key (or without one)",
            finished_at=utcnow(),
        )
        events.record(
            session,
            job.id,
            "failed",
            "the broker is unavailable; the job was not queued",
            level="error",
            data={"not_queued": True},
        )
        session.commit()
        raise Unavailable(
            f"the broker is unavailable; job {job.id} was not queued (it is failed): submit "
            "again, with the same Idempotency-Key to queue this same job",
            details={"job_id": job.id},
        ) from None


def _never_queued(job: Job) -> bool:
    """Whether ``job`` failed because the broker never took it (it never ran)."""
    return (
        job.status == JobStatus.FAILED
        and job.started_at is None
        and (job.error or "").startswith(NOT_QUEUED)
    )


def _replay(
    session: Session, celery: Celery, settings: Settings, job_id: str, tenant_id: str
) -> Job:
    """The job an earlier request with the same idempotency key created; queued again when the
    broker never took it (:func:`_queue_again`)."""
    job = get(session, job_id, tenant_id=tenant_id)
    if _never_queued(job):
        return _queue_again(session, celery, settings, job, tenant_id)
    return job


def _queue_again(
    session: Session, celery: Celery, settings: Settings, job: Job, tenant_id: str
) -> Job:
    """Queue again a job of ``tenant_id`` that failed because the broker never took it (a
    retry of its submit with the same idempotency key): failed -> queued under the tenant's
    quotas, a ``queued`` event, then sent. A concurrent retry that queued it first wins (the
    job is returned as it is).

    Raises:
        QuotaExceeded: the tenant has its maximum of active jobs or of stored bytes (429).
        Unavailable: the broker still does not take it (503); it is failed again.
    """
    try:
        tenants.lock_tenant(session, tenant_id)
        quotas.check_active_jobs(session, tenant_id, settings)
        quotas.check_stored_bytes(session, tenant_id, settings)
        if not repository.transition(
            session,
            job.id,
            (JobStatus.FAILED,),
            JobStatus.QUEUED,
            error=None,
            finished_at=None,
        ):
            session.rollback()
            return get(session, job.id, tenant_id=tenant_id)
        events.record(
            session,
            job.id,
            "queued",
            "queued again by a retry of its submit with the same Idempotency-Key",
            data={"method": job.method, "idempotent_retry": True},
        )
        session.commit()
    except BaseException:
        session.rollback()
        raise
    session.refresh(job)
    _send(session, celery, settings, job)
    return job


def get(session: Session, job_id: str, *, tenant_id: str) -> Job:
    """The job of ``tenant_id``, as stored (reading never changes it: a job whose worker was
    lost is re-queued or failed by the reconciler, :mod:`worker.reconciler`).

    Raises:
        NotFound: no such job, or another tenant's (the same answer).
    """
    job = repository.get_tenant_job(session, job_id, tenant_id=tenant_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return job


def cancel(
    session: Session,
    job_id: str,
    *,
    tenant_id: str,
    settings: Settings | None = None,
    celery: Celery | None = None,
) -> Job:
    """Cancel a job of ``tenant_id``: waiting, queued or paused -> cancelled at once (with
    ``settings`` and ``celery``, the jobs waiting for it then fail naming it); running or
    pausing -> cancelling (the worker stops within a few steps); cancelling stays as it is.

    Raises:
        NotFound: no such job (or another tenant's).
        Conflict: the job had already finished (succeeded, failed or cancelled) before this
            request.
    """
    job = get(session, job_id, tenant_id=tenant_id)
    now = utcnow()
    was = job.status
    if repository.transition(
        session,
        job_id,
        (JobStatus.WAITING, JobStatus.QUEUED, JobStatus.PAUSED),
        JobStatus.CANCELLED,
        finished_at=now,
    ):
        where = was if was in (JobStatus.WAITING, JobStatus.PAUSED) else JobStatus.QUEUED
        events.record(session, job_id, "cancelled", f"cancelled while {where}")
        session.commit()
        if settings is not None and celery is not None:
            dependencies.release_after(session, settings, celery, job_id)
        session.refresh(job)
        return job
    if repository.transition(
        session, job_id, (JobStatus.RUNNING, JobStatus.PAUSING), JobStatus.CANCELLING
    ):
        events.record(session, job_id, "cancelling", "cancel requested; the worker stops soon")
        session.commit()
        session.refresh(job)
        return job
    session.rollback()
    session.refresh(job)
    if job.status in FINISHED:
        raise Conflict(f"job {job_id} has already {_finished_verb(job.status)}; nothing to cancel")
    return job


def _finished_verb(status: str) -> str:
    return "been cancelled" if status == JobStatus.CANCELLED else status


def delete(session: Session, settings: Settings, job_id: str, *, tenant_id: str) -> None:
    """Delete a finished job: its row, its artifact rows and its artifact directory.

    Raises:
        NotFound: no such job (or another tenant's).
        Conflict: the job is queued, running or cancelling (cancel it first), or its model is
            named as ``job:<id>`` by a job that has not finished (the message names it).
    """
    job = get(session, job_id, tenant_id=tenant_id)
    if job.status not in FINISHED:
        raise Conflict(
            f"job {job_id} is {job.status}; cancel it first (POST /v1/jobs/{job_id}/cancel) and "
            "delete it once it has finished"
        )
    users = repository.jobs_using_model(session, job_id)
    if users:
        raise Conflict(
            f"the model of job {job_id} is used by unfinished job(s) {', '.join(users)} "
            f"(as job:{job_id}); delete it once they have finished"
        )
    if not repository.delete_finished(session, job_id):
        session.rollback()
        raise Conflict(f"job {job_id} changed while it was being deleted; try again")
    session.commit()
    remove_artifacts(settings, job_id)


def remove_artifacts(settings: Settings, job_id: str) -> None:
    """Remove a job's artifacts from the artifact store (nothing if it has none). A failure is
    logged, not raised: the row is already gone and the files can be removed by hand."""
    try:
        artifact_storage(settings).delete_prefix(refs.job_key(job_id))
    except (OSError, StorageError):
        log.exception("job %s: could not remove its artifacts", job_id)


def artifacts(session: Session, job_id: str, *, tenant_id: str) -> list[Artifact]:
    """The stored files of a job of ``tenant_id`` (empty until it succeeds).

    Raises:
        NotFound: no such job (or another tenant's).
    """
    get(session, job_id, tenant_id=tenant_id)
    return repository.list_artifacts(session, job_id)


def artifact_key(
    session: Session, settings: Settings, job_id: str, name: str, *, tenant_id: str
) -> str:
    """The storage key of one artifact of a job of ``tenant_id``; only names recorded for the
    job are served.

    Raises:
        NotFound: no such job (or another tenant's) or no such file (or it is gone from the
            store).
    """
    known = {a.name for a in artifacts(session, job_id, tenant_id=tenant_id)}
    if name not in known:
        raise NotFound(f"job {job_id} has no artifact {name!r}")
    store = artifact_storage(settings)
    try:
        key = join_key(job_id, name)
    except InvalidKey:
        raise NotFound(f"job {job_id} has no artifact {name!r}") from None
    if not store.exists(key):
        raise NotFound(f"artifact {name!r} of job {job_id} is missing from the store")
    return key


def pause(session: Session, job_id: str, *, tenant_id: str) -> Job:
    """Pause a job of ``tenant_id``: queued -> paused at once (its queued task is skipped
    when a worker receives it); running -> pausing (the worker writes a ``pause`` checkpoint
    at its next check, then sets it paused and is free for other jobs).

    Raises:
        NotFound: no such job (or another tenant's).
        Conflict: the job is in any other status (``details.status`` names it).
    """
    job = get(session, job_id, tenant_id=tenant_id)
    if repository.transition(session, job_id, (JobStatus.QUEUED,), JobStatus.PAUSED):
        events.record(session, job_id, "paused", "paused while queued; resume it to queue it again")
    elif repository.transition(session, job_id, (JobStatus.RUNNING,), JobStatus.PAUSING):
        events.record(
            session, job_id, "pausing", "pause requested; the worker checkpoints and stops soon"
        )
    else:
        session.rollback()
        session.refresh(job)
        raise Conflict(
            f"job {job_id} is {job.status}; only a queued or running job can be paused",
            details={"status": job.status},
        )
    session.commit()
    session.refresh(job)
    return job


def resume(
    session: Session, celery: Celery, settings: Settings, job_id: str, *, tenant_id: str
) -> Job:
    """Resume a paused job of ``tenant_id``: paused -> queued, and queued again on the broker;
    the worker that claims it continues from its newest checkpoint (from the start when it
    has none, e.g. paused while queued).

    Raises:
        NotFound: no such job (or another tenant's).
        Conflict: the job is not paused (``details.status`` names its status).
        Unavailable: the broker is down; the job stays paused (503).
    """
    job = get(session, job_id, tenant_id=tenant_id)
    if not repository.transition(session, job_id, (JobStatus.PAUSED,), JobStatus.QUEUED):
        session.rollback()
        session.refresh(job)
        raise Conflict(
            f"job {job_id} is {job.status}; only a paused job can be resumed",
            details={"status": job.status},
        )
    events.record(
        session, job_id, "queued", "resumed by request; queued again", data={"resume": True}
    )
    session.commit()
    try:
        enqueue(celery, job_id, job.queue)  # the queue its memory was checked for
    except BrokerUnavailable:
        if repository.transition(session, job_id, (JobStatus.QUEUED,), JobStatus.PAUSED):
            events.record(
                session,
                job_id,
                "paused",
                "the broker is unavailable; the job was not queued and stays paused",
                level="warning",
            )
        session.commit()
        raise Unavailable(
            "the broker is unavailable; the job stays paused, resume it again later"
        ) from None
    session.refresh(job)
    return job


def job_checkpoints(session: Session, job_id: str, *, tenant_id: str) -> list[JobCheckpoint]:
    """The checkpoints of a job of ``tenant_id``, oldest first.

    Raises:
        NotFound: no such job (or another tenant's).
    """
    get(session, job_id, tenant_id=tenant_id)
    return checkpoints.list_checkpoints(session, job_id)


def checkpoint_student_files(
    session: Session, settings: Settings, job_id: str, name: str, *, tenant_id: str
) -> list[tuple[str, str]]:
    """``(key, relative path)`` of each stored file of the ``student/`` folder of checkpoint
    ``name`` of a job of ``tenant_id``, sorted.

    Raises:
        NotFound: no such job (or another tenant's), no such checkpoint, or its files are gone.
    """
    get(session, job_id, tenant_id=tenant_id)
    row = checkpoints.get_checkpoint(session, job_id, name)
    if row is None:
        raise NotFound(f"job {job_id} has no checkpoint {name!r}")
    prefix = join_key(checkpoints.checkpoint_key(job_id, name), STUDENT_DIR)
    keys = artifact_storage(settings).list_keys(prefix)
    if not keys:
        raise NotFound(f"checkpoint {name!r} of job {job_id} is missing from the store")
    return [(k, k.removeprefix(prefix + "/")) for k in keys]
