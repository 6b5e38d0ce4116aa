"""Who is calling: the ``Authorization: Bearer <key>`` header as a FastAPI dependency.

Every route but ``/healthz`` and the docs takes :data:`CallerDep`; a request without a key, or
with a malformed, unknown or revoked one, is a 401 with the JSON error body and a
``WWW-Authenticate: Bearer`` header.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from api.deps import SessionDep
from core import tenants
from core.errors import Unauthorized

bearer = HTTPBearer(
    auto_error=False,
    scheme_name="ApiKey",
    description="An API key: `Authorization: Bearer dk_...` (python -m core.admin create-key, "
    "or POST /v1/keys).",
)


@dataclass(frozen=True)
class Caller:
    """The authenticated caller: its tenant and the id of the key it used."""

    tenant_id: str
    key_id: str


CALLER_STATE = "distillery_caller"
"""Key of the request's ASGI ``state`` under which :mod:`api.authgate` leaves the caller it
authenticated before the body was read (so that :func:`get_caller` does not ask again)."""


def caller_for_header(session: Session, header: str | None) -> Caller:
    """The caller an ``Authorization`` header value stands for.

    Raises:
        Unauthorized: no header, not ``Bearer <key>``, or a malformed, unknown or revoked key
            (401).
    """
    if not header:
        raise Unauthorized("missing API key: send the header 'Authorization: Bearer <key>'")
    scheme, _, key = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise Unauthorized("the Authorization header must read 'Bearer <key>'")
    try:
        row = tenants.authenticate(session, key.strip())
    except tenants.AuthError as e:
        raise Unauthorized(str(e)) from None
    return Caller(tenant_id=row.tenant_id, key_id=row.id)


def get_caller(
    request: Request,
    session: SessionDep,
    _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    """The caller of this request (the one :mod:`api.authgate` already authenticated, for a
    request with a body).

    Raises:
        Unauthorized: no ``Authorization: Bearer`` header, or a malformed, unknown or revoked
            key (401).
    """
    checked = request.scope.get("state", {}).get(CALLER_STATE)
    if isinstance(checked, Caller):
        return checked
    return caller_for_header(session, request.headers.get("authorization"))


CallerDep = Annotated[Caller, Depends(get_caller)]
