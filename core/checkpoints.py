"""Queries on a job's checkpoints (table ``job_checkpoints``) and where they are stored.

A checkpoint's files live in the artifact store under ``<job id>/checkpoints/<name>/``
(:func:`checkpoint_key`); they are not artifacts (the ``artifacts`` table lists the final
output only). Nothing here commits: the caller commits with the event it records.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from core.db import Job, JobCheckpoint, utcnow
from core.refs import job_key
from core.storage import join_key

CHECKPOINTS_DIR = "checkpoints"
"""The folder of a job's checkpoints inside its artifact prefix."""

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$")
"""A checkpoint name (``step-00000040``, ``hop2-step-00000040``): letters, digits, ``_``, ``-``."""


def is_name(name: str) -> bool:
    """Whether ``name`` can be a checkpoint's name (so it cannot escape its folder)."""
    return bool(NAME.match(name))


def checkpoint_key(job_id: str, name: str | None = None) -> str:
    """The store prefix of checkpoint ``name`` of job ``job_id`` (of all of them when None).

    Raises:
        ValueError: ``job_id`` is not a job id or ``name`` not a checkpoint name.
    """
    if name is None:
        return join_key(job_key(job_id), CHECKPOINTS_DIR)
    if not is_name(name):
        raise ValueError(f"{name!r} is not a checkpoint name")
    return join_key(job_key(job_id), CHECKPOINTS_DIR, name)


def add(
    session: Session,
    job_id: str,
    *,
    name: str,
    step: int,
    total_steps: int,
    hop: int,
    stage: str,
    reason: str,
    dev: dict[str, Any],
    files: Sequence[tuple[str, int, str]],
    attempt: int,
) -> JobCheckpoint:
    """Record a stored checkpoint (replacing a row of the same name: a resumed attempt may save
    a step again). ``files`` is ``(path, size_bytes, sha256)`` per file. Flushed, not
    committed."""
    session.execute(
        delete(JobCheckpoint)
        .where(JobCheckpoint.job_id == job_id, JobCheckpoint.name == name)
        .execution_options(synchronize_session=False)
    )
    row = JobCheckpoint(
        job_id=job_id,
        name=name,
        step=step,
        total_steps=total_steps,
        hop=hop,
        stage=stage,
        reason=reason,
        dev=dict(dev),
        size_bytes=sum(f[1] for f in files),
        files=[list(f) for f in files],
        created_at=utcnow(),
        attempt=attempt,
    )
    session.add(row)
    session.flush()
    return row


def list_checkpoints(session: Session, job_id: str) -> list[JobCheckpoint]:
    """The job's checkpoints, oldest first (the last one is the newest)."""
    q = select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)
    return list(session.scalars(q.order_by(JobCheckpoint.created_at, JobCheckpoint.name)))


def newest(session: Session, job_id: str) -> JobCheckpoint | None:
    """The job's newest checkpoint (the one a resumed attempt starts from), or None."""
    q = select(JobCheckpoint).where(JobCheckpoint.job_id == job_id)
    q = q.order_by(JobCheckpoint.created_at.desc(), JobCheckpoint.name.desc()).limit(1)
    return session.scalars(q).first()


def get_checkpoint(session: Session, job_id: str, name: str) -> JobCheckpoint | None:
    """Checkpoint ``name`` of the job, or None."""
    if not is_name(name):
        return None
    return session.get(JobCheckpoint, (job_id, name))


def beyond_keep(session: Session, job_id: str, keep: int) -> list[str]:
    """Names of the job's checkpoints older than its ``keep`` newest, oldest first."""
    rows = list_checkpoints(session, job_id)
    return [r.name for r in rows[: max(0, len(rows) - keep)]]


def remove(session: Session, job_id: str, names: Sequence[str] | None = None) -> int:
    """Delete the rows of checkpoints ``names`` of the job (all when None); how many. Not
    committed (the caller removes their files)."""
    q = delete(JobCheckpoint).where(JobCheckpoint.job_id == job_id)
    if names is not None:
        q = q.where(JobCheckpoint.name.in_(list(names)))
    res = session.execute(q.execution_options(synchronize_session=False))
    return int(res.rowcount)  # type: ignore[attr-defined]


def tenant_bytes_query(tenant_id: str) -> Any:
    """A scalar select of the bytes the tenant's checkpoints store (for
    :func:`core.quotas.stored_bytes`)."""
    return (
        select(func.coalesce(func.sum(JobCheckpoint.size_bytes), 0))
        .select_from(JobCheckpoint)
        .join(Job, Job.id == JobCheckpoint.job_id)
        .where(Job.tenant_id == tenant_id)
    )
