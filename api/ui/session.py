"""The dashboard's login: an API key kept in an HttpOnly, SameSite=Strict cookie.

The cookie holds the key itself, and every dashboard page, fragment and download checks it with
:func:`core.tenants.authenticate` exactly as :func:`api.auth.get_caller` checks a bearer key:
the same :class:`api.auth.Caller` (tenant and key id), so a revoked key ends its dashboard
sessions at once and a key sees only its tenant's jobs.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import quote

from fastapi import Depends, Request, Response

from api.auth import Caller
from api.deps import SessionDep
from core import tenants

COOKIE = "distillery_key"
"""Name of the dashboard's login cookie (scoped to ``/ui``)."""
COOKIE_PATH = "/ui"
COOKIE_MAX_AGE_S = 12 * 3600
"""The cookie expires 12 hours after the login (the key itself may be revoked earlier)."""


class LoginRequired(Exception):
    """No login cookie, or one whose key no longer authenticates; answered by a redirect to
    the login page (``next`` brings the user back to ``path``). ``reason`` is shown there."""

    def __init__(self, path: str, reason: str = "") -> None:
        super().__init__(reason or "log in with an API key")
        self.path = path
        self.reason = reason


def login_url(path: str = "", reason: str = "") -> str:
    """The login page's URL, coming back to ``path`` (a ``/ui`` path) after the login."""
    params = []
    if path.startswith(COOKIE_PATH) and not path.startswith("/ui/login"):
        params.append(f"next={quote(path, safe='/')}")
    if reason:
        params.append(f"reason={quote(reason)}")
    return "/ui/login" + ("?" + "&".join(params) if params else "")


def authenticate_key(session: SessionDep, key: str) -> Caller:
    """The caller a key stands for (:func:`core.tenants.authenticate`, as for a bearer key).

    Raises:
        core.tenants.AuthError: a malformed, unknown or revoked key (the message says which).
    """
    row = tenants.authenticate(session, key.strip())
    return Caller(tenant_id=row.tenant_id, key_id=row.id)


def ui_caller(request: Request, session: SessionDep) -> Caller:
    """The caller of a dashboard request, from its login cookie.

    Raises:
        LoginRequired: no cookie, or its key is malformed, unknown or revoked.
    """
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    key = request.cookies.get(COOKIE)
    if not key:
        raise LoginRequired(here)
    try:
        return authenticate_key(session, key)
    except tenants.AuthError as e:
        raise LoginRequired(here, f"{e}; log in again") from None


UiCallerDep = Annotated[Caller, Depends(ui_caller)]


def set_login_cookie(request: Request, response: Response, key: str) -> None:
    """Set the login cookie on ``response``: HttpOnly, SameSite=Strict, path ``/ui``, 12 h;
    ``Secure`` when the request came over HTTPS."""
    response.set_cookie(
        COOKIE,
        key.strip(),
        max_age=COOKIE_MAX_AGE_S,
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def clear_login_cookie(response: Response) -> None:
    """Remove the login cookie (logout)."""
    response.delete_cookie(COOKIE, path=COOKIE_PATH, httponly=True, samesite="strict")
