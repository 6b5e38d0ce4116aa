"""Database models and engine. The database is the source of truth for a job."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal, get_args

from sqlalchemy import (
    JSON,
    BigInteger,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker
from sqlalchemy.types import TypeDecorator

JOB_NAME_MAX = 128
"""The longest job ``name`` (characters)."""


def utcnow() -> datetime:
    """The current time, timezone-aware UTC."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp stored as UTC and always read back timezone-aware (SQLite drops the zone)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class Base(DeclarativeBase):
    """Declarative base of every table."""


class Tenant(Base):
    """A team sharing the service: it owns jobs and API keys; its quotas (None: the
    settings' default) bound its active jobs and stored bytes."""

    __tablename__ = "tenants"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    max_active_jobs: Mapped[int | None] = mapped_column(Integer, nullable=True)
    max_stored_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class ApiKey(Base):
    """An API key of a tenant. Only the sha256 (hex) of the whole key is stored; ``prefix``
    (``dk_`` and 8 characters, the key's start) identifies it in listings and finds its row."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    prefix: Mapped[str] = mapped_column(String(16), unique=True)
    key_hash: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(100), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class IdempotencyKey(Base):
    """The first request made with an ``Idempotency-Key`` on a route: its body's sha256 and
    the id of the resource it created. Unique per (tenant, key, route)."""

    __tablename__ = "idempotency_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    tenant_id: Mapped[str] = mapped_column(String(36), ForeignKey("tenants.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(255))
    route: Mapped[str] = mapped_column(String(64))
    request_sha256: Mapped[str] = mapped_column(String(64))
    resource_id: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)

    __table_args__ = (
        UniqueConstraint("tenant_id", "key", "route", name="uq_idempotency_keys_tenant_key_route"),
    )


class Job(Base):
    """One distillation job and its lifecycle. ``queue`` is the Celery queue it is sent to
    (the submitting API's ``DISTILLERY_QUEUE``, whose memory budget it was checked against);
    every later send (retry, re-send, resume, release) goes there."""

    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(String(36), ForeignKey("tenants.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), index=True)
    """A :class:`~core.job_status.JobStatus` value; changed only by
    :func:`core.repository.transition`."""
    queue: Mapped[str] = mapped_column(String(64))
    method: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    progress: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(255), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    name: Mapped[str | None] = mapped_column(String(JOB_NAME_MAX), nullable=True)
    # "metadata" is reserved on declarative classes: the attribute is ``labels``.
    labels: Mapped[dict[str, str] | None] = mapped_column("metadata", JSON, nullable=True)

    __table_args__ = (
        Index("ix_jobs_created_id", "created_at", "id"),
        Index("ix_jobs_tenant_name", "tenant_id", "name"),
    )


class Artifact(Base):
    """A file a job produced, with its size (bytes) and sha256."""

    __tablename__ = "artifacts"

    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))


FILE_KINDS = ("dataset", "model")
FILE_STATES = ("uploading", "ready", "failed")
"""``uploading``: the row exists before any byte is stored, and its ``size_bytes`` grows with
the bytes received (``updated_at`` with them, and while the file is checked); ``ready``:
checked, usable by jobs; ``failed``: refused by its checks (``error`` says why; nothing is
stored)."""


class File(Base):
    """An uploaded dataset or model of a tenant. ``size_bytes`` is what it stores (a model:
    its unpacked files; so far, while ``uploading``), ``sha256`` that of the uploaded file as
    received; ``report`` is the DatasetReport or ModelReport found when it arrived. ``status``
    is one of :data:`FILE_STATES`. Jobs name a ``ready`` one by its id."""

    __tablename__ = "files"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    kind: Mapped[str] = mapped_column(String(16))
    filename: Mapped[str] = mapped_column(String(255))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), default="ready")
    report: Mapped[dict[str, Any]] = mapped_column(JSON)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (
        Index("ix_files_tenant_created", "tenant_id", "created_at", "id"),
        Index("ix_files_status_updated", "status", "updated_at"),
    )


class JobEvent(Base):
    """One entry of a job's event log (``GET /v1/jobs/{id}/events``): ``id`` orders the events
    of a job (and of all jobs); ``type`` is one of :data:`core.events.EVENT_TYPES`, ``level``
    ``info``, ``warning`` or ``error``; ``data`` is the event's JSON details."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    level: Mapped[str] = mapped_column(String(16))
    type: Mapped[str] = mapped_column(String(32))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict[str, Any]] = mapped_column(JSON)

    __table_args__ = (Index("ix_job_events_job_id_id", "job_id", "id"),)


class JobDependency(Base):
    """Job ``job_id`` waits for job ``depends_on`` (named as ``job:<depends_on>`` in its spec)
    to succeed. ``depends_on`` has no foreign key: a dependency deleted later must not take
    the row with it (the waiting job then fails naming it)."""

    __tablename__ = "job_dependencies"

    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    depends_on: Mapped[str] = mapped_column(String(36), primary_key=True, index=True)


WebhookEventType = Literal["job.succeeded", "job.failed", "job.cancelled", "job.checkpoint"]
WEBHOOK_EVENT_TYPES: tuple[str, ...] = get_args(WebhookEventType)
"""The event types a webhook endpoint can subscribe to."""
DELIVERY_STATES = ("pending", "succeeded", "failed")


class WebhookEndpoint(Base):
    """A tenant's webhook endpoint: ``url`` receives a signed POST (Standard Webhooks) for each
    event of ``events`` (a subset of :data:`WEBHOOK_EVENT_TYPES`) of the tenant's jobs.
    ``secret`` (``whsec_<base64>``) signs them; the API shows it once, at creation."""

    __tablename__ = "webhook_endpoints"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[list[str]] = mapped_column(JSON)
    description: Mapped[str] = mapped_column(String(500), default="")
    secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)


class WebhookDelivery(Base):
    """One message to one endpoint (the outbox): created ``pending`` in the transaction of the
    job event it reports; the dispatcher sends it at ``next_attempt_at`` and retries with
    backoff until it is ``succeeded`` or, after the last attempt, ``failed``. ``msg_id`` is the
    ``webhook-id`` header (the same on every attempt); ``body`` the exact JSON sent."""

    __tablename__ = "webhook_deliveries"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    msg_id: Mapped[str] = mapped_column(String(64), unique=True)
    endpoint_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("webhook_endpoints.id", ondelete="CASCADE")
    )
    tenant_id: Mapped[str] = mapped_column(String(36))
    job_id: Mapped[str] = mapped_column(String(36))
    event_id: Mapped[int] = mapped_column(BigInteger)
    event_type: Mapped[str] = mapped_column(String(32))
    body: Mapped[str] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)

    __table_args__ = (
        Index("ix_webhook_deliveries_endpoint_id", "endpoint_id", "id"),
        Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),
    )


class WebhookAttempt(Base):
    """One HTTP attempt of a delivery: its number (1, 2, ...), the response's status code or
    the error (timeout, refused address, ...), and the response time in milliseconds."""

    __tablename__ = "webhook_attempts"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    delivery_id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"),
        ForeignKey("webhook_deliveries.id", ondelete="CASCADE"),
        index=True,
    )
    attempt: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    response_ms: Mapped[float | None] = mapped_column(Float, nullable=True)


class JobCheckpoint(Base):
    """A training checkpoint of a job, stored under ``<job id>/checkpoints/<name>/`` of the
    artifact store (not an artifact: the ``artifacts`` table lists the final output only).
    ``step`` of ``total_steps`` (optimizer steps of the stage ``stage``, hop ``hop``);
    ``reason`` is ``interval``, ``stage_end`` or ``pause``; ``dev`` the last dev metrics;
    ``size_bytes`` its stored size; ``files`` the ``[path, size_bytes, sha256]`` of each of
    its files (relative to its folder; checked before a resume); ``attempt`` the attempt that
    saved it."""

    __tablename__ = "job_checkpoints"

    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    step: Mapped[int] = mapped_column(Integer)
    total_steps: Mapped[int] = mapped_column(Integer)
    hop: Mapped[int] = mapped_column(Integer)
    stage: Mapped[str] = mapped_column(String(64))
    reason: Mapped[str] = mapped_column(String(16))
    dev: Mapped[dict[str, Any]] = mapped_column(JSON)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    files: Mapped[list[Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
    attempt: Mapped[int] = mapped_column(Integer)

    __table_args__ = (Index("ix_job_checkpoints_job_created", "job_id", "created_at"),)


CONNECT_TIMEOUT_S = 10
"""Seconds a new PostgreSQL connection may take (libpq ``connect_timeout``) unless the URL
sets its own."""


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL and a busy timeout so api and worker share it."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30})

        @event.listens_for(engine, "connect")
        def _pragmas(conn: Any, _record: Any) -> None:
            cur = conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    # pool_pre_ping: a pooled connection the server closed (a restart, a terminated backend)
    # is replaced at checkout; one lost in use invalidates the pool's older connections.
    # connect_timeout: a database host that does not answer fails a connect in seconds.
    connect_args = {} if "connect_timeout" in url else {"connect_timeout": CONNECT_TIMEOUT_S}
    return create_engine(url, pool_pre_ping=True, connect_args=connect_args)


def make_sessionmaker(engine: Engine) -> sessionmaker[Any]:
    """Sessions that keep loaded attributes after commit."""
    return sessionmaker(engine, expire_on_commit=False)
