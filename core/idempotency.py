"""``Idempotency-Key`` for creating requests (POST /v1/jobs, later POST /v1/files).

The first request with a key creates the resource and records (tenant, key, route, the sha256
of its body, the resource id) in the same transaction. A later request with the same key and
body gets the first resource back; with another body it is a 422 naming the header. Two
requests racing with one key: the tenant row is locked while creating, and the unique
constraint on (tenant, key, route) decides if that is not enough (the loser's insert fails, its
transaction is rolled back and it reads the winner's record). A key is remembered for
``Settings.idempotency_ttl_s`` seconds.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from core.db import IdempotencyKey, utcnow
from core.tenants import lock_tenant
from kd_engine.errors import SpecError

HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class Outcome:
    """What an idempotent create gave: the resource id, and whether it was created by an
    earlier request with the same key (``replayed``) rather than by this one."""

    resource_id: str
    replayed: bool


def check_key(value: str | None) -> str | None:
    """The header's value if it is a usable key (1-255 characters, no control characters);
    None when the header was not sent.

    Raises:
        SpecError: naming ``Idempotency-Key`` (422).
    """
    if value is None:
        return None
    if not value:
        raise SpecError(HEADER, "must not be empty")
    if len(value) > MAX_KEY_LENGTH:
        raise SpecError(
            HEADER, f"at most {MAX_KEY_LENGTH} characters (got {len(value)}); a UUID is a good key"
        )
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise SpecError(HEADER, "control characters are not allowed")
    return value


def body_sha256(payload: Any) -> str:
    """The sha256 (hex) a request is compared by: of ``payload`` itself when it is bytes, else
    of its canonical JSON (sorted keys, no whitespace), so key order does not matter."""
    if isinstance(payload, bytes):
        return hashlib.sha256(payload).hexdigest()
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def find(
    session: Session, tenant_id: str, route: str, key: str, request_sha256: str, ttl_s: int
) -> str | None:
    """The resource id recorded for an unexpired ``key`` on ``route``, or None.

    Raises:
        SpecError: the key was used with another body (422 naming ``Idempotency-Key``).
    """
    row = session.scalar(
        select(IdempotencyKey).where(
            IdempotencyKey.tenant_id == tenant_id,
            IdempotencyKey.key == key,
            IdempotencyKey.route == route,
            IdempotencyKey.created_at >= utcnow() - timedelta(seconds=ttl_s),
        )
    )
    if row is None:
        return None
    if row.request_sha256 != request_sha256:
        raise SpecError(
            HEADER,
            f"this key was used for another request with a different body (for {route}); "
            "send a new key for a new request",
        )
    return row.resource_id


def create_once(
    session: Session,
    *,
    tenant_id: str,
    route: str,
    key: str | None,
    request_sha256: str,
    ttl_s: int,
    create: Callable[[], str],
) -> Outcome:
    """Run ``create`` (it adds the resource's rows without committing and returns its id) at
    most once per (tenant, ``key``, ``route``), and commit. The tenant row is locked first, so
    ``create`` may check the tenant's quotas without a race. With ``key`` None, ``create`` just
    runs under the lock.

    Raises:
        SpecError: the key was used with another body (422).
        Whatever ``create`` raises (the transaction is rolled back).
    """
    try:
        lock_tenant(session, tenant_id)
        if key is not None:
            earlier = find(session, tenant_id, route, key, request_sha256, ttl_s)
            if earlier is not None:
                session.rollback()
                return Outcome(earlier, replayed=True)
            cutoff = utcnow() - timedelta(seconds=ttl_s)
            session.execute(
                delete(IdempotencyKey).where(
                    IdempotencyKey.tenant_id == tenant_id, IdempotencyKey.created_at < cutoff
                )
            )
        resource_id = create()
        if key is not None:
            session.add(
                IdempotencyKey(
                    tenant_id=tenant_id,
                    key=key,
                    route=route,
                    request_sha256=request_sha256,
                    resource_id=resource_id,
                    created_at=utcnow(),
                )
            )
        session.commit()
    except IntegrityError:
        session.rollback()
        if key is None:
            raise
        winner = find(session, tenant_id, route, key, request_sha256, ttl_s)
        if winner is None:
            raise
        return Outcome(winner, replayed=True)
    except BaseException:
        session.rollback()
        raise
    return Outcome(resource_id, replayed=False)
