"""Queries on jobs and artifacts. Every status change is a conditional UPDATE, so a task
delivered twice, or a cancel racing a finish, changes a row at most once."""

from __future__ import annotations

import base64
import json
from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, func, or_, select, update
from sqlalchemy.orm import Session

from core.db import Artifact, IdempotencyKey, Job, utcnow
from core.job_status import FINISHED, INITIAL, LIVE, JobStatus, check_transition
from core.refs import is_job_id


def create_job(
    session: Session,
    job_id: str,
    method: str,
    spec: dict[str, Any],
    *,
    tenant_id: str,
    queue: str = "cpu",
    status: JobStatus = JobStatus.QUEUED,
) -> Job:
    """Insert a job of ``tenant_id`` in ``status`` (``queued``, or ``waiting`` for a job that
    names an unfinished one) bound for the Celery queue ``queue`` (the API passes its
    ``DISTILLERY_QUEUE``; ``cpu``, the settings' default, for callers that do not care), not
    committed.

    Raises:
        ValueError: ``status`` is not one a job starts in (:data:`core.job_status.INITIAL`).
    """
    if status not in INITIAL:
        raise ValueError(f"a job starts queued or waiting, not {status}")
    now = utcnow()
    job = Job(
        id=job_id,
        tenant_id=tenant_id,
        status=status,
        queue=queue,
        method=method,
        spec=spec,
        created_at=now,
        updated_at=now,
    )
    session.add(job)
    session.flush()
    return job


def get_job(session: Session, job_id: str) -> Job | None:
    """The job whoever owns it, or None. For the worker; the API uses :func:`get_tenant_job`."""
    if not is_job_id(job_id):
        return None
    return session.get(Job, job_id)


def get_tenant_job(session: Session, job_id: str, *, tenant_id: str) -> Job | None:
    """The job if ``tenant_id`` owns it, else None (another tenant's job looks missing; at once,
    without a query, when ``job_id`` is not a job id)."""
    if not is_job_id(job_id):
        return None
    return session.scalar(select(Job).where(Job.id == job_id, Job.tenant_id == tenant_id))


def encode_cursor(job: Job) -> str:
    """An opaque cursor pointing after ``job`` in newest-first order."""
    raw = json.dumps([job.created_at.isoformat(), job.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, str]:
    """Inverse of :func:`encode_cursor`: a timezone-aware creation time and a job id.

    Raises:
        ValueError: not a cursor this API made (not base64 of a JSON list of an ISO 8601 time
            with its zone and a job id; anything else, NUL bytes included, is refused here and
            never reaches the database).
    """
    invalid = "not a valid cursor; pass the next_cursor of the previous page as it was given"
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        data = json.loads(base64.urlsafe_b64decode(padded.encode("ascii")))
    except (ValueError, TypeError, RecursionError) as e:  # UnicodeError is a ValueError
        raise ValueError(invalid) from e
    if not (isinstance(data, list) and len(data) == 2 and all(isinstance(x, str) for x in data)):
        raise ValueError(invalid)
    created, job_id = data
    if not is_job_id(job_id):
        raise ValueError(invalid)
    try:
        when = datetime.fromisoformat(created)
    except ValueError as e:
        raise ValueError(invalid) from e
    if when.tzinfo is None:
        raise ValueError(invalid)
    return when, job_id


def list_jobs(
    session: Session,
    status: str | None,
    limit: int,
    cursor: str | None,
    *,
    tenant_id: str,
    name: str | None = None,
    name_contains: str | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[list[Job], str | None]:
    """A page of the tenant's jobs, newest first, and the cursor of the next page (None at
    the end); ``name`` matches exactly, ``name_contains`` case-insensitively anywhere in the
    name, and each ``metadata`` (key, value) must be in the job's metadata."""
    q = select(Job).where(Job.tenant_id == tenant_id)
    if status:
        q = q.where(Job.status == status)
    if name:
        q = q.where(Job.name == name)
    if name_contains:
        escaped = name_contains.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
        q = q.where(Job.name.ilike(f"%{escaped}%", escape="\\"))
    for key, value in (metadata or {}).items():
        q = q.where(Job.labels[key].as_string() == value)
    if cursor:
        created, job_id = decode_cursor(cursor)
        q = q.where(or_(Job.created_at < created, and_(Job.created_at == created, Job.id < job_id)))
    rows = list(session.scalars(q.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)))
    next_cursor = encode_cursor(rows[limit - 1]) if len(rows) > limit else None
    return rows[:limit], next_cursor


def transition(
    session: Session,
    job_id: str,
    from_statuses: tuple[JobStatus, ...],
    to_status: JobStatus,
    *,
    on_attempt: int | None = None,
    **values: Any,
) -> bool:
    """Set ``status = to_status`` (and ``values``) only if the status is one of
    ``from_statuses`` and, with ``on_attempt``, the job is still on that attempt (a worker that
    stalled past its heartbeat timeout, whose job was re-queued and claimed again, must not
    finish the new attempt's job). Returns whether the row changed. Not committed.

    The one place a job's status changes (but its creation, :func:`create_job`): every pair
    ``from_statuses`` -> ``to_status`` must be in the lifecycle's table
    (:data:`core.job_status.TRANSITIONS`).

    Raises:
        core.job_status.IllegalTransition: the table does not let ``to_status`` follow one of
            ``from_statuses`` (a bug of the caller; nothing is changed).
    """
    sources = check_transition(from_statuses, to_status)
    if "status" in values:
        raise ValueError("the status is to_status; pass it once")
    now = utcnow()
    where = [Job.id == job_id, Job.status.in_(sources)]
    if on_attempt is not None:
        where.append(Job.attempt == on_attempt)
    res = session.execute(
        update(Job)
        .where(*where)
        .values(status=to_status, updated_at=now, **values)
        .execution_options(synchronize_session=False)
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


def owns(session: Session, job_id: str, attempt: int) -> bool:
    """Whether job ``job_id`` is still running (or pausing, cancelling) on ``attempt``."""
    status = session.scalar(select(Job.status).where(Job.id == job_id, Job.attempt == attempt))
    return status in LIVE


def claim(session: Session, job_id: str, worker: str) -> bool:
    """queued -> running, attempt + 1. False when another delivery (or a cancel) got there first."""
    now = utcnow()
    return transition(
        session,
        job_id,
        (JobStatus.QUEUED,),
        JobStatus.RUNNING,
        attempt=Job.attempt + 1,
        started_at=now,
        heartbeat_at=now,
        worker=worker,
        progress={"stage": "claimed", "epoch": 0, "step": 0, "total_steps": 0, "losses": {}},
    )


def heartbeat(
    session: Session,
    job_id: str,
    progress: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    attempt: int | None = None,
) -> str | None:
    """Record progress and a heartbeat on a running (or pausing, cancelling) job; return its
    current status. With ``attempt``, only while the job is on that attempt (a stalled
    attempt whose job was re-queued and claimed again writes nothing and gets None)."""
    values: dict[str, Any] = {
        "progress": progress,
        "heartbeat_at": utcnow(),
        "updated_at": utcnow(),
    }
    if metrics is not None:
        values["metrics"] = metrics
    where = [Job.id == job_id]
    if attempt is not None:
        where.append(Job.attempt == attempt)
    session.execute(
        update(Job)
        .where(*where, Job.status.in_(LIVE))
        .values(**values)
        .execution_options(synchronize_session=False)
    )
    return session.scalar(select(Job.status).where(*where))


def replace_artifacts(session: Session, job_id: str, files: list[tuple[str, int, str]]) -> None:
    """Store (name, size_bytes, sha256) rows for a job, replacing earlier ones."""
    for old in session.scalars(select(Artifact).where(Artifact.job_id == job_id)):
        session.delete(old)
    session.flush()
    session.add_all(Artifact(job_id=job_id, name=n, size_bytes=s, sha256=h) for n, s, h in files)


def list_artifacts(session: Session, job_id: str) -> list[Artifact]:
    """The job's artifacts, by name."""
    return list(
        session.scalars(select(Artifact).where(Artifact.job_id == job_id).order_by(Artifact.name))
    )


def _mentions(value: Any, needle: str) -> bool:
    """Whether ``needle`` is one of the strings anywhere in a JSON value."""
    if isinstance(value, str):
        return value == needle
    if isinstance(value, list):
        return any(_mentions(v, needle) for v in value)
    if isinstance(value, dict):
        return any(_mentions(v, needle) for v in value.values())
    return False


def jobs_using_model(session: Session, job_id: str) -> list[str]:
    """Ids of the unfinished (queued, running, cancelling) jobs whose spec names the model of
    ``job_id`` as ``job:<job_id>`` (teacher, student, generator, an assistant...), oldest
    first. Unfinished jobs are few, so their specs are scanned here (same on SQLite and
    PostgreSQL)."""
    ref = f"job:{job_id}"
    q = select(Job.id, Job.spec).where(Job.status.not_in(FINISHED)).order_by(Job.created_at)
    return [row.id for row in session.execute(q) if _mentions(row.spec, ref)]


def delete_finished(session: Session, job_id: str) -> bool:
    """Delete a finished job's row, its artifact rows and the idempotency keys that name it
    (a retry with such a key then submits anew). False when the job is missing
    or no longer finished. Not committed."""
    res = session.execute(
        delete(Job)
        .where(Job.id == job_id, Job.status.in_(FINISHED))
        .execution_options(synchronize_session=False)
    )
    if not res.rowcount:  # type: ignore[attr-defined]
        return False
    session.execute(  # the foreign key cascades too; explicit for a database without it
        delete(Artifact)
        .where(Artifact.job_id == job_id)
        .execution_options(synchronize_session=False)
    )
    session.execute(  # a replay of its Idempotency-Key would name a job that is gone
        delete(IdempotencyKey)
        .where(IdempotencyKey.resource_id == job_id)
        .execution_options(synchronize_session=False)
    )
    return True


def finished_before(session: Session, before: datetime) -> list[str]:
    """Ids of jobs that finished before ``before`` (timezone-aware), oldest first (a finished
    job without ``finished_at`` counts from its last update)."""
    finished = func.coalesce(Job.finished_at, Job.updated_at)
    q = select(Job.id).where(Job.status.in_(FINISHED), finished < before).order_by(finished)
    return list(session.scalars(q))
