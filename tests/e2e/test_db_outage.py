"""End to end, the database going away under a running job (issue 20, fault 1), with a real
Celery worker, uvicorn, PostgreSQL and Redis.

* A blip: the test database's client backends (only this database's, never the test's own
  connection) are terminated in a loop while the job trains. The worker retries its database
  work and the job succeeds on its first attempt; a ``warning`` event reports the retries.
  Before the fix the job ended ``failed`` with the SQL statement in its error.
* An outage past the retry deadline: the database refuses every connection
  (``ALLOW_CONNECTIONS false``, its backends terminated) for longer than
  ``DISTILLERY_DB_RETRY_DEADLINE_S``. The attempt stops without a verdict, the API answers
  503 with ``Retry-After`` meanwhile, and once the database is back the reconciler re-queues
  the job, which resumes from its newest checkpoint and succeeds.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest
from sqlalchemy import Connection, create_engine, make_url, text

from core import events
from core.db import make_engine, make_sessionmaker
from devstack.client import Client
from devstack.stack import Stack, running_stack
from tests.checks import NO_EXTRAS

pytestmark = pytest.mark.e2e

DEADLINE_S = 4.0
HEARTBEAT_TIMEOUT_S = 10
SPEC: dict[str, Any] = {
    "teacher": "builtin:minilm-l3",
    "method": {"name": "finetune"},
    "dataset": {
        "source": "builtin:rotten_tomatoes",
        "max_train_examples": 320,
        "max_eval_examples": 32,
    },
    # 40 optimiser steps; a checkpoint every 8
    "training": {"epochs": 1, "batch_size": 8, "max_seq_length": 32, "learning_rate": 1e-4},
    "export": NO_EXTRAS,
}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, pg_url: str, e2e_broker_url: str
) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("db-outage"),
        database_url=pg_url,
        broker_url=e2e_broker_url,
        extra_env={
            "DISTILLERY_PROGRESS_EVERY_STEPS": "1",
            "DISTILLERY_CHECKPOINT_EVERY_STEPS": "8",
            "DISTILLERY_HEARTBEAT_INTERVAL_S": "1",
            "DISTILLERY_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
            "DISTILLERY_RECONCILE_INTERVAL_S": "2",
            "DISTILLERY_DB_RETRY_DEADLINE_S": str(DEADLINE_S),
            "DISTILLERY_DB_RETRY_AFTER_S": "3",
        },
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack: Stack) -> Client:
    return Client(stack.base_url, stack.api_key)


@contextmanager
def admin(url: str, database: str | None = None) -> Iterator[Connection]:
    """An autocommit connection (to ``database`` of the same server when given)."""
    target = make_url(url) if database is None else make_url(url).set(database=database)
    engine = create_engine(target, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            yield conn
    finally:
        engine.dispose()


def terminate_others(conn: Connection) -> int:
    """Terminate the client backends of ``conn``'s database but ``conn``'s own; how many."""
    return int(
        conn.execute(
            text(
                "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND backend_type = 'client backend'"
            )
        ).scalar()
        or 0
    )


def job_row(conn: Connection, job_id: str) -> tuple[str, int]:
    status, step = conn.execute(
        text("SELECT status, COALESCE((progress->>'step')::int, 0) FROM jobs WHERE id = :i"),
        {"i": job_id},
    ).one()
    return str(status), int(step)


def db_events(stack: Stack, job_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    engine = make_engine(stack.env["DISTILLERY_DATABASE_URL"])
    with make_sessionmaker(engine)() as s:
        rows = [(e.type, e.message, e.data) for e in events.list_events(s, job_id, limit=1000)]
    engine.dispose()
    return rows


def poll(client: Client, job_id: str, codes: list[tuple[int, str | None]]) -> None:
    """One GET of the job, its status code and Retry-After kept (a 503 is expected while the
    database is away, a 500 never)."""
    try:
        r = client.http.get(f"/v1/jobs/{job_id}", timeout=20)
    except httpx.HTTPError:
        return
    codes.append((r.status_code, r.headers.get("Retry-After")))
    assert "[SQL" not in r.text


def wait_for(client: Client, job_id: str, step: int) -> None:
    deadline = time.monotonic() + 600
    while True:
        cur = client.job(job_id)
        if cur["status"] == "running" and (cur["progress"] or {}).get("step", 0) >= step:
            return
        assert cur["status"] in ("queued", "running"), cur
        assert time.monotonic() < deadline, f"the job never reached step {step}"
        time.sleep(0.1)


def test_a_database_blip_under_a_running_job_is_retried_and_the_job_succeeds(
    client: Client, stack: Stack, pg_url: str
) -> None:
    job_id = client.submit(SPEC)["id"]
    wait_for(client, job_id, 3)
    terminated = 0
    codes: list[tuple[int, str | None]] = []
    with admin(pg_url) as conn:
        started, rounds, first_step = time.monotonic(), 0, 0
        # terminate for at least 4 s, and until the worker reports a retried write (or the
        # job ends: before the fix it failed at the first write that lost its connection)
        while time.monotonic() - started < 60:
            terminated += terminate_others(conn)
            status, step = job_row(conn, job_id)
            first_step = step if rounds == 0 else first_step
            if status != "running":
                break
            retried = conn.execute(
                text(
                    "SELECT count(*) FROM job_events WHERE job_id = :i AND type = 'warning' "
                    "AND data->>'database_retries' IS NOT NULL"
                ),
                {"i": job_id},
            ).scalar()
            if retried and time.monotonic() - started >= 4:
                break
            rounds += 1
            if rounds % 10 == 0:
                poll(client, job_id, codes)
            time.sleep(0.02)
        blip_s = time.monotonic() - started
    done = client.wait(job_id, timeout_s=900, poll_s=0.5)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == 1  # no attempt lost: the writes were retried
    assert done["progress"]["step"] == done["progress"]["total_steps"] == 40
    log = db_events(stack, job_id)
    warnings = [d["database_retries"] for t, _, d in log if "database_retries" in d]
    assert warnings, log
    assert all(w["first_error"] and "[SQL" not in w["first_error"] for w in warnings)
    assert not [t for t, _, _ in log if t in ("failed", "retried")]
    assert all(code in (200, 503) for code, _ in codes), codes
    assert all(after == "3" for code, after in codes if code == 503), codes
    longest = max(w["longest_s"] for w in warnings)
    print(
        f"\nblip: {terminated} backends terminated in {blip_s:.1f} s from step {first_step}; "
        f"{len(warnings)} retry report(s), {sum(w['tries'] for w in warnings)} tries, "
        f"longest wait {longest:.2f} s; 0 steps redone; API answers {codes}"
    )


def test_an_outage_past_the_deadline_stops_the_attempt_and_the_job_resumes(
    client: Client, stack: Stack, pg_url: str
) -> None:
    database = make_url(pg_url).database
    assert database and re.fullmatch(r"[A-Za-z0-9_]+", database)
    job_id = client.submit(SPEC)["id"]
    deadline = time.monotonic() + 600
    while not client.http.get(f"/v1/jobs/{job_id}/checkpoints").json()["items"]:
        assert client.job(job_id)["status"] in ("queued", "running")
        assert time.monotonic() < deadline, "no checkpoint was listed"
        time.sleep(0.1)
    newest = client.http.get(f"/v1/jobs/{job_id}/checkpoints").json()["items"][-1]
    step_at_outage = client.job(job_id)["progress"]["step"]
    codes: list[tuple[int, str | None]] = []
    # the database refuses every connection for longer than the workers' retry deadline
    with admin(pg_url, "postgres") as conn:
        conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false'))
        try:
            away = time.monotonic()
            conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = :d AND backend_type = 'client backend'"
                ),
                {"d": database},
            )
            while time.monotonic() - away < DEADLINE_S + 4:
                poll(client, job_id, codes)
                time.sleep(0.5)
        finally:
            conn.execute(text(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true'))
        back = time.monotonic()
    outage_s = back - away
    assert codes and all(code == 503 and after == "3" for code, after in codes), codes
    worker_log = (stack.log_dir / "worker.log").read_text(errors="replace")
    assert "stopped without a verdict" in worker_log

    resumed_at = None
    while (cur := client.job(job_id))["status"] not in ("succeeded", "failed", "cancelled"):
        if resumed_at is None and cur["attempt"] == 2 and cur["status"] == "running":
            resumed_at = time.monotonic()
        assert time.monotonic() - back < 900, cur
        time.sleep(0.25)
    done = cur
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == 2
    assert done["progress"]["step"] == done["progress"]["total_steps"] == 40
    log = db_events(stack, job_id)
    types = [t for t, _, _ in log]
    assert "failed" not in types
    assert types.count("retried") == 1
    resumed = [d for t, _, d in log if t == "resumed"]
    assert len(resumed) == 1 and resumed[0]["step"] >= newest["step"], (resumed, newest)
    redone = step_at_outage - resumed[0]["step"]
    print(
        f"\noutage: database away {outage_s:.1f} s (retry deadline {DEADLINE_S:g} s, "
        f"heartbeat timeout {HEARTBEAT_TIMEOUT_S} s); {len(codes)} API GETs all 503; "
        f"attempt 2 running {resumed_at - back if resumed_at else float('nan'):.1f} s after "
        f"the database came back; resumed from {resumed[0]['checkpoint']} (step "
        f"{resumed[0]['step']}), outage at step {step_at_outage}: {max(redone, 0)} steps redone"
    )
