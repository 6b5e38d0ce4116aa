"""Per-tenant quotas: active jobs and stored bytes, each the tenant's own limit or the
settings' default (None: unlimited). Exceeding one is a 429 whose details give ``limit`` and
``current``."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from core import checkpoints
from core.db import Artifact, File, Job, Tenant
from core.errors import QuotaExceeded
from core.job_status import FINISHED, JOB_STATUSES
from core.settings import Settings

ACTIVE_STATUSES = tuple(s for s in JOB_STATUSES if s not in FINISHED)
"""Statuses that count against ``max_active_jobs``: every one but the final ones."""


@dataclass(frozen=True)
class Limits:
    """A tenant's effective limits; None is unlimited."""

    max_active_jobs: int | None
    max_stored_bytes: int | None


def limits(tenant: Tenant, settings: Settings) -> Limits:
    """The tenant's own quotas where set, else the settings' defaults."""
    return Limits(
        max_active_jobs=(
            tenant.max_active_jobs
            if tenant.max_active_jobs is not None
            else settings.default_max_active_jobs
        ),
        max_stored_bytes=(
            tenant.max_stored_bytes
            if tenant.max_stored_bytes is not None
            else settings.default_max_stored_bytes
        ),
    )


def active_jobs(session: Session, tenant_id: str) -> int:
    """The tenant's unfinished jobs (:data:`ACTIVE_STATUSES`: waiting ones included)."""
    q = select(func.count()).where(Job.tenant_id == tenant_id, Job.status.in_(ACTIVE_STATUSES))
    return int(session.scalar(q) or 0)


def stored_bytes(session: Session, tenant_id: str) -> int:
    """Bytes the tenant stores: its jobs' artifacts' ``size_bytes`` plus its uploaded files'
    (a model upload counts its unpacked files) plus its jobs' checkpoints' (at most
    ``checkpoints_keep`` per job, removed when the job succeeds or is deleted). The single
    place that counts a tenant's storage: add any new kind of stored file here."""
    artifacts = (
        select(func.coalesce(func.sum(Artifact.size_bytes), 0))
        .select_from(Artifact)
        .join(Job, Job.id == Artifact.job_id)
        .where(Job.tenant_id == tenant_id)
    )
    uploads = select(func.coalesce(func.sum(File.size_bytes), 0)).where(File.tenant_id == tenant_id)
    saved = int(session.scalar(checkpoints.tenant_bytes_query(tenant_id)) or 0)
    return int(session.scalar(artifacts) or 0) + int(session.scalar(uploads) or 0) + saved


def _tenant(session: Session, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:  # a key's tenant always exists (foreign key); kept for the type checker
        raise LookupError(f"no tenant {tenant_id}")
    return tenant


def check_active_jobs(session: Session, tenant_id: str, settings: Settings) -> None:
    """Room for one more active job.

    Raises:
        QuotaExceeded: the tenant has ``max_active_jobs`` active jobs already (429).
    """
    limit = limits(_tenant(session, tenant_id), settings).max_active_jobs
    if limit is None:
        return
    current = active_jobs(session, tenant_id)
    if current >= limit:
        raise QuotaExceeded(
            f"the tenant has {current} active jobs (waiting, queued, running, paused or "
            f"cancelling) and may have {limit}; wait for one to finish or cancel one",
            None,
            {"quota": "max_active_jobs", "limit": limit, "current": current},
        )


def check_stored_bytes(
    session: Session, tenant_id: str, settings: Settings, incoming_bytes: int = 0
) -> None:
    """Room to store ``incoming_bytes`` more (0: any room left at all).

    Raises:
        QuotaExceeded: the tenant stores ``max_stored_bytes`` already, or would exceed it with
            ``incoming_bytes`` (429).
    """
    limit = limits(_tenant(session, tenant_id), settings).max_stored_bytes
    if limit is None:
        return
    current = stored_bytes(session, tenant_id)
    if current >= limit or current + incoming_bytes > limit:
        raise QuotaExceeded(
            f"the tenant stores {current} bytes"
            + (f" and this adds {incoming_bytes}" if incoming_bytes else "")
            + f"; its limit is {limit} bytes: delete jobs or files to make room",
            None,
            {"quota": "max_stored_bytes", "limit": limit, "current": current},
        )
