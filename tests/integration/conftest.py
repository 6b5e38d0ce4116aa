"""Fixtures shared by the API tests: the app's settings on the test database and broker with
temporary roots, a database session, and an API key of a fresh tenant (as ``python -m core.admin
create-key`` makes one)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from core import tenants
from core.settings import Settings


@pytest.fixture
def settings(clean_db: str, redis_url: str, tmp_path: Path) -> Settings:
    """Settings on the clean test database and the test broker, with empty artifacts, models,
    data and uploads roots under ``tmp_path``."""
    for d in ("artifacts", "models", "data", "uploads"):
        (tmp_path / d).mkdir()
    return Settings(
        database_url=clean_db,
        broker_url=redis_url,
        queue="cpu",
        artifacts_root=tmp_path / "artifacts",
        models_root=tmp_path / "models",
        data_root=tmp_path / "data",
        uploads_root=tmp_path / "uploads",
        cache_dir=tmp_path / "cache",
    )


@pytest.fixture
def db(settings: Settings) -> Iterator[Session]:
    """A session on the test database (closed after the test)."""
    engine = create_engine(settings.database_url)
    with Session(engine) as s:
        yield s
    engine.dispose()


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
