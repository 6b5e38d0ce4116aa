"""Faults injected into a real stack (uvicorn, real Celery worker processes, PostgreSQL,
Redis): a worker SIGKILLed mid-job, the broker's database flushed with jobs queued and one
running. Every job still finishes, with no one reading it. Liveness settings are short here
(heartbeat every 1 s, lost after 6 s, a reconciler pass every 2 s)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from sqlalchemy import select

from core.db import JobEvent, make_engine, make_sessionmaker
from devstack.client import Client
from devstack.stack import Stack, running_stack
from tests.checks import NO_EXTRAS

pytestmark = pytest.mark.e2e

HEARTBEAT_TIMEOUT_S = 6.0
RECONCILE_INTERVAL_S = 2.0
LIVENESS_ENV = {
    "DISTILLERY_PROGRESS_EVERY_STEPS": "1",
    "DISTILLERY_HEARTBEAT_INTERVAL_S": "1",
    "DISTILLERY_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
    "DISTILLERY_RECONCILE_INTERVAL_S": str(RECONCILE_INTERVAL_S),
    "DISTILLERY_REQUEUE_GRACE_S": "5",
    "DISTILLERY_BROKER_PUBLISH_TIMEOUT_S": "5",
}


def spec(train_examples: int, epochs: int = 1) -> dict[str, Any]:
    return {
        "teacher": "builtin:minilm-l6",
        # two of its six layers: the tests are about lost workers and brokers, not the model
        "student": {"num_layers": 2},
        "method": {"name": "finetune"},
        "dataset": {
            "source": "builtin:rotten_tomatoes",
            "max_train_examples": train_examples,
            "max_eval_examples": 32,
        },
        "training": {"epochs": epochs, "batch_size": 16, "max_seq_length": 32},
        "export": NO_EXTRAS,  # exported and checked in test_e2e / test_onnx_export
    }


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, pg_url: str, e2e_broker_url: str
) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("durable"),
        database_url=pg_url,
        broker_url=e2e_broker_url,
        extra_env=LIVENESS_ENV,
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack: Stack) -> Client:
    return Client(stack.base_url, stack.api_key)


def wait_training(client: Client, job_id: str, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        cur = client.job(job_id)
        if cur["status"] == "running" and (cur["progress"] or {}).get("step", 0) > 0:
            return cur
        assert cur["status"] in ("queued", "running"), cur
        assert time.monotonic() < deadline, "the job never started training"
        time.sleep(0.3)


def events_of(stack: Stack, job_id: str) -> list[JobEvent]:
    engine = make_engine(stack.env["DISTILLERY_DATABASE_URL"])
    try:
        with make_sessionmaker(engine)() as s:
            q = select(JobEvent).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
            return list(s.scalars(q))
    finally:
        engine.dispose()


def test_a_sigkilled_worker_s_job_is_retried_on_another_worker(
    client: Client, stack: Stack
) -> None:
    job = client.submit(spec(256, epochs=2))
    before = wait_training(client, job["id"])
    assert before["attempt"] == 1
    victim = stack.processes.pop("worker")
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(10)
    killed_at = time.time()
    # Nobody reads the job while it recovers: the reconciler of the new worker acts alone.
    stack.start_worker("worker2")
    deadline = time.monotonic() + 300
    while not any(e.type == "retried" for e in events_of(stack, job["id"])):
        assert time.monotonic() < deadline, "the lost job was never re-queued"
        time.sleep(1)
    done = client.wait(job["id"], timeout_s=600)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == 2
    evs = events_of(stack, job["id"])
    retried = [e for e in evs if e.type == "retried"]
    assert len(retried) == 1
    assert retried[0].message.startswith("worker lost at step ")
    assert retried[0].message.endswith("attempt 2 of 3")
    recovery_s = retried[0].created_at.timestamp() - killed_at
    # A heartbeat timeout, then the next pass of the new worker (its start-up included).
    assert HEARTBEAT_TIMEOUT_S - 2 <= recovery_s <= HEARTBEAT_TIMEOUT_S + RECONCILE_INTERVAL_S + 90
    started = [e.data.get("attempt") for e in evs if e.type == "started"]
    assert started == [1, 2]
    print(f"SIGKILL recovery: re-queued {recovery_s:.1f} s after the kill")


def test_every_job_finishes_after_the_broker_is_flushed(client: Client, stack: Stack) -> None:
    running = client.submit(spec(128))
    waiting = [client.submit(spec(32)) for _ in range(2)]
    wait_training(client, running["id"])
    assert all(client.job(j["id"])["status"] == "queued" for j in waiting)
    broker = redis.Redis.from_url(stack.env["DISTILLERY_BROKER_URL"])
    assert broker.llen("cpu") == 2
    broker.flushdb()  # this test's own broker database (DISTILLERY_TEST_E2E_BROKER_URL)
    flushed_at = time.monotonic()
    for job in [running, *waiting]:
        done = client.wait(job["id"], timeout_s=600)
        assert done["status"] == "succeeded", (job["id"], done["error"])
        assert done["attempt"] == 1
    print(f"FLUSHDB recovery: all 3 jobs done {time.monotonic() - flushed_at:.1f} s after")
