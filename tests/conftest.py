"""Shared fixtures: the real PostgreSQL and Redis the suite runs against.

``make test`` (scripts/services.sh) makes sure both answer and sets
DISTILLERY_TEST_DATABASE_URL and DISTILLERY_TEST_REDIS_URL; the defaults below are the same.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from sqlalchemy import create_engine, text

ROOT = Path(__file__).resolve().parent.parent
PG_URL = os.environ.get(
    "DISTILLERY_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/distillery_test"
)
REDIS_URL = os.environ.get("DISTILLERY_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


def _alembic(*args: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={PG_URL}", *args],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="session")
def pg_url() -> str:
    """The test database, emptied, migrated to head, down to base and up to head again (so
    every downgrade runs too), once per session. Emptied with the schema rather than by
    alembic, so that a database an older checkout left at a revision this one lacks works."""
    engine = create_engine(PG_URL)
    with engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    _alembic("upgrade", "head")
    _alembic("downgrade", "base")
    _alembic("upgrade", "head")
    return PG_URL


@pytest.fixture
def clean_db(pg_url: str) -> Iterator[str]:
    """The migrated test database with no rows, before and after the test."""
    engine = create_engine(pg_url)

    def wipe() -> None:
        with engine.begin() as conn:
            conn.execute(
                text("TRUNCATE files, artifacts, jobs, idempotency_keys, api_keys, tenants CASCADE")
            )

    wipe()
    yield pg_url
    wipe()
    engine.dispose()


@pytest.fixture
def redis_url() -> Iterator[str]:
    """A Redis database for the test, flushed before and after."""
    client = redis.Redis.from_url(REDIS_URL)
    client.flushdb()
    yield REDIS_URL
    client.flushdb()


@pytest.fixture(scope="module")
def e2e_broker_url() -> str:
    """A Redis database for the end-to-end stack, flushed first: DISTILLERY_TEST_E2E_BROKER_URL,
    else database 14 of REDIS_URL's server (set it when several checkouts share one server)."""
    url = os.environ.get("DISTILLERY_TEST_E2E_BROKER_URL") or REDIS_URL.rsplit("/", 1)[0] + "/14"
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 server on 127.0.0.1 (moto's server mode, HTTP, in a thread of this process)
    for the tests of the s3 storage backend; any access key is accepted. Buckets are made by
    the tests (:func:`tests.s3.new_bucket`)."""
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])
