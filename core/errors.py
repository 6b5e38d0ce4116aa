"""Domain errors: what a client (or an operator reading a failed job) can act on.

They carry a machine-readable ``code``, a message, the field at fault and optional details,
and nothing of HTTP: the API maps each type to a status in one place
(:func:`api.errors.http_status`), a worker turns one into a failed job's reason.
"""

from __future__ import annotations

from typing import Any


class DomainError(Exception):
    """An error a client can act on.

    Attributes:
        code: a stable machine-readable kind (``"invalid_spec"``, ``"not_found"``...).
        message: what is wrong, for a person.
        field: the request or spec field at fault (``"dataset.source"``), or None.
        details: extra structured data (a quota's ``limit`` and ``current``...), or None.
    """

    code = "bad_request"

    def __init__(self, message: str, field: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.details = details


class Unauthorized(DomainError):
    """No API key, or a malformed, unknown or revoked one."""

    code = "unauthorized"


class NotFound(DomainError):
    """The resource does not exist (or is another tenant's: the same answer)."""

    code = "not_found"


class Conflict(DomainError):
    """The resource's state forbids the request."""

    code = "conflict"


class QuotaExceeded(DomainError):
    """A tenant's quota forbids the request; ``details`` holds ``limit`` and ``current``."""

    code = "quota_exceeded"


class Unavailable(DomainError):
    """A backing service (the broker, the database, the store) is down."""

    code = "unavailable"
