"""End to end, durable jobs: a real Celery worker checkpoints a job and is SIGKILLed mid-job;
the reconciler of a new worker re-queues the job and that worker resumes it from its newest
checkpoint, ending with weights equal bit for bit to an uninterrupted run's. A job paused
over HTTP frees its worker, then resumes to the same weights. And a worker SIGKILLed (by
strace, at one exact rename) while publishing a job's output loses none of its checkpoints:
the next attempt resumes from the newest, and the dead attempt's staging is swept."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors

from core import events
from core.db import make_engine, make_sessionmaker
from devstack.client import Client
from devstack.stack import Stack, running_stack
from tests.checks import NO_EXTRAS

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
    "export": NO_EXTRAS,  # exported and checked in test_e2e / test_onnx_export
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


def wait_for(check: Any, what: str, timeout_s: float = 120, every_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := check()):
        assert time.monotonic() < deadline, what
        time.sleep(every_s)
    return value


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace is not installed")
def test_a_worker_killed_while_publishing_loses_no_checkpoint(
    client: Client, stack: Stack, tmp_path: Path
) -> None:
    """Before: publishing moved checkpoints/ aside and removed the job's folder, so a kill
    there stranded them in .tmp-* and the next attempt trained from step 0."""
    name = next(n for n in stack.processes if n.startswith("worker"))
    worker = stack.processes[name]
    # 96 examples, batch 8: 12 steps, a checkpoint at step 8 (none after the last stage)
    spec = {
        **SPEC,
        "dataset": {**SPEC["dataset"], "max_train_examples": 96},
        "training": {**SPEC["training"], "epochs": 1},
    }
    job_id = client.submit(spec)["id"]
    artifacts = Path(stack.env["DISTILLERY_ARTIFACTS_ROOT"]).resolve()
    staged = artifacts / ".partial" / f"{job_id}-1"  # worker.staging.AttemptDirs
    wait_for(
        lambda: (client.job(job_id)["progress"] or {}).get("step", 0) > 0,
        "the job never started training",
        timeout_s=600,
    )
    assert (staged / "train_log.jsonl").is_file()
    # SIGKILL the worker at the rename that publishes its train_log.jsonl (files sorted
    # before it are published, those after it not), or, for a publish that moved the whole
    # staged folder, at that folder's rename. Nothing else renames these two paths.
    renames = "rename,renameat,renameat2"
    with (tmp_path / "strace.err").open("wb") as err:
        tracer = subprocess.Popen(
            [
                "strace", "-f", "-p", str(worker.pid), "-o", os.devnull,
                f"--trace-path={staged}", f"--trace-path={staged / 'train_log.jsonl'}",
                f"--trace={renames}", f"--inject={renames}:signal=SIGKILL",
            ],
            stderr=err,
        )  # fmt: skip
    try:
        wait_for(lambda: b"attached" in (tmp_path / "strace.err").read_bytes(), "no strace")
        worker.wait(timeout=600)
        killed_at = time.time()
    finally:
        tracer.kill()
        tracer.wait(30)
    assert worker.returncode == -signal.SIGKILL, (worker.returncode, client.job(job_id))
    stack.processes.pop(name)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(worker.pid, signal.SIGKILL)

    assert client.job(job_id)["status"] == "running"  # nobody told the database
    listed = client.http.get(f"/v1/jobs/{job_id}/checkpoints").json()["items"]
    newest = listed[-1]
    assert [c["step"] for c in listed] == [8], listed
    # every checkpoint is where it was (before: moved into a hidden .tmp-* folder) ...
    for item in listed:
        assert (artifacts / job_id / "checkpoints" / item["name"] / "manifest.json").is_file()
    assert not list(artifacts.glob(".tmp-*"))
    # ... and the kill came part-way through publishing
    assert (artifacts / job_id / "config.json").is_file()
    assert (staged / "train_log.jsonl").is_file()

    stack.start_worker("worker-publish")
    done = client.wait(job_id, timeout_s=900, poll_s=0.5)
    recovered_s = time.time() - killed_at
    assert done["status"] == "succeeded", done["error"]
    assert done["attempt"] == 2
    log = db_events(stack, job_id)
    retried = [(m, d) for t, m, d in log if t == "retried"]
    assert [m for m, _ in retried] == [
        f"worker lost at step 8 (newest checkpoint {newest['name']} at step 8); attempt 2 of 3"
    ]
    resumed = [d for t, _, d in log if t == "resumed"]
    assert [(d["checkpoint"], d["step"]) for d in resumed] == [(newest["name"], 8)]
    assert done["progress"]["step"] == done["progress"]["total_steps"] == 12  # 4 steps redone
    items = client.artifacts(job_id)["items"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "train_log.jsonl"} <= {
        a["name"] for a in items
    }
    for a in items:
        r = client.http.get(f"/v1/jobs/{job_id}/artifacts/{a['name']}")
        assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == a["sha256"]
    assert client.http.get(f"/v1/jobs/{job_id}/archive").status_code == 200
    # the dead attempt's staging is swept by the new worker's reconciler
    wait_for(
        lambda: not list(staged.parent.glob(f"{job_id}-1*")),
        "the dead attempt's staging was never swept",
        timeout_s=60,
    )
    engine = make_engine(stack.env["DISTILLERY_DATABASE_URL"])
    with make_sessionmaker(engine)() as s:
        at = {e.type: e.created_at.timestamp() for e in events.list_events(s, job_id, limit=1000)}
    engine.dispose()
    print(
        f"\nSIGKILL while publishing: retried {at['retried'] - killed_at:.1f} s, resumed "
        f"{at['resumed'] - killed_at:.1f} s, succeeded {recovered_s:.1f} s after the kill "
        f"(heartbeat timeout {HEARTBEAT_TIMEOUT_S} s); resumed from {newest['name']} (step 8 "
        f"of 12): 4 steps redone; checkpoints kept: {sum(c['size_bytes'] for c in listed)} bytes"
    )
