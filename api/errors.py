"""The one place errors become HTTP: each domain error type's status (:func:`http_status`),
and the handlers that turn every error into JSON.

Every error body has the shape ``{"error": {"code": str, "message": str, "field": str | None,
"details": list | None}}``; no stack trace ever reaches a client.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from sqlalchemy.exc import SQLAlchemyError
from starlette.exceptions import HTTPException as StarletteHTTPException

from core.db_errors import is_transient, public_message
from core.errors import (
    Conflict,
    DomainError,
    NotFound,
    QuotaExceeded,
    Unauthorized,
    Unavailable,
)
from core.storage.base import InvalidKey, ObjectNotFound, StorageError, TooLarge
from core.uploads.errors import InvalidUpload, UploadTooLarge
from kd_engine.errors import SpecError
from kd_engine.spec_fields import unknown_field_reason

log = logging.getLogger("distillery.api")


_STATUS: dict[type[DomainError], int] = {
    Unauthorized: 401,
    NotFound: 404,
    Conflict: 409,
    InvalidUpload: 422,
    UploadTooLarge: 413,
    QuotaExceeded: 429,
    Unavailable: 503,
}
"""The HTTP status of each domain error type (a subclass takes its nearest listed base's)."""

_HEADERS: dict[type[DomainError], dict[str, str]] = {
    Unauthorized: {"WWW-Authenticate": "Bearer"},
}


def http_status(exc: DomainError) -> int:
    """The HTTP status that answers domain error ``exc``: its type's (or nearest base's) in
    :data:`_STATUS`; 400 for a :class:`core.errors.DomainError` listed nowhere."""
    for cls in type(exc).__mro__:
        if cls in _STATUS:
            return _STATUS[cls]
    return 400


def http_headers(exc: DomainError) -> dict[str, str] | None:
    """Extra response headers for ``exc`` (``WWW-Authenticate`` on a 401), or None."""
    for cls in type(exc).__mro__:
        if cls in _HEADERS:
            return _HEADERS[cls]
    return None


def _body(code: str, message: str, field: str | None = None, details: Any = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field, "details": details}}


# Discriminated unions in the job spec: pydantic puts the member's tag in an error's location
# ("method.vanilla_kd.alpha"); the client wrote "method.alpha", so the tag is dropped.
_UNION_FIELDS = ("method", "student")


# Where a request value came from: dropped from the field name ("query.status" is "status").
_SOURCES = ("body", "query", "path", "header", "cookie")


def _loc(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for i, p in enumerate(loc) if not (i == 0 and p in _SOURCES)]
    out: list[str] = []
    for i, part in enumerate(parts):
        if part.startswith("function-") or (
            i == 1 and parts[0] in _UNION_FIELDS and len(loc) > 0 and loc[0] == "body"
        ):
            continue
        out.append(part)
    return ".".join(out)


def _reason(msg: str) -> str:
    return msg.removeprefix("Value error, ")


def _body_model(request: Request) -> type[BaseModel] | None:
    """The pydantic model of the matched route's JSON body, if it has one."""
    field = getattr(request.scope.get("route"), "body_field", None)
    annotation = getattr(getattr(field, "field_info", None), "annotation", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _error_reason(model: type[BaseModel] | None, error: Any) -> str:
    """The reason of one validation error; an unknown field in the body lists the valid ones."""
    loc = tuple(error.get("loc", ()))
    if error.get("type") == "extra_forbidden" and loc[:1] == ("body",) and model is not None:
        reason = unknown_field_reason(model, loc[1:])
        if reason:
            return reason
    return _reason(error.get("msg", "invalid"))


def validation_details(
    errors: Sequence[Any], model: type[BaseModel] | None
) -> list[dict[str, str]]:
    """``[{"field", "reason"}]`` of pydantic/FastAPI validation errors, as the 422 answers
    name them (``training.epochs``; an unknown field's reason lists the valid ones).

    Args:
        errors: the ``errors()`` of a :class:`pydantic.ValidationError` or a
            :class:`fastapi.exceptions.RequestValidationError`; a request body's locations
            start with ``"body"`` (prefix them when validating a body yourself).
        model: the pydantic model of the body, if any (for the unknown-field reasons).
    """
    return [
        {"field": _loc(tuple(e.get("loc", ()))), "reason": _error_reason(model, e)} for e in errors
    ]


DEFAULT_RETRY_AFTER_S = 5
"""``Retry-After`` of a 503 for an unavailable database when the app has no settings."""


def database_error_response(request: Request, exc: Exception) -> JSONResponse:
    """The answer to a database error: 503 ``unavailable`` with ``Retry-After`` (the
    settings' ``db_retry_after_s``) when it is transient (:func:`core.db_errors.is_transient`:
    the database dropped the connection, is restarting or refuses connections), else 500
    ``internal``. Neither body names SQL, parameters or the driver's message; the log has
    them."""
    if is_transient(exc):
        log.warning("database unavailable: %s", public_message(exc))
        settings = getattr(request.app.state, "settings", None)
        retry_after = getattr(settings, "db_retry_after_s", DEFAULT_RETRY_AFTER_S)
        return JSONResponse(
            _body("unavailable", "the database is unavailable; retry later"),
            status_code=503,
            headers={"Retry-After": str(retry_after)},
        )
    log.error("database error", exc_info=exc)
    return JSONResponse(
        _body("internal", "internal server error; the server log has the details"),
        status_code=500,
    )


def install(app: FastAPI) -> None:
    """Register the JSON error handlers on ``app``."""

    @app.exception_handler(DomainError)
    async def _domain(_: Request, exc: DomainError) -> JSONResponse:
        return JSONResponse(
            _body(exc.code, exc.message, exc.field, exc.details),
            status_code=http_status(exc),
            headers=http_headers(exc),
        )

    @app.exception_handler(SpecError)
    async def _spec(_: Request, exc: SpecError) -> JSONResponse:
        """422 ``invalid_spec``: ``field`` is the spec path (or the query, header or form
        field: a cursor, an ``Idempotency-Key``), ``message`` the reason. The one error of a
        value the API refuses after parsing, from the API's checks and the worker's alike
        (pydantic's own refusals are answered by ``_validation`` below, with the same body)."""
        return JSONResponse(
            _body("invalid_spec", exc.reason, exc.field, exc.details), status_code=422
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        """422: ``field`` is the first bad field, ``message`` names every one with its
        reason (``; ``-separated), ``details`` lists them."""
        details = validation_details(exc.errors(), _body_model(request))
        field = str(details[0]["field"]) if details else ""
        # every bad field at once (each unknown setting of a spec, not only the first)
        parts = [f"{d['field']}: {d['reason']}" if d["field"] else d["reason"] for d in details]
        message = "; ".join(dict.fromkeys(parts)) or "invalid request"
        return JSONResponse(_body("invalid_spec", message, field or None, details), status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 413: "too_large"}.get(
            exc.status_code, "http_error"
        )
        return JSONResponse(_body(code, str(exc.detail)), status_code=exc.status_code)

    @app.exception_handler(StorageError)
    async def _storage(_: Request, exc: StorageError) -> JSONResponse:
        if isinstance(exc, ObjectNotFound | InvalidKey):  # a bad name cannot exist either
            return JSONResponse(_body("not_found", str(exc)), status_code=404)
        if isinstance(exc, TooLarge):
            return JSONResponse(_body("too_large", str(exc)), status_code=413)
        # The store is down or misconfigured (s3: bucket, credentials, endpoint): the message
        # names settings and buckets, so it goes to the log and the client gets a 503.
        log.error("storage error: %s", exc)
        return JSONResponse(
            _body("unavailable", "the file store is unavailable; the server log has the details"),
            status_code=503,
        )

    @app.exception_handler(SQLAlchemyError)
    async def _database(request: Request, exc: SQLAlchemyError) -> JSONResponse:
        return database_error_response(request, exc)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, SQLAlchemyError):  # raised outside the routes (a middleware)
            return database_error_response(request, exc)
        log.exception("unhandled error")
        return JSONResponse(
            _body("internal", "internal server error; the server log has the details"),
            status_code=500,
        )
