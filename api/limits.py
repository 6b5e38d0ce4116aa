"""One size limit for request bodies other than uploads, enforced while the body streams in.

A request whose declared ``Content-Length`` is over the limit is answered 413 at once, without
reading its body; a body without one (chunked) is counted as it arrives and answered 413 as soon
as it passes the limit, so the API never holds more than the limit of one request's body.
``multipart/form-data`` bodies (file uploads) are not counted here: the upload route applies
its own, larger cap.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

TOO_LARGE = "too_large"


class BodyTooLarge(StarletteHTTPException):
    """The request body is larger than ``limit_bytes`` (413)."""

    def __init__(self, limit_bytes: int) -> None:
        super().__init__(413, too_large_message(limit_bytes))
        self.limit_bytes = limit_bytes


def too_large_message(limit_bytes: int) -> str:
    """The 413 message for a body over ``limit_bytes``."""
    return (
        f"the request body is larger than the limit of {limit_bytes} bytes "
        f"({limit_bytes / 1024**2:.2f} MiB) for JSON requests"
    )


def too_large_body(limit_bytes: int) -> dict[str, Any]:
    """The JSON error body of a 413 (the shape of :mod:`api.errors`)."""
    return {
        "error": {
            "code": TOO_LARGE,
            "message": too_large_message(limit_bytes),
            "field": None,
            "details": {"limit_bytes": limit_bytes},
        }
    }


def _exempt(scope: Scope) -> bool:
    """Whether the request's body is an upload (multipart), which has its own cap."""
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
    """ASGI middleware: 413 for an HTTP request body over ``limit_bytes`` (bytes).

    Args:
        app: the wrapped ASGI app.
        limit_bytes: the largest body accepted, in bytes.
    """

    def __init__(self, app: ASGIApp, limit_bytes: int) -> None:
        self.app = app
        self.limit_bytes = limit_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or _exempt(scope):
            await self.app(scope, receive, send)
            return
        declared = _declared_length(scope)
        if declared is not None and declared > self.limit_bytes:
            response = JSONResponse(too_large_body(self.limit_bytes), status_code=413)
            await response(scope, receive, send)
            return
        received = 0
        limit = self.limit_bytes

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
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
            response = JSONResponse(too_large_body(limit), status_code=413)
            await response(scope, receive, send)


def install(app: FastAPI, limit_bytes: int) -> None:
    """Add the body limit of ``limit_bytes`` bytes and the JSON answer of its 413 to ``app``."""

    @app.exception_handler(BodyTooLarge)
    async def _too_large(_: Request, exc: BodyTooLarge) -> JSONResponse:
        return JSONResponse(too_large_body(exc.limit_bytes), status_code=413)

    app.add_middleware(BodyLimitMiddleware, limit_bytes=limit_bytes)
