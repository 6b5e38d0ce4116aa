"""Size limits on request bodies, enforced while the body streams in.

Every request body is limited to ``max_json_body_bytes`` (1 MiB by default), whatever its
``Content-Type``, except the upload route (``POST /v1/files`` with a ``multipart/form-data``
body), whose limit is ``max_upload_bytes`` plus :data:`MULTIPART_SLACK_BYTES` for the form's
envelope (the route then applies the exact cap to the file's own bytes). A request whose
declared ``Content-Length`` is over its limit is answered 413 at once, without reading its body;
a body without one (chunked) is counted as it arrives and answered 413 as soon as it passes the
limit, so the API never holds (or spools to disk) more than the limit of one request's body.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TOO_LARGE = "too_large"
UPLOAD_ROUTE = ("POST", "/v1/files")
"""The only route whose ``multipart/form-data`` body may pass the JSON limit."""
MULTIPART_SLACK_BYTES = 64 * 1024
"""Bytes an upload's body may have beyond ``max_upload_bytes``: its boundaries, part headers
and small form fields (column names of at most 256 characters)."""


class BodyTooLarge(StarletteHTTPException):
    """The request body is larger than ``limit_bytes`` (413); ``upload``: on the upload route,
    whose cap is ``limit_bytes`` for the file."""

    def __init__(self, limit_bytes: int, upload: bool = False) -> None:
        super().__init__(413, too_large_message(limit_bytes, upload))
        self.limit_bytes = limit_bytes
        self.upload = upload


def too_large_message(limit_bytes: int, upload: bool = False) -> str:
    """The 413 message for a body over ``limit_bytes`` (an upload's: over its cap)."""
    size = f"{limit_bytes} bytes ({limit_bytes / 1024**2:.2f} MiB)"
    if upload:
        return f"the upload is larger than the limit of {size}"
    return (
        f"the request body is larger than the limit of {size} for JSON requests (file uploads "
        "go to POST /v1/files as multipart/form-data)"
    )


def too_large_body(limit_bytes: int, upload: bool = False) -> dict[str, Any]:
    """The JSON error body of a 413 (the shape of :mod:`api.errors`)."""
    return {
        "error": {
            "code": TOO_LARGE,
            "message": too_large_message(limit_bytes, upload),
            "field": "file" if upload else None,
            "details": {"limit_bytes": limit_bytes},
        }
    }


CLOSE = {"Connection": "close"}
"""Header of an answer sent before the request's body was read: the server then closes the
connection instead of reading (and discarding) the rest of the body."""


def too_large_response(limit_bytes: int, upload: bool = False) -> JSONResponse:
    """The 413 answer (JSON body, ``Connection: close``)."""
    return JSONResponse(too_large_body(limit_bytes, upload), status_code=413, headers=CLOSE)


def route_path(scope: Scope) -> str:
    """The request's path inside the app (without a ``root_path`` it is mounted under)."""
    path: str = scope.get("path", "")
    root: str = scope.get("root_path", "")
    return path[len(root) :] if root and path.startswith(root) else path


def is_upload(scope: Scope) -> bool:
    """Whether the request is an upload: ``POST /v1/files`` with a multipart body."""
    if (scope.get("method"), route_path(scope)) != UPLOAD_ROUTE:
        return False
    for key, value in scope.get("headers", ()):
        if key == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"multipart/form-data"
    return False


def _declared_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


class BodyLimitMiddleware:
    """ASGI middleware: 413 for an HTTP request body over its limit (bytes).

    Args:
        app: the wrapped ASGI app.
        limit_bytes: the largest body accepted, in bytes (every route but the upload route).
        upload_limit_bytes: the largest file accepted by the upload route (its body may be
            :data:`MULTIPART_SLACK_BYTES` larger); None: the upload route has ``limit_bytes``
            too.
    """

    def __init__(
        self, app: ASGIApp, limit_bytes: int, upload_limit_bytes: int | None = None
    ) -> None:
        self.app = app
        self.limit_bytes = limit_bytes
        self.upload_limit_bytes = upload_limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        upload = self.upload_limit_bytes is not None and is_upload(scope)
        cap = self.upload_limit_bytes if upload and self.upload_limit_bytes else self.limit_bytes
        limit = cap + MULTIPART_SLACK_BYTES if upload else cap
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            response = too_large_response(cap, upload)
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(cap, upload)
            return message

        started = False

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted, tracked_send)
        except BodyTooLarge:
            # read outside a route (a route's reads are answered by the app's handler)
            if started:
                raise
            response = too_large_response(cap, upload)
            await response(scope, receive, send)


def install(app: FastAPI, limit_bytes: int, upload_limit_bytes: int | None = None) -> None:
    """Add the body limits (``limit_bytes``; ``upload_limit_bytes`` for the upload route) and
    the JSON answer of their 413 to ``app``."""

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return too_large_response(exc.limit_bytes, exc.upload)

    app.add_middleware(
        BodyLimitMiddleware, limit_bytes=limit_bytes, upload_limit_bytes=upload_limit_bytes
    )
