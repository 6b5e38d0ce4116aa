"""A worker with DISTILLERY_WORKER_GPUS=2 runs a job on two data-parallel ranks (gloo on the
CPU here; nccl with one GPU per rank on a multi-GPU machine) through the worker's execute."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from api.main import create_app
from core import events
from core.settings import Settings
from kd_engine.ranks import WORKER_GPUS_ENV
from tests.checks import NO_EXTRAS

JOB: dict[str, Any] = {
    "teacher": "builtin:minilm-l6",
    "method": {"name": "finetune"},
    "dataset": {
        "source": "builtin:rotten_tomatoes",
        "max_train_examples": 16,
        "max_eval_examples": 8,
    },
    "training": {"epochs": 1, "batch_size": 8, "max_seq_length": 16, "device": "cpu"},
    "export": NO_EXTRAS,  # not about export
}


@pytest.fixture
def client(settings: Settings, key_headers: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers=key_headers) as c:
        yield c


def event_types(settings: Settings, job_id: str) -> list[str]:
    with Session(create_engine(settings.database_url)) as s:
        return [e.type for e in events.list_events(s, job_id)]


def test_a_two_gpu_worker_runs_a_job_on_two_ranks(
    client: TestClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker.runner import execute

    monkeypatch.setenv(WORKER_GPUS_ENV, "2")
    job = client.post("/v1/jobs", json=JOB).json()
    assert execute(job["id"], settings) == "succeeded"
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "succeeded", done
    metrics = client.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert "accuracy" in metrics["final"]["test"]
    assert [e["step"] for e in metrics["epochs"]] == [2]  # 16 rows / batch 8, one epoch
    names = {a["name"] for a in client.get(f"/v1/jobs/{job['id']}/artifacts").json()["items"]}
    assert "model.safetensors" in names
    kinds = event_types(settings, job["id"])
    assert "succeeded" in kinds

    # what DDP does not support fails the job with a reason naming the setting
    small = {**JOB, "training": {**JOB["training"], "batch_size": 1}}
    bad = client.post("/v1/jobs", json=small).json()
    assert execute(bad["id"], settings) == "failed"
    failed = client.get(f"/v1/jobs/{bad['id']}").json()
    assert "training.batch_size" in failed["error"], failed
