"""Authentication before any request body is read.

FastAPI reads (and parses, spooling uploads to disk) a route's body before it solves the
route's dependencies, so the key check of :func:`api.auth.get_caller` alone runs only after a
client without a key has sent its whole body. :class:`AuthGate`, a pure ASGI middleware, checks
the credentials of every request that carries a body (a ``Content-Length`` above 0, or a
``Transfer-Encoding``) before the app sees it:

* ``/v1/...``: the ``Authorization: Bearer <key>`` header. Without a valid key the answer is
  the API's 401 (JSON error body, ``WWW-Authenticate: Bearer``, ``Connection: close``) and the
  body is never read; a client that sent ``Expect: 100-continue`` is not even asked for it.
  With one, the caller is left in the request's state for :func:`api.auth.get_caller`. A
  database error during the check is a 503 (``unavailable``), also without reading the body.
* ``/ui/...`` (but the login form, whose body is the key): the dashboard's login cookie. Without
  a valid one the route runs with an empty body, so that it answers its usual redirect to the
  login page (with ``Connection: close``) without the body having been read.

Other paths (``/healthz``, ``/metrics``, the docs) take no body worth the name and are passed on.
The key is checked in a worker thread with a short session of its own.
"""

from __future__ import annotations

import logging
from typing import Any

import anyio
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from sqlalchemy.exc import SQLAlchemyError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.auth import CALLER_STATE, Caller, caller_for_header
from api.errors import database_error_response, http_headers, http_status
from api.limits import CLOSE, route_path
from core import tenants
from core.errors import Unauthorized

log = logging.getLogger("distillery.api")

LOGIN_PATH = "/ui/login"


def has_body(scope: Scope) -> bool:
    """Whether the request announces a body: ``Content-Length`` above 0 (or unreadable), or
    any ``Transfer-Encoding`` (chunked)."""
    for key, value in scope.get("headers", ()):
        if key == b"transfer-encoding":
            return True
        if key == b"content-length":
            try:
                return int(value) > 0
            except ValueError:
                return True
    return False


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return bytes(value).decode("latin-1")
    return None


def _cookie(scope: Scope, name: str) -> str | None:
    raw = _header(scope, b"cookie")
    if not raw:
        return None
    for part in raw.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name and value:
            return value.strip('"')
    return None


def _error(status: int, code: str, message: str, headers: dict[str, str] | None) -> JSONResponse:
    """A JSON error answer (the shape of :mod:`api.errors`) sent without reading the body, so
    with ``Connection: close``."""
    body: dict[str, Any] = {
        "error": {"code": code, "message": message, "field": None, "details": None}
    }
    return JSONResponse(body, status_code=status, headers={**(headers or {}), **CLOSE})


def _empty_body() -> Receive:
    """A ``receive`` that gives an empty body, then reports the client gone (the real body is
    never read)."""
    sent = False

    async def receive() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": b"", "more_body": False}

    return receive


class AuthGate:
    """ASGI middleware: the API key (or the dashboard's login cookie) of a request with a
    body is checked before its body is read (see the module's docstring).

    Args:
        app: the wrapped ASGI app; ``scope["app"].state.sessionmaker`` makes the sessions.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not has_body(scope):
            await self.app(scope, receive, send)
            return
        path = route_path(scope)
        if path.startswith("/v1/"):
            await self._api(scope, receive, send)
        elif path.startswith("/ui/") and path != LOGIN_PATH:
            await self._ui(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def _api(self, scope: Scope, receive: Receive, send: Send) -> None:
        sessions = scope["app"].state.sessionmaker
        header = _header(scope, b"authorization")

        def check() -> Caller:
            with sessions() as session:
                return caller_for_header(session, header)

        try:
            caller = await anyio.to_thread.run_sync(check)
        except Unauthorized as e:
            await _error(http_status(e), e.code, e.message, http_headers(e))(scope, receive, send)
            return
        except SQLAlchemyError as e:
            # the same answer as any route's (503 + Retry-After when transient, else 500)
            response = database_error_response(Request(scope), e)
            response.headers.update(CLOSE)
            await response(scope, receive, send)
            return
        scope.setdefault("state", {})[CALLER_STATE] = caller
        await self.app(scope, receive, send)

    async def _ui(self, scope: Scope, receive: Receive, send: Send) -> None:
        from api.ui.session import COOKIE

        sessions = scope["app"].state.sessionmaker
        key = _cookie(scope, COOKIE)

        def check() -> bool:
            if not key:
                return False
            with sessions() as session:
                try:
                    tenants.authenticate(session, key.strip())
                except tenants.AuthError:
                    return False
                return True

        try:
            ok = await anyio.to_thread.run_sync(check)
        except SQLAlchemyError:
            ok = True  # the route meets the same error and answers it
        if ok:
            await self.app(scope, receive, send)
            return

        async def closing(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, _empty_body(), closing)


def install(app: FastAPI) -> None:
    """Add :class:`AuthGate` to ``app`` (outside the middlewares added before it)."""
    app.add_middleware(AuthGate)
