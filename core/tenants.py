"""Tenants and their API keys: create, list, revoke, authenticate (no HTTP here).

A key reads ``dk_<8 characters>_<secret>``: ``dk_`` and the 8 characters are its visible
prefix (stored, shown in listings, used to find its row), the secret is
``secrets.token_urlsafe(32)``. Only the sha256 (hex) of the whole key is stored; a key is shown
once, when it is created.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import string
import uuid
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from core.db import ApiKey, Tenant, utcnow

KEY_PATTERN = re.compile(r"^(dk_[a-z0-9]{8})_([A-Za-z0-9_-]{32,128})$")
TENANT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
KEY_NAME_MAX = 100
LAST_USED_EVERY_S = 60
_PREFIX_ALPHABET = string.ascii_lowercase + string.digits
_DUMMY_HASH = hashlib.sha256(b"no such key").hexdigest()


class AuthError(Exception):
    """A key that does not authenticate; the message says why (missing parts, unknown,
    revoked)."""


def hash_key(key: str) -> str:
    """The stored form of a key: sha256 of its UTF-8 bytes, hex."""
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> tuple[str, str]:
    """A fresh random key and its prefix: ``(prefix, key)``."""
    prefix = "dk_" + "".join(secrets.choice(_PREFIX_ALPHABET) for _ in range(8))
    return prefix, f"{prefix}_{secrets.token_urlsafe(32)}"


def check_tenant_name(name: str) -> str:
    """``name`` if it is a valid tenant name (1-64 letters, digits, ``.``, ``_``, ``-``, not
    starting with a punctuation mark).

    Raises:
        ValueError: it is not.
    """
    if not TENANT_NAME.match(name):
        raise ValueError(
            f"{name!r} is not a tenant name: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_key_name(name: str) -> str:
    """``name`` if it is a valid key label (at most 100 characters, no control characters).

    Raises:
        ValueError: it is not.
    """
    if len(name) > KEY_NAME_MAX:
        raise ValueError(f"at most {KEY_NAME_MAX} characters (got {len(name)})")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise ValueError("control characters are not allowed")
    return name


def _check_quotas(max_active_jobs: int | None, max_stored_bytes: int | None) -> None:
    for label, value in (
        ("max_active_jobs", max_active_jobs),
        ("max_stored_bytes", max_stored_bytes),
    ):
        if value is not None and value < 0:
            raise ValueError(f"{label} must be >= 0 (got {value})")


def create_tenant(
    session: Session,
    name: str,
    max_active_jobs: int | None = None,
    max_stored_bytes: int | None = None,
) -> Tenant:
    """Insert a tenant (not committed). Quotas of None follow the settings' defaults.

    Raises:
        ValueError: an invalid or taken name, a negative quota.
    """
    check_tenant_name(name)
    if get_tenant_by_name(session, name) is not None:
        raise ValueError(f"a tenant named {name!r} exists already")
    _check_quotas(max_active_jobs, max_stored_bytes)
    tenant = Tenant(
        id=str(uuid.uuid4()),
        name=name,
        created_at=utcnow(),
        max_active_jobs=max_active_jobs,
        max_stored_bytes=max_stored_bytes,
    )
    session.add(tenant)
    session.flush()
    return tenant


def get_tenant_by_name(session: Session, name: str) -> Tenant | None:
    """The tenant named ``name``, or None."""
    return session.scalar(select(Tenant).where(Tenant.name == name))


def ensure_tenant(session: Session, name: str) -> Tenant:
    """The tenant named ``name``, created (not committed) if missing."""
    return get_tenant_by_name(session, name) or create_tenant(session, name)


def list_tenants(session: Session) -> list[Tenant]:
    """Every tenant, by name."""
    return list(session.scalars(select(Tenant).order_by(Tenant.name)))


def lock_tenant(session: Session, tenant_id: str) -> Tenant | None:
    """Read the tenant row and lock it until the transaction ends (``FOR NO KEY UPDATE`` on
    PostgreSQL, which still lets rows that reference the tenant be inserted; SQLite serialises
    writers anyway). Serialises a tenant's quota checks and idempotent creates."""
    return session.scalar(
        select(Tenant)
        .where(Tenant.id == tenant_id)
        .with_for_update(key_share=True)
        .execution_options(populate_existing=True)
    )


def set_quota(
    session: Session,
    tenant: Tenant,
    max_active_jobs: int | None,
    max_stored_bytes: int | None,
) -> None:
    """Set both quotas of ``tenant`` (None: the settings' default). Not committed.

    Raises:
        ValueError: a negative quota.
    """
    _check_quotas(max_active_jobs, max_stored_bytes)
    tenant.max_active_jobs = max_active_jobs
    tenant.max_stored_bytes = max_stored_bytes
    session.flush()


def create_key(session: Session, tenant_id: str, name: str = "") -> tuple[ApiKey, str]:
    """A new key of the tenant (not committed): its row and the key itself, which is not
    stored and cannot be shown again.

    Raises:
        ValueError: an invalid ``name``.
    """
    check_key_name(name)
    while True:
        prefix, key = new_key()
        if session.scalar(select(ApiKey.id).where(ApiKey.prefix == prefix)) is None:
            break
    row = ApiKey(
        id=str(uuid.uuid4()),
        tenant_id=tenant_id,
        prefix=prefix,
        key_hash=hash_key(key),
        name=name,
        created_at=utcnow(),
    )
    session.add(row)
    session.flush()
    return row, key


def list_keys(session: Session, tenant_id: str) -> list[ApiKey]:
    """The tenant's keys, revoked ones included, oldest first."""
    return list(
        session.scalars(
            select(ApiKey)
            .where(ApiKey.tenant_id == tenant_id)
            .order_by(ApiKey.created_at, ApiKey.id)
        )
    )


def get_key(session: Session, key_id: str, tenant_id: str | None = None) -> ApiKey | None:
    """The key with id ``key_id`` (of ``tenant_id`` when given), or None; an id that is not
    a UUID is None without reaching the database."""
    if not UUID.match(key_id):
        return None
    q = select(ApiKey).where(ApiKey.id == key_id)
    if tenant_id is not None:
        q = q.where(ApiKey.tenant_id == tenant_id)
    return session.scalar(q)


def revoke_key(session: Session, key_id: str, tenant_id: str | None = None) -> ApiKey | None:
    """Revoke a key (of ``tenant_id`` when given); revoking a revoked key keeps its first
    ``revoked_at``. None when there is no such key. Not committed."""
    key = get_key(session, key_id, tenant_id)
    if key is not None and key.revoked_at is None:
        key.revoked_at = utcnow()
        session.flush()
    return key


def key_is_valid(session: Session, key_id: str, tenant_id: str) -> bool:
    """Whether key ``key_id`` still authenticates as ``tenant_id``: it exists, is not revoked,
    and belongs to that tenant, which still exists. For long requests (an event stream) that
    authenticated once."""
    q = (
        select(ApiKey.id)
        .join(Tenant, Tenant.id == ApiKey.tenant_id)
        .where(ApiKey.id == key_id, ApiKey.tenant_id == tenant_id, ApiKey.revoked_at.is_(None))
    )
    return session.scalar(q) is not None


def authenticate(session: Session, key: str) -> ApiKey:
    """The key's row, if ``key`` is a valid, unrevoked key; its ``last_used_at`` is updated
    (at most once a minute, committed).

    Raises:
        AuthError: malformed, unknown or revoked.
    """
    m = KEY_PATTERN.match(key)
    if m is None:
        raise AuthError("malformed API key: keys read dk_<8 characters>_<secret>")
    row = session.scalar(select(ApiKey).where(ApiKey.prefix == m.group(1)))
    digest = hash_key(key)
    if not hmac.compare_digest(row.key_hash if row else _DUMMY_HASH, digest) or row is None:
        raise AuthError("invalid API key")
    if row.revoked_at is not None:
        raise AuthError(f"the API key {row.prefix} was revoked")
    now = utcnow()
    if row.last_used_at is None or now - row.last_used_at > timedelta(seconds=LAST_USED_EVERY_S):
        session.execute(
            update(ApiKey)
            .where(ApiKey.id == row.id)
            .values(last_used_at=now)
            .execution_options(synchronize_session=False)
        )
        session.commit()
    return row
