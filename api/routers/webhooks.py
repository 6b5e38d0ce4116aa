"""/v1/webhooks: a tenant's webhook endpoints and their deliveries."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path, Query, Response
from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from api.auth import CallerDep
from api.deps import SessionDep, SettingsDep
from api.params import printable
from core import webhooks
from core.db import WebhookAttempt, WebhookDelivery, WebhookEndpoint, WebhookEventType
from core.errors import NotFound
from kd_engine.errors import SpecError

router = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

EndpointId = Annotated[
    str,
    Path(description="The endpoint id (a UUID).", max_length=64),
    AfterValidator(printable),
]


class WebhookIn(BaseModel):
    """A new endpoint: its ``url`` (http or https, a public host unless the operator allows
    others), the ``events`` it receives (default: all) and a free ``description``."""

    model_config = ConfigDict(extra="forbid")

    url: Annotated[str, Field(min_length=1, max_length=2048), AfterValidator(printable)]
    events: list[WebhookEventType] | None = Field(
        None, max_length=4, description="Default: all of them."
    )
    description: Annotated[str, Field(max_length=500), AfterValidator(printable)] = ""


class WebhookOut(BaseModel):
    """An endpoint (its secret is shown only when it is created)."""

    id: str
    url: str
    events: list[str]
    description: str
    created_at: datetime

    @classmethod
    def of(cls, e: WebhookEndpoint) -> WebhookOut:
        """From the row."""
        return cls(
            id=e.id, url=e.url, events=e.events, description=e.description, created_at=e.created_at
        )


class WebhookCreated(WebhookOut):
    """The new endpoint with its signing secret (``whsec_<base64>``): shown this once; a
    receiver checks each delivery's ``webhook-signature`` with it."""

    secret: str


class WebhookList(BaseModel):
    """The tenant's endpoints, oldest first."""

    items: list[WebhookOut]


class AttemptOut(BaseModel):
    """One HTTP attempt: its number, time, status code or error, response time (ms)."""

    attempt: int
    at: datetime
    status_code: int | None
    error: str | None
    response_ms: float | None

    @classmethod
    def of(cls, a: WebhookAttempt) -> AttemptOut:
        """From the row."""
        return cls(
            attempt=a.attempt,
            at=a.at,
            status_code=a.status_code,
            error=a.error,
            response_ms=a.response_ms,
        )


class DeliveryOut(BaseModel):
    """One message to the endpoint: ``state`` pending, succeeded or failed; ``attempts`` so
    far (each listed in ``attempt_log``); the last status code or error and response time;
    ``next_attempt_at`` while pending."""

    id: int
    msg_id: str
    event_type: str
    job_id: str
    event_id: int
    state: str
    attempts: int
    status_code: int | None
    error: str | None
    response_ms: float | None
    next_attempt_at: datetime | None
    created_at: datetime
    attempt_log: list[AttemptOut]

    @classmethod
    def of(cls, d: WebhookDelivery, attempts: list[WebhookAttempt]) -> DeliveryOut:
        """From the row and its attempts."""
        return cls(
            id=d.id,
            msg_id=d.msg_id,
            event_type=d.event_type,
            job_id=d.job_id,
            event_id=d.event_id,
            state=d.state,
            attempts=d.attempts,
            status_code=d.last_status_code,
            error=d.last_error,
            response_ms=attempts[-1].response_ms if attempts else None,
            next_attempt_at=d.next_attempt_at if d.state == "pending" else None,
            created_at=d.created_at,
            attempt_log=[AttemptOut.of(a) for a in attempts],
        )


class DeliveryList(BaseModel):
    """A page of deliveries, oldest first; ``next_after`` is the ``after`` of the next page,
    or null on the last one."""

    items: list[DeliveryOut]
    next_after: int | None


@router.post("", status_code=201, response_model=WebhookCreated)
def create_webhook(
    body: WebhookIn, session: SessionDep, settings: SettingsDep, caller: CallerDep
) -> WebhookCreated:
    """Add an endpoint; 201 with its signing secret, shown this once. 422 naming ``url`` when
    the URL is not http(s) or its host resolves to a private, loopback, link-local,
    multicast, reserved or unspecified address (unless the operator allows it)."""
    try:
        e = webhooks.create_endpoint(
            session,
            settings,
            tenant_id=caller.tenant_id,
            url=body.url,
            events=list(body.events) if body.events else None,
            description=body.description,
        )
    except webhooks.UrlRefused as err:
        raise SpecError("url", f"url: {err}") from None
    return WebhookCreated(**WebhookOut.of(e).model_dump(), secret=e.secret)


@router.get("", response_model=WebhookList)
def list_webhooks(session: SessionDep, caller: CallerDep) -> WebhookList:
    """The tenant's endpoints (no secrets)."""
    return WebhookList(
        items=[WebhookOut.of(e) for e in webhooks.list_endpoints(session, caller.tenant_id)]
    )


@router.delete("/{endpoint_id}", status_code=204, response_class=Response)
def delete_webhook(endpoint_id: EndpointId, session: SessionDep, caller: CallerDep) -> Response:
    """Delete an endpoint and its deliveries (pending ones are not sent). 404 if unknown."""
    e = webhooks.get_endpoint(session, endpoint_id, caller.tenant_id)
    if e is None:
        raise NotFound(f"no webhook endpoint {endpoint_id!r}")
    session.delete(e)
    session.commit()
    return Response(status_code=204)


@router.get("/{endpoint_id}/deliveries", response_model=DeliveryList)
def list_deliveries(
    endpoint_id: EndpointId,
    session: SessionDep,
    caller: CallerDep,
    after: Annotated[int | None, Query(ge=0, le=2**63 - 1)] = None,
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> DeliveryList:
    """The endpoint's deliveries, oldest first, with every attempt. 404 if unknown."""
    if webhooks.get_endpoint(session, endpoint_id, caller.tenant_id) is None:
        raise NotFound(f"no webhook endpoint {endpoint_id!r}")
    rows, attempts, next_after = webhooks.list_deliveries(
        session, endpoint_id, after=after, limit=limit
    )
    return DeliveryList(
        items=[DeliveryOut.of(d, attempts[d.id]) for d in rows], next_after=next_after
    )
