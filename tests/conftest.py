"""Shared fixtures: the real PostgreSQL and Redis the suite runs against, and the two lanes.

``make test`` (scripts/services.sh) makes sure both answer and sets
DISTILLERY_TEST_DATABASE_URL and DISTILLERY_TEST_REDIS_URL; the defaults below are the same.

Lanes: every test that uses a service fixture (:data:`SERVICE_FIXTURES`) or lives under
tests/integration or tests/e2e is marked ``services`` at collection, every other test that runs
a training job or loop (:data:`JOB_CALL`, in its body or a fixture) ``slow``; ``make check``
runs ``-m "not services and not slow and not gpu"`` (no PostgreSQL, Redis, Chromium or
worker; see README.md).
A test under tests/unit that asks for a service fixture is a collection error: unit tests run
without services.
"""

from __future__ import annotations

import functools
import inspect
import os
import re
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


SERVICE_FIXTURES = frozenset({"pg_url", "clean_db", "redis_url", "e2e_broker_url"})
"""Fixtures that need the PostgreSQL or Redis server: a test using one is marked ``services``."""
SERVICE_DIRS = ("integration", "e2e")
"""Folders under tests/ whose tests need the services (a stack, a worker, Chromium)."""


JOB_CALL = re.compile(r"(?<![.\w])(run_job\w*|train|execute|launch)\(")
"""A call that runs a whole training job or loop (kd_engine.run.run_job and
run_job_distributed, kd_engine.trainer.train, worker.runner.execute) or starts training
processes (torchrun ranks: run_job_distributed, or a test helper named run_job...): a test
whose body or fixtures (transitively) make one is ``slow``."""


@functools.cache
def _source(func: object) -> str:
    try:
        return inspect.getsource(func)  # type: ignore[arg-type]
    except (OSError, TypeError):
        return ""


def _runs_a_job(item: pytest.Item) -> bool:
    """Whether the test function or one of its fixtures calls :data:`JOB_CALL`."""
    funcs: list[object] = [getattr(item, "function", None)]
    info = getattr(item, "_fixtureinfo", None)
    if info is not None:
        for name in info.names_closure:
            funcs += [d.func for d in info.name2fixturedefs.get(name, ())]
    return any(f is not None and JOB_CALL.search(_source(f)) for f in funcs)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark each test that needs PostgreSQL, Redis, Chromium or a worker ``services``, and
    each unit test that runs a training job or loop (:func:`_runs_a_job`) ``slow``; refuse (a
    collection error naming the test and fixture) a unit test that needs a service."""
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        try:
            folder = item.path.resolve().relative_to(tests_dir).parts[0]
        except ValueError:
            continue
        needs = SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ()))
        if folder == "unit" and needs:
            raise pytest.UsageError(
                f"{item.nodeid}: a unit test must not need a service (uses {sorted(needs)}); "
                "move it to tests/integration"
            )
        if needs or folder in SERVICE_DIRS:
            item.add_marker(pytest.mark.services)
        elif _runs_a_job(item):
            item.add_marker(pytest.mark.slow)


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
