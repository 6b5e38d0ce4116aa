"""/v1/jobs/{id}/events: a job's event log, as pages and as a live Server-Sent Events stream."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Header, Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import select
from sse_starlette import EventSourceResponse, ServerSentEvent

from api.auth import CallerDep
from api.deps import SessionDep, SettingsDep
from api.params import JobId
from core import service, tenants
from core.db import Job
from core.events import EventType, list_events
from core.job_status import FINISHED
from core.webhooks import event_dict
from kd_engine.errors import SpecError

router = APIRouter(prefix="/v1/jobs", tags=["events"])

FINAL_EVENTS: tuple[str, ...] = FINISHED
"""The event types that end a job's stream (each final status records its own event)."""
STREAM_BATCH = 200
KEY_REVOKED_COMMENT = "the API key of this stream was revoked (or its tenant removed); closed"
"""The comment an event stream ends with when its key no longer authenticates (a client that
reconnects then gets a 401)."""
KEEP_ALIVE_COMMENT = "keep-alive"
"""The comment sent every ``events_stream_keepalive_s`` (sse-starlette's ping)."""

After = Annotated[
    int | None,
    Query(ge=0, le=2**63 - 1, description="Only events with an id above this one."),
]


class EventOut(BaseModel):
    """One event: ``id`` orders a job's events; ``time`` (ISO 8601, UTC); ``level`` info,
    warning or error; ``type`` one of the event types; ``data`` its details."""

    id: int
    time: str
    level: str
    type: str
    message: str
    data: dict[str, Any]


class EventList(BaseModel):
    """A page of events, oldest first; ``next_after`` is the ``after`` of the next page, or
    null when this page is the last (so far)."""

    events: list[EventOut]
    next_after: int | None = Field(None)


@router.get("/{job_id}/events", response_model=EventList)
def job_events(
    job_id: JobId,
    session: SessionDep,
    caller: CallerDep,
    after: After = None,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    type: Annotated[EventType | None, Query(description="Only events of this type.")] = None,
) -> EventList:
    """The job's events with ``id > after``, oldest first, at most ``limit`` (1..500); only
    those of ``type`` when given. 404 for no such job (or another tenant's); 422 names a bad
    parameter."""
    service.get(session, job_id, tenant_id=caller.tenant_id)
    rows = list_events(session, job_id, after=after, limit=limit + 1, type_=type)
    next_after = rows[limit - 1].id if len(rows) > limit else None
    return EventList(
        events=[EventOut(**event_dict(e)) for e in rows[:limit]], next_after=next_after
    )


SSE_SEPARATOR = "\n"
"""Line ends of the stream (sse-starlette's default is CRLF; every parser accepts LF)."""


def sse_message(event: dict[str, Any]) -> ServerSentEvent:
    """One Server-Sent Event: ``id:`` the event id, ``event:`` its type, ``data:`` its JSON
    (one line: ``json.dumps`` escapes newlines)."""
    return ServerSentEvent(
        json.dumps(event), id=str(event["id"]), event=event["type"], sep=SSE_SEPARATOR
    )


def _keep_alive() -> ServerSentEvent:
    return ServerSentEvent(comment=KEEP_ALIVE_COMMENT, sep=SSE_SEPARATOR)


@router.get(
    "/{job_id}/events/stream",
    response_class=EventSourceResponse,
    responses={200: {"content": {"text/event-stream": {}}, "description": "The event stream."}},
)
def stream_job_events(
    job_id: JobId,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    after: After = None,
    last_event_id: Annotated[
        str | None,
        Header(
            alias="Last-Event-ID",
            max_length=32,
            description="Resume after this event id (sent by an EventSource reconnecting); "
            "wins over ?after.",
        ),
    ] = None,
) -> EventSourceResponse:
    """The job's events as Server-Sent Events (``text/event-stream``, written by
    sse-starlette's ``EventSourceResponse``), from ``Last-Event-ID`` or ``after`` (default: the
    first), then live as they happen; a ``: keep-alive`` comment every
    ``events_stream_keepalive_s`` (the library's ping); the stream ends when the client goes
    away, after a final event (succeeded, failed, cancelled), or at once when the job has
    finished and its final event was already sent. Every ``events_stream_auth_check_s`` the
    key it was opened with is checked again: once revoked (or its tenant removed) the stream
    ends with a comment saying so. 404 for no such job (or another tenant's)."""
    service.get(session, job_id, tenant_id=caller.tenant_id)
    start = after
    if last_event_id is not None and last_event_id.strip():
        try:
            start = int(last_event_id.strip())
        except ValueError:
            raise SpecError(
                "Last-Event-ID", "Last-Event-ID: must be an event id (an integer)"
            ) from None
        if start < 0:
            raise SpecError("Last-Event-ID", "Last-Event-ID: must be 0 or more")
    session.close()  # the stream reads with short sessions of its own; hold no connection
    sessions = request.app.state.sessionmaker

    def fetch(cursor: int | None, check_key: bool) -> tuple[bool, str | None, list[dict[str, Any]]]:
        # The key first (when a check is due), then the status: a final status is committed
        # with its final event, so the events read after it include that event.
        with sessions() as s:
            if check_key and not tenants.key_is_valid(s, caller.key_id, caller.tenant_id):
                return False, None, []
            status = s.scalar(select(Job.status).where(Job.id == job_id))
            rows = list_events(s, job_id, after=cursor, limit=STREAM_BATCH)
            return True, status, [event_dict(e) for e in rows]

    async def body() -> AsyncIterator[ServerSentEvent]:
        # A client that goes away cancels this generator (EventSourceResponse listens for it).
        cursor = start
        checked_at = time.monotonic()
        retry_ms = int(settings.events_stream_poll_s * 1000) + 1000
        yield ServerSentEvent(retry=retry_ms, sep=SSE_SEPARATOR)
        while True:
            due = time.monotonic() - checked_at >= settings.events_stream_auth_check_s
            allowed, status, events = await anyio.to_thread.run_sync(fetch, cursor, due)
            if due:
                checked_at = time.monotonic()
            if not allowed:
                yield ServerSentEvent(comment=KEY_REVOKED_COMMENT, sep=SSE_SEPARATOR)
                return
            for e in events:
                yield sse_message(e)
                cursor = e["id"]
                if e["type"] in FINAL_EVENTS:
                    return
            if len(events) == STREAM_BATCH:
                continue
            if status is None or status in FINISHED:
                return  # deleted, or finished with its final event already sent
            await anyio.sleep(settings.events_stream_poll_s)

    return EventSourceResponse(
        body(),
        headers={"Cache-Control": "no-cache"},
        ping=settings.events_stream_keepalive_s,
        ping_message_factory=_keep_alive,
        sep=SSE_SEPARATOR,
    )
