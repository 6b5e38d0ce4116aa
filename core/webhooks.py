"""Webhooks: endpoints of a tenant, signed deliveries of job events, and their dispatcher.

The outbox pattern: :func:`enqueue` (called by :func:`core.events.record`) adds one pending
:class:`~core.db.WebhookDelivery` per matching endpoint in the transaction of the event, so a
delivery exists if and only if its event was committed. :func:`deliver_due` sends due
deliveries, signed per the Standard Webhooks specification by its reference library
``standardwebhooks`` (headers ``webhook-id``, ``webhook-timestamp``, ``webhook-signature:
v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}" keyed with the secret's base64-decoded
bytes>``; :func:`signed_headers`), records every attempt and retries failures
with exponential backoff. It runs as a thread of the API (:class:`Dispatcher`) or as its own
process (``python -m core.webhooks_dispatch``); several may run at once (rows are claimed with
``FOR UPDATE SKIP LOCKED`` on PostgreSQL).

SSRF: an endpoint's URL must be http(s) and its host must resolve to public addresses only,
unless the operator allows it (settings ``webhook_allowed_hosts``, ``webhook_allow_private``);
checked at creation (422 naming ``url``) and again before every attempt, which connects to
the address checked (DNS rebinding).
"""

from __future__ import annotations

import base64
import ipaddress
import json
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import httpx
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker
from standardwebhooks import Webhook

from core.db import (
    WEBHOOK_EVENT_TYPES,
    Job,
    JobEvent,
    WebhookAttempt,
    WebhookDelivery,
    WebhookEndpoint,
    make_engine,
    make_sessionmaker,
    utcnow,
)
from core.settings import Settings

log = logging.getLogger("distillery.webhooks")

EVENT_TO_WEBHOOK = {
    "succeeded": "job.succeeded",
    "failed": "job.failed",
    "cancelled": "job.cancelled",
    "checkpoint": "job.checkpoint",
}
"""Job event type -> webhook event type (the others are not sent)."""
SECRET_PREFIX = "whsec_"
USER_AGENT = "Distillery-Webhooks/1.0"
CLAIM_BATCH = 50
MAX_ERROR_CHARS = 500


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class UrlRefused(ValueError):
    """A webhook URL the SSRF policy refuses; the message says why."""


# --- signing -----------------------------------------------------------------------------


def new_secret() -> str:
    """A new signing secret: ``whsec_`` and the base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def signed_headers(secret: str, msg_id: str, timestamp: int, body: str) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt: ``webhook-id`` (``msg_id``, the same on
    every attempt), ``webhook-timestamp`` (``timestamp``, Unix seconds) and
    ``webhook-signature`` (``v1,<base64>``, computed by ``standardwebhooks.Webhook.sign`` over
    ``"{msg_id}.{timestamp}.{body}"`` with the key ``secret``, ``whsec_<base64>``). A receiver
    checks them with ``standardwebhooks.Webhook(secret).verify(body, headers)``.
    """
    signature = Webhook(secret).sign(msg_id, datetime.fromtimestamp(timestamp, UTC), body)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
    }


# --- SSRF policy -------------------------------------------------------------------------


def _non_public_reason(ip: IPAddress) -> str | None:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    for attr, what in (
        ("is_unspecified", "unspecified"),
        ("is_loopback", "loopback"),
        ("is_link_local", "link-local"),
        ("is_multicast", "multicast"),
        ("is_private", "private"),
        ("is_reserved", "reserved"),
    ):
        if getattr(ip, attr):
            return what
    if not ip.is_global:
        return "not public"
    return None


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError) as e:
        raise UrlRefused(f"the host {host!r} does not resolve ({e})") from None
    out = []
    for info in infos:
        addr = str(info[4][0]).split("%", 1)[0]
        out.append(ipaddress.ip_address(addr))
    if not out:
        raise UrlRefused(f"the host {host!r} does not resolve")
    return out


def check_url(url: str, settings: Settings) -> list[IPAddress]:
    """Check ``url`` against the SSRF policy: http or https, a host, and (unless allowed by
    ``webhook_allowed_hosts`` or ``webhook_allow_private``) every address the host resolves to
    public. Resolves the host (DNS); returns the addresses it checked (a request is then sent
    to one of them, so that the name cannot resolve elsewhere in between).

    Raises:
        UrlRefused: the reason (the scheme, an unresolvable host, a host outside the
            allow-list, or the non-public address and its kind).
    """
    try:
        parts = urlsplit(url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as e:
        raise UrlRefused(f"not a valid URL ({e})") from None
    if parts.scheme not in ("http", "https"):
        raise UrlRefused("the URL must start with http:// or https://")
    host = parts.hostname
    if not host:
        raise UrlRefused("the URL has no host")
    allowed = settings.webhook_allowed_hosts
    names = {a.lower().rstrip(".") for a in allowed if not _is_network(a)}
    if allowed and host.lower().rstrip(".") in names:
        return _resolve(host, port)
    addresses = _resolve(host, port)
    if allowed:
        networks = [ipaddress.ip_network(a, strict=False) for a in allowed if _is_network(a)]
        for ip in addresses:
            if not any(ip.version == n.version and ip in n for n in networks):
                raise UrlRefused(
                    f"the host {host!r} ({ip}) is not in the operator's webhook_allowed_hosts"
                )
        return addresses
    if settings.webhook_allow_private:
        return addresses
    for ip in addresses:
        reason = _non_public_reason(ip)
        if reason is not None:
            raise UrlRefused(
                f"the host {host!r} resolves to {ip}, a {reason} address; webhooks go to public "
                "addresses only (the operator can allow others: webhook_allowed_hosts, "
                "webhook_allow_private)"
            )
    return addresses


def _is_network(value: str) -> bool:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        return False
    return True


# --- endpoints ---------------------------------------------------------------------------


def create_endpoint(
    session: Session,
    settings: Settings,
    *,
    tenant_id: str,
    url: str,
    events: list[str] | None,
    description: str,
) -> WebhookEndpoint:
    """Add an endpoint of ``tenant_id`` with a new secret (committed).

    Raises:
        UrlRefused: ``url`` is refused by :func:`check_url`.
        ValueError: an event type not in :data:`core.db.WEBHOOK_EVENT_TYPES`.
    """
    chosen = list(dict.fromkeys(events)) if events else list(WEBHOOK_EVENT_TYPES)
    for e in chosen:
        if e not in WEBHOOK_EVENT_TYPES:
            raise ValueError(f"unknown event type {e!r}; one of {', '.join(WEBHOOK_EVENT_TYPES)}")
    check_url(url, settings)
    endpoint = WebhookEndpoint(
        id=str(uuid.uuid4()),
        tenant_id=tenant_id,
        url=url,
        events=chosen,
        description=description,
        secret=new_secret(),
        created_at=utcnow(),
    )
    session.add(endpoint)
    session.commit()
    return endpoint


def list_endpoints(session: Session, tenant_id: str) -> list[WebhookEndpoint]:
    """The endpoints of ``tenant_id``, oldest first."""
    q = select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id)
    return list(session.scalars(q.order_by(WebhookEndpoint.created_at, WebhookEndpoint.id)))


def get_endpoint(session: Session, endpoint_id: str, tenant_id: str) -> WebhookEndpoint | None:
    """The endpoint ``endpoint_id`` of ``tenant_id`` (None for another tenant's)."""
    row = session.get(WebhookEndpoint, endpoint_id)
    return row if row is not None and row.tenant_id == tenant_id else None


def list_deliveries(
    session: Session, endpoint_id: str, *, after: int | None, limit: int
) -> tuple[list[WebhookDelivery], dict[int, list[WebhookAttempt]], int | None]:
    """Deliveries of an endpoint with ``id > after``, oldest first, at most ``limit``; their
    attempts by delivery id; and the ``after`` of the next page (None on the last page)."""
    q = select(WebhookDelivery).where(WebhookDelivery.endpoint_id == endpoint_id)
    if after is not None:
        q = q.where(WebhookDelivery.id > after)
    rows = list(session.scalars(q.order_by(WebhookDelivery.id).limit(limit + 1)))
    next_after = rows[limit - 1].id if len(rows) > limit else None
    rows = rows[:limit]
    attempts: dict[int, list[WebhookAttempt]] = {r.id: [] for r in rows}
    if rows:
        aq = select(WebhookAttempt).where(WebhookAttempt.delivery_id.in_(list(attempts)))
        for a in session.scalars(aq.order_by(WebhookAttempt.id)):
            attempts[a.delivery_id].append(a)
    return rows, attempts, next_after


# --- the outbox --------------------------------------------------------------------------


def event_dict(event: JobEvent) -> dict[str, Any]:
    """An event as the API shows it: ``{"id", "time", "level", "type", "message", "data"}``."""
    return {
        "id": event.id,
        "time": event.created_at.isoformat(),
        "level": event.level,
        "type": event.type,
        "message": event.message,
        "data": event.data,
    }


def enqueue(session: Session, event: JobEvent) -> int:
    """Add a pending delivery of ``event`` (flushed) to every endpoint of the job's tenant
    subscribed to its webhook type; nothing when the type is not sent. Returns how many."""
    webhook_type = EVENT_TO_WEBHOOK.get(event.type)
    if webhook_type is None:
        return 0
    row = session.execute(
        select(Job.tenant_id, Job.status).where(Job.id == event.job_id)
    ).one_or_none()
    if row is None:
        return 0
    tenant_id, status = row
    endpoints = [
        e
        for e in session.scalars(
            select(WebhookEndpoint).where(WebhookEndpoint.tenant_id == tenant_id)
        )
        if webhook_type in (e.events or [])
    ]
    if not endpoints:
        return 0
    now = utcnow()
    body = json.dumps(
        {
            "type": webhook_type,
            "timestamp": event.created_at.isoformat(),
            "data": {"job_id": event.job_id, "status": status, "event": event_dict(event)},
        },
        separators=(",", ":"),
    )
    for endpoint in endpoints:
        session.add(
            WebhookDelivery(
                msg_id="msg_" + uuid.uuid4().hex,
                endpoint_id=endpoint.id,
                tenant_id=tenant_id,
                job_id=event.job_id,
                event_id=event.id,
                event_type=webhook_type,
                body=body,
                state="pending",
                attempts=0,
                next_attempt_at=now,
                created_at=now,
                updated_at=now,
            )
        )
    session.flush()
    return len(endpoints)


# --- the dispatcher ----------------------------------------------------------------------


def retry_delay_s(settings: Settings, attempt: int) -> float:
    """Seconds to wait after failed attempt number ``attempt`` (1-based): the base delay,
    doubled for each further attempt, capped at ``webhook_retry_max_s``."""
    return float(
        min(settings.webhook_retry_base_s * 2 ** (attempt - 1), settings.webhook_retry_max_s)
    )


def _claim(session: Session, settings: Settings, now: datetime) -> list[tuple[int, str, str, str]]:
    """Claim due deliveries: lock them (skipping rows another dispatcher holds), push their
    ``next_attempt_at`` past the time an attempt can take (a lease: a crashed dispatcher's
    claims come due again), commit. Returns (id, msg id, body, endpoint id) of each."""
    q = (
        select(WebhookDelivery)
        .where(WebhookDelivery.state == "pending", WebhookDelivery.next_attempt_at <= now)
        .order_by(WebhookDelivery.next_attempt_at, WebhookDelivery.id)
        .limit(CLAIM_BATCH)
        .with_for_update(skip_locked=True)
    )
    rows = list(session.scalars(q))
    lease = now + timedelta(seconds=settings.webhook_timeout_s * 2 + 30)
    out = []
    for r in rows:
        r.next_attempt_at = lease
        out.append((r.id, r.msg_id, r.body, r.endpoint_id))
    session.commit()
    return out


def _attempt(
    client: httpx.Client, settings: Settings, endpoint: WebhookEndpoint, msg_id: str, body: str
) -> tuple[int | None, str | None, float | None]:
    """Send one attempt: (status code, error, response time in ms)."""
    try:
        addresses = check_url(endpoint.url, settings)
    except UrlRefused as e:
        return None, f"refused: {e}", None
    headers = {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        **signed_headers(endpoint.secret, msg_id, int(time.time()), body),
    }
    # Connect to the address just checked (not to a new DNS answer): the URL's host is
    # replaced by it; Host and, for https, the TLS server name (SNI, certificate check) stay
    # the URL's host.
    url = httpx.URL(endpoint.url)
    extensions: dict[str, Any] = {}
    if url.host not in {str(a) for a in addresses}:
        headers["host"] = url.netloc.decode("ascii").rpartition("@")[2]
        if url.scheme == "https":
            extensions["sni_hostname"] = url.host
        ip = min(addresses, key=lambda a: a.version)  # IPv4 first, as most hosts listen there
        url = url.copy_with(host=str(ip))
    start = time.perf_counter()
    try:
        request = client.build_request(
            "POST", url, content=body.encode(), headers=headers, extensions=extensions
        )
        response = client.send(request, stream=True)  # the body is not read
        code = response.status_code
        response.close()
    except httpx.HTTPError as e:
        ms = (time.perf_counter() - start) * 1000
        return None, f"{type(e).__name__}: {e}"[:MAX_ERROR_CHARS], ms
    ms = (time.perf_counter() - start) * 1000
    if 200 <= code < 300:
        return code, None, ms
    return code, f"HTTP {code}", ms


def deliver_due(settings: Settings, sessions: sessionmaker[Session] | None = None) -> int:
    """Send every due pending delivery once: a 2xx answer marks it succeeded; anything else
    (another status, a redirect, a timeout, a refused address) is recorded and retried after
    :func:`retry_delay_s`, or marks it failed after ``webhook_max_attempts``. Safe to run in
    several processes at once. Returns how many attempts were made.

    ``sessions``: a sessionmaker to use (default: a new engine on ``settings.database_url``,
    disposed after).
    """
    engine = None
    if sessions is None:
        engine = make_engine(settings.database_url)
        sessions = make_sessionmaker(engine)
    sent = 0
    try:
        # No connection reuse: connections are made to checked addresses, and one to the same
        # address for another host name must not be shared (its TLS name would be the first's).
        with httpx.Client(
            timeout=settings.webhook_timeout_s,
            follow_redirects=False,
            trust_env=False,
            limits=httpx.Limits(max_keepalive_connections=0),
        ) as client:
            while True:
                with sessions() as session:
                    claimed = _claim(session, settings, utcnow())
                if not claimed:
                    break
                for delivery_id, msg_id, body, endpoint_id in claimed:
                    _deliver_one(sessions, client, settings, delivery_id, msg_id, body, endpoint_id)
                    sent += 1
                if len(claimed) < CLAIM_BATCH:
                    break
    finally:
        if engine is not None:
            engine.dispose()
    return sent


def _deliver_one(
    sessions: sessionmaker[Session],
    client: httpx.Client,
    settings: Settings,
    delivery_id: int,
    msg_id: str,
    body: str,
    endpoint_id: str,
) -> None:
    with sessions() as session:
        endpoint = session.get(WebhookEndpoint, endpoint_id)
        session.commit()  # no connection is held during the HTTP request
    if endpoint is None:  # deleted meanwhile (its deliveries with it)
        return
    code, error, ms = _attempt(client, settings, endpoint, msg_id, body)
    now = utcnow()
    with sessions() as session:
        delivery = session.get(WebhookDelivery, delivery_id, with_for_update=True)
        if delivery is None:
            return
        delivery.attempts += 1
        session.add(
            WebhookAttempt(
                delivery_id=delivery_id,
                attempt=delivery.attempts,
                at=now,
                status_code=code,
                error=error,
                response_ms=ms,
            )
        )
        delivery.last_status_code = code
        delivery.last_error = error
        delivery.updated_at = now
        if error is None:
            delivery.state = "succeeded"
            delivery.next_attempt_at = None
        elif delivery.attempts >= settings.webhook_max_attempts:
            delivery.state = "failed"
            delivery.next_attempt_at = None
        else:
            delivery.next_attempt_at = now + timedelta(
                seconds=retry_delay_s(settings, delivery.attempts)
            )
        session.commit()
    if error is not None:
        log.info("webhook %s attempt failed: %s", msg_id, error)


class Dispatcher:
    """Runs :func:`deliver_due` every ``webhook_poll_interval_s`` in a daemon thread until
    :meth:`stop`. Errors of a pass are logged and the next pass runs."""

    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        deliver: Callable[[Settings, sessionmaker[Session]], int] = deliver_due,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self._deliver = deliver
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="webhook-dispatcher", daemon=True)

    def start(self) -> None:
        """Start the thread."""
        self._thread.start()

    def stop(self, timeout_s: float = 30.0) -> None:
        """Ask the thread to stop and wait for it (at most ``timeout_s``: an attempt in flight
        ends within ``webhook_timeout_s``)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._deliver(self.settings, self.sessions)
            except Exception:
                log.exception("webhook dispatcher pass failed")
            self._stop.wait(self.settings.webhook_poll_interval_s)
