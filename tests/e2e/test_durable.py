"""End to end, durable jobs: a real Celery worker checkpoints a job and is SIGKILLed mid-job;
the reconciler of a new worker re-queues the job and that worker resumes it from its newest
checkpoint, ending with weights equal bit for bit to an uninterrupted run's. And a job paused
over HTTP frees its worker, then resumes to the same weights."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors

from api import events
from api.db import make_engine, make_sessionmaker
from devstack.client import Client
from devstack.stack import Stack, running_stack

pytestmark = pytest.mark.e2e

CHECKPOINT_EVERY = 8
HEARTBEAT_TIMEOUT_S = 10
SPEC: dict[str, Any] = {
    "teacher": "builtin:minilm-l3",
    # one layer: the test is about checkpoints and resume, not the model (3x fewer FLOPs)
    "student": {"num_layers": 1},
    "method": {"name": "finetune"},
    "dataset": {
        "source": "builtin:rotten_tomatoes",
        "max_train_examples": 320,
        "max_eval_examples": 32,
    },
    # 40 optimiser steps per epoch, 80 in all: checkpoints at 8, 16, ... and at the epoch's end
    "training": {"epochs": 2, "batch_size": 8, "max_seq_length": 32, "learning_rate": 1e-4},
    "export": {"onnx": False},  # exported and checked in test_e2e / test_onnx_export
}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, pg_url: str, e2e_broker_url: str
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("durable")
    with running_stack(
        workdir,
        database_url=pg_url,
        broker_url=e2e_broker_url,
        extra_env={
            "DISTILLERY_PROGRESS_EVERY_STEPS": "1",
            "DISTILLERY_CHECKPOINT_EVERY_STEPS": str(CHECKPOINT_EVERY),
            "DISTILLERY_CHECKPOINTS_KEEP": "2",
            "DISTILLERY_HEARTBEAT_INTERVAL_S": "1",
            "DISTILLERY_HEARTBEAT_TIMEOUT_S": str(HEARTBEAT_TIMEOUT_S),
            "DISTILLERY_RECONCILE_INTERVAL_S": "2",
        },
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack: Stack) -> Client:
    return Client(stack.base_url, stack.api_key)


def weights(client: Client, job_id: str) -> dict[str, torch.Tensor]:
    r = client.http.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors")
    assert r.status_code == 200, r.text
    return load_safetensors(r.content)


@pytest.fixture(scope="module")
def reference(client: Client) -> dict[str, Any]:
    """The same job run without interruption: its final weights and step count."""
    job = client.submit(SPEC)
    done = client.wait(job["id"], timeout_s=900)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == 1
    return {"job": done, "weights": weights(client, job["id"])}


def assert_same_weights(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    different = [k for k in want if not torch.equal(got[k], want[k])]
    assert different == [], f"{len(different)} tensors differ, e.g. {different[:3]}"


def db_events(stack: Stack, job_id: str) -> list[tuple[str, str, dict[str, Any]]]:
    engine = make_engine(stack.env["DISTILLERY_DATABASE_URL"])
    with make_sessionmaker(engine)() as s:
        rows = [(e.type, e.message, e.data) for e in events.list_events(s, job_id, limit=1000)]
    engine.dispose()
    return rows


def test_a_sigkilled_worker_s_job_resumes_from_its_checkpoint_bit_for_bit(
    client: Client, stack: Stack, reference: dict[str, Any]
) -> None:
    job = client.submit(SPEC)
    job_id = job["id"]
    deadline = time.monotonic() + 600
    while True:
        listed = client.http.get(f"/v1/jobs/{job_id}/checkpoints").json()["items"]
        cur = client.job(job_id)
        if listed:
            break
        assert cur["status"] in ("queued", "running"), cur
        assert time.monotonic() < deadline, "no checkpoint was listed"
        time.sleep(0.1)
    # SIGKILL the worker's whole process group (the solo pool runs the job in it)
    worker = stack.processes.pop("worker")
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait(timeout=30)
    killed = client.job(job_id)
    assert killed["status"] == "running", killed  # nobody told the database
    step_at_kill = killed["progress"]["step"]
    total = killed["progress"]["total_steps"]
    assert step_at_kill < total, "the job had finished before the kill"
    listed = client.http.get(f"/v1/jobs/{job_id}/checkpoints").json()["items"]
    newest = listed[-1]

    # a new worker: its reconciler re-queues the job once its heartbeat is HEARTBEAT_TIMEOUT_S
    # old, and a worker resumes it from its newest checkpoint
    stack.start_worker("worker2")

    done = client.wait(job_id, timeout_s=900, poll_s=0.5)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == 2
    ref = reference["job"]
    assert done["progress"]["step"] == ref["progress"]["step"]
    assert done["progress"]["total_steps"] == ref["progress"]["total_steps"]
    assert_same_weights(weights(client, job_id), reference["weights"])

    log = db_events(stack, job_id)
    resumed = [(m, d) for t, m, d in log if t == "resumed"]
    assert len(resumed) == 1, log
    message, data = resumed[0]
    assert data["checkpoint"] == newest["name"] and data["step"] == newest["step"]
    assert message == (
        f"resumed from checkpoint {newest['name']} at step {newest['step']} of "
        f"{newest['total_steps']}"
    )
    types = [t for t, _, _ in log]
    assert types.count("retried") == 1
    assert types.index("retried") < types.index("resumed") < types.index("succeeded")
    assert [d.get("attempt") for t, _, d in log if t == "started"] == [1, 2]
    # once it succeeded, the kept checkpoints hold their students only (still downloadable);
    # the artifacts are the final output only
    kept = client.http.get(f"/v1/jobs/{job_id}/checkpoints").json()["items"]
    assert 0 < len(kept) <= 2, kept
    for item in kept:
        archive = client.http.get(item["archive_url"])
        assert archive.status_code == 200 and archive.content[:2] == b"\x1f\x8b"
        assert item["size_bytes"] < newest["size_bytes"], (item, newest)
    names = {a["name"] for a in client.artifacts(job_id)["items"]}
    assert "model.safetensors" in names and not any("checkpoint" in n for n in names)
    print(
        f"\nSIGKILL at step {step_at_kill} of {total}; resumed from {newest['name']} "
        f"(step {newest['step']}): {step_at_kill - newest['step']} steps lost"
    )


def test_pause_frees_the_worker_and_resume_finishes_bit_for_bit(
    client: Client, stack: Stack, reference: dict[str, Any]
) -> None:
    if not any(n.startswith("worker") for n in stack.processes):
        stack.start_worker("worker3")
    job = client.submit(SPEC)
    job_id = job["id"]
    deadline = time.monotonic() + 600
    while True:
        cur = client.job(job_id)
        if cur["status"] == "running" and (cur["progress"] or {}).get("step", 0) > 2:
            break
        assert cur["status"] in ("queued", "running"), cur
        assert time.monotonic() < deadline, "the job never started training"
        time.sleep(0.1)
    r = client.http.post(f"/v1/jobs/{job_id}/pause")
    assert r.status_code == 200, r.text
    assert r.json()["status"] in ("pausing", "paused")
    deadline = time.monotonic() + 120
    while (cur := client.job(job_id))["status"] != "paused":
        assert cur["status"] == "pausing", cur
        assert time.monotonic() < deadline, "the job never paused"
        time.sleep(0.2)
    paused_at = cur["progress"]["step"]
    assert 0 < paused_at < cur["progress"]["total_steps"]
    listed = client.http.get(f"/v1/jobs/{job_id}/checkpoints").json()["items"]
    assert listed[-1]["reason"] == "pause"
    assert listed[-1]["step"] == paused_at
    # the worker is free: another job runs to the end while this one stays paused
    small = client.submit({**SPEC, "training": {**SPEC["training"], "epochs": 1, "max_steps": 2}})
    assert client.wait(small["id"], timeout_s=600)["status"] == "succeeded"
    assert client.job(job_id)["status"] == "paused"
    assert client.http.post(f"/v1/jobs/{job_id}/pause").status_code == 409

    r = client.http.post(f"/v1/jobs/{job_id}/resume")
    assert r.status_code == 200, r.text
    done = client.wait(job_id, timeout_s=900, poll_s=0.5)
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == 2
    assert done["progress"]["step"] == reference["job"]["progress"]["step"]
    assert_same_weights(weights(client, job_id), reference["weights"])
    types = [t for t, _, _ in db_events(stack, job_id)]
    assert types.count("started") == 2
    order = [t for t in types if t in ("pausing", "paused", "queued", "resumed", "succeeded")]
    assert order == ["queued", "pausing", "paused", "queued", "resumed", "succeeded"]
