"""A job's event log: what happened to it, in order (queued, started, stage changed, epoch
metrics, checkpoint saved, warning, retried, paused, resumed, succeeded, failed, cancelled).

Events are rows of ``job_events`` written in the same transaction as the change they report
(:func:`record` does not commit), so the log never disagrees with the job's status. The API
lists them (``GET /v1/jobs/{id}/events``) and streams them; webhooks are delivered from them.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from sqlalchemy import select
from sqlalchemy.orm import Session

from core import webhooks
from core.db import JobEvent, utcnow

EventType = Literal[
    "queued",
    "waiting",
    "started",
    "stage",
    "epoch",
    "checkpoint",
    "warning",
    "retried",
    "pausing",
    "paused",
    "resumed",
    "cancelling",
    "succeeded",
    "failed",
    "cancelled",
]
EVENT_TYPES: tuple[str, ...] = get_args(EventType)
"""Every event type. ``stage``: a training stage (or hop) began; ``epoch``: an evaluation's
metrics; ``checkpoint``: a checkpoint was saved; ``retried``: the job was re-queued after its
worker was lost."""

LEVELS = ("info", "warning", "error")


def record(
    session: Session,
    job_id: str,
    type_: str,
    message: str,
    *,
    level: str = "info",
    data: dict[str, Any] | None = None,
) -> JobEvent:
    """Add an event to job ``job_id``'s log (flushed, not committed: the caller commits it
    with the change it reports). An event sent as a webhook (succeeded, failed, cancelled,
    checkpoint) also gets its pending deliveries, in the same transaction (the outbox: see
    :func:`core.webhooks.enqueue`).

    Raises:
        ValueError: ``type_`` is not one of :data:`EVENT_TYPES` or ``level`` not one of
            :data:`LEVELS` (a programming error).
    """
    if type_ not in EVENT_TYPES:
        raise ValueError(f"unknown event type {type_!r}")
    if level not in LEVELS:
        raise ValueError(f"unknown event level {level!r}")
    event = JobEvent(
        job_id=job_id,
        created_at=utcnow(),
        level=level,
        type=type_,
        message=message,
        data=data or {},
    )
    session.add(event)
    session.flush()
    webhooks.enqueue(session, event)
    return event


def list_events(
    session: Session,
    job_id: str,
    *,
    after: int | None = None,
    limit: int = 100,
    type_: str | None = None,
) -> list[JobEvent]:
    """Job ``job_id``'s events with ``id > after`` (all when None), oldest first, at most
    ``limit``; only those of type ``type_`` when given."""
    q = select(JobEvent).where(JobEvent.job_id == job_id)
    if after is not None:
        q = q.where(JobEvent.id > after)
    if type_ is not None:
        q = q.where(JobEvent.type == type_)
    return list(session.scalars(q.order_by(JobEvent.id).limit(limit)))
