"""Fixtures shared by the API tests: an API key of a fresh tenant (as ``python -m api.admin
create-key`` makes one). Each module defines its own ``settings`` fixture."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from api import tenants
from api.settings import Settings


def new_key(database_url: str, tenant: str) -> str:
    """A new key of ``tenant`` (the tenant is created if missing)."""
    engine = create_engine(database_url)
    with Session(engine) as s:
        _, key = tenants.create_key(s, tenants.ensure_tenant(s, tenant).id, "tests")
        s.commit()
    engine.dispose()
    return key


@pytest.fixture
def key_headers(settings: Settings) -> dict[str, str]:
    """``Authorization`` header with a key of tenant ``test``."""
    return {"Authorization": f"Bearer {new_key(settings.database_url, 'test')}"}
