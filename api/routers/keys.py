"""/v1/keys: the caller's tenant's API keys (create, list, revoke)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from api.auth import CallerDep
from api.deps import SessionDep
from api.schemas import KeyCreate, KeyCreated, KeyList, KeyOut
from core import tenants
from core.errors import NotFound

router = APIRouter(prefix="/v1/keys", tags=["keys"])
KeyId = Annotated[str, Path(description="The key's id (a UUID).", max_length=64)]


@router.post("", status_code=201, response_model=KeyCreated)
def create_key(body: KeyCreate, session: SessionDep, caller: CallerDep) -> KeyCreated:
    """A new key for the caller's tenant. ``key`` is shown in this answer only: keep it."""
    row, key = tenants.create_key(session, caller.tenant_id, body.name)
    session.commit()
    return KeyCreated(**KeyOut.of(row).model_dump(), key=key)


@router.get("", response_model=KeyList)
def list_keys(session: SessionDep, caller: CallerDep) -> KeyList:
    """The tenant's keys, revoked ones included (never a secret or a hash)."""
    return KeyList(items=[KeyOut.of(k) for k in tenants.list_keys(session, caller.tenant_id)])


@router.delete("/{key_id}", response_model=KeyOut)
def revoke_key(key_id: KeyId, session: SessionDep, caller: CallerDep) -> KeyOut:
    """Revoke a key of the tenant: from now on it answers 401. A key may revoke itself (this
    request still succeeds); revoking a revoked key changes nothing. 404 for an unknown key or
    another tenant's."""
    row = tenants.revoke_key(session, key_id, caller.tenant_id)
    if row is None:
        raise NotFound(f"no key {key_id!r}")
    session.commit()
    return KeyOut.of(row)
