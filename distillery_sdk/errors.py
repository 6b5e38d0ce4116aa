"""Typed exceptions built from the API's error body.

Every API error answers ``{"error": {"code", "message", "field", "details"}}`` (see
``api/errors.py``); :func:`error_from_response` turns such an answer into the subclass of
:class:`DistilleryError` for its HTTP status.
"""

from __future__ import annotations

from typing import Any

import httpx


class DistilleryError(Exception):
    """An error answered by the API (or a failure to reach it).

    Attributes:
        status: the HTTP status (None when no answer came: :class:`ConnectionFailed`, or a
            client-side check such as :class:`ChecksumMismatch`).
        code: the API's error code (``not_found``, ``conflict``, ``invalid_spec``,
            ``quota_exceeded``, ``unavailable``, ``unauthorized``, ``too_large``...).
        field: the request field the error is about (``training.epochs``, ``cursor``), or None.
        message: the API's human-readable reason.
        details: the API's ``details`` (a list of ``{field, reason}`` for a 422, ``limit`` and
            ``current`` for a quota), or None.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str = "error",
        field: str | None = None,
        details: Any = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.field = field
        self.message = message
        self.details = details

    def __str__(self) -> str:
        where = f" (field {self.field})" if self.field else ""
        status = f"HTTP {self.status} " if self.status else ""
        return f"{status}{self.code}{where}: {self.message}"


class InvalidRequest(DistilleryError):
    """400, 413 or 422: a bad spec, parameter or file; ``field`` names what is wrong."""


class Unauthorized(DistilleryError):
    """401: no API key, or an unknown or revoked one."""


class NotFound(DistilleryError):
    """404: no such job, file, key or artifact (or another tenant's)."""


class Conflict(DistilleryError):
    """409: the resource's state forbids the request (e.g. cancelling a finished job)."""


class QuotaExceeded(DistilleryError):
    """429: a tenant quota is reached; ``details`` holds ``limit`` and ``current``."""


class Unavailable(DistilleryError):
    """503 (or another 5xx): a backing service of the API is down; retry later."""


class ConnectionFailed(Unavailable):
    """The API could not be reached at all (refused, DNS, timeout); ``status`` is None."""


class ChecksumMismatch(DistilleryError):
    """A downloaded file's sha256 differs from the one the API listed."""


_BY_STATUS: dict[int, type[DistilleryError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    404: NotFound,
    409: Conflict,
    413: InvalidRequest,
    422: InvalidRequest,
    429: QuotaExceeded,
    503: Unavailable,
}


def error_from_response(r: httpx.Response) -> DistilleryError:
    """The :class:`DistilleryError` subclass for a non-2xx answer ``r``, with the code, field,
    message and details of its JSON error body (a non-JSON body becomes the message)."""
    code, field, details = "http_error", None, None
    try:
        body = r.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        code = str(err.get("code") or code)
        message = str(err.get("message") or r.reason_phrase)
        field = err.get("field")
        details = err.get("details")
    else:
        message = (r.text or r.reason_phrase or f"HTTP {r.status_code}").strip()[:500]
    cls = _BY_STATUS.get(r.status_code)
    if cls is None:
        cls = Unavailable if r.status_code >= 500 else DistilleryError
    return cls(message, status=r.status_code, code=code, field=field, details=details)
