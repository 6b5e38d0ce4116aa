"""Pause, resume and checkpoints through the API on PostgreSQL and Redis: the status
transitions and their 409s, checkpoints stored by the worker's code (listing, keep-K, archive
download, tenant isolation, stored bytes), and the final output published next to them."""

from __future__ import annotations

import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import torch
from fastapi.testclient import TestClient
from sqlalchemy import create_engine
from sqlalchemy.orm import Session, sessionmaker
from transformers import BertConfig, BertForSequenceClassification

from api.main import create_app
from core import checkpoints, events, quotas, repository
from core.db import Job
from core.settings import Settings
from core.storage import artifact_storage
from kd_engine.checkpoint import SavedCheckpoint
from tests.integration.conftest import new_key
from worker import checkpoints as worker_checkpoints

FINETUNE = {
    "teacher": "builtin:minilm-l6",
    "method": {"name": "finetune"},
    "dataset": {"source": "builtin:rotten_tomatoes"},
}


@pytest.fixture
def client(settings: Settings, key_headers: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers=key_headers) as c:
        yield c


@pytest.fixture
def sm(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = create_engine(settings.database_url)
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


def queued_ids(settings: Settings) -> list[str]:
    r = redis.Redis.from_url(settings.broker_url)
    return [json.loads(m)["headers"]["id"] for m in r.lrange(settings.queue, 0, -1)]


def event_types(sm: sessionmaker[Session], job_id: str) -> list[str]:
    with sm() as s:
        return [e.type for e in events.list_events(s, job_id)]


def claim(sm: sessionmaker[Session], job_id: str) -> None:
    with sm() as s:
        assert repository.claim(s, job_id, "w")
        s.commit()


def test_pause_and_resume_of_a_queued_job(
    client: TestClient, settings: Settings, sm: sessionmaker[Session]
) -> None:
    job = client.post("/v1/jobs", json=FINETUNE).json()
    assert queued_ids(settings) == [job["id"]]
    r = client.post(f"/v1/jobs/{job['id']}/pause")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "paused"
    # the queued task finds it paused: a worker cannot claim it
    with sm() as s:
        assert repository.claim(s, job["id"], "w") is False
    again = client.post(f"/v1/jobs/{job['id']}/pause")
    assert again.status_code == 409
    assert again.json()["error"]["details"] == {"status": "paused"}
    assert "paused" in again.json()["error"]["message"]
    r = client.post(f"/v1/jobs/{job['id']}/resume")
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "queued"
    assert queued_ids(settings) == [job["id"], job["id"]]  # sent again
    again = client.post(f"/v1/jobs/{job['id']}/resume")
    assert again.status_code == 409
    assert again.json()["error"]["details"] == {"status": "queued"}
    claim(sm, job["id"])  # the resumed job runs
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"
    assert event_types(sm, job["id"]) == ["queued", "paused", "queued"]


def test_pause_of_a_running_job_then_cancel_and_409s(
    client: TestClient, settings: Settings, sm: sessionmaker[Session]
) -> None:
    job = client.post("/v1/jobs", json=FINETUNE).json()
    claim(sm, job["id"])
    r = client.post(f"/v1/jobs/{job['id']}/pause")
    assert r.json()["status"] == "pausing"
    assert client.post(f"/v1/jobs/{job['id']}/resume").json()["error"]["details"] == {
        "status": "pausing"
    }
    # the worker's heartbeat still lands while pausing
    with sm() as s:
        assert repository.heartbeat(s, job["id"], {"stage": "train", "step": 3}) == "pausing"
        s.commit()
    assert client.get(f"/v1/jobs/{job['id']}").json()["progress"]["step"] == 3
    # cancel while pausing: cancelling (the worker stops), like a running job
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelling"
    r = client.post(f"/v1/jobs/{job['id']}/pause")
    assert r.status_code == 409
    assert r.json()["error"]["details"] == {"status": "cancelling"}

    # a paused job is cancelled at once
    other = client.post("/v1/jobs", json=FINETUNE).json()
    claim(sm, other["id"])
    client.post(f"/v1/jobs/{other['id']}/pause")
    saved = SavedCheckpoint(
        Path("x"), "step-00000004", 4, 10, 1, 1, "train", 1, "pause", {}, Path("x")
    )
    assert worker_checkpoints.settle_paused(sm, other["id"], saved) == "paused"
    paused = client.get(f"/v1/jobs/{other['id']}").json()
    assert paused["status"] == "paused"
    assert paused["progress"] is not None
    with sm() as s:
        row = s.get(Job, other["id"])
        assert row is not None and row.worker is None  # it holds no worker
    r = client.post(f"/v1/jobs/{other['id']}/cancel")
    assert r.json()["status"] == "cancelled"
    assert r.json()["finished_at"] is not None
    assert event_types(sm, other["id"])[-3:] == ["pausing", "paused", "cancelled"]
    for verb in ("pause", "resume"):
        r = client.post(f"/v1/jobs/{other['id']}/{verb}")
        assert r.status_code == 409, r.text
        assert r.json()["error"]["code"] == "conflict"
        assert r.json()["error"]["details"] == {"status": "cancelled"}


def test_resume_with_the_broker_down_is_503_and_the_job_stays_paused(
    settings: Settings, key_headers: dict[str, str], client: TestClient
) -> None:
    job = client.post("/v1/jobs", json=FINETUNE).json()
    assert client.post(f"/v1/jobs/{job['id']}/pause").json()["status"] == "paused"
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down), headers=key_headers) as c:
        r = c.post(f"/v1/jobs/{job['id']}/resume")
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "unavailable"
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "paused"
    assert client.post(f"/v1/jobs/{job['id']}/resume").json()["status"] == "queued"


def test_pause_of_another_tenants_job_is_404(client: TestClient, settings: Settings) -> None:
    job = client.post("/v1/jobs", json=FINETUNE).json()
    other = {"Authorization": f"Bearer {new_key(settings.database_url, 'other')}"}
    for verb in ("pause", "resume"):
        r = client.post(f"/v1/jobs/{job['id']}/{verb}", headers=other)
        assert r.status_code == 404, r.text
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "queued"


def fake_student(directory: Path, seed: int) -> None:
    """A tiny real BERT classifier saved as a transformers directory."""
    torch.manual_seed(seed)
    shape: dict[str, Any] = {
        "vocab_size": 50, "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
        "intermediate_size": 16, "max_position_embeddings": 16, "num_labels": 2,
    }  # fmt: skip
    config = BertConfig(**shape)
    BertForSequenceClassification(config).save_pretrained(directory)


def local_checkpoint(root: Path, name: str, step: int, reason: str = "interval") -> SavedCheckpoint:
    """A checkpoint folder as the KD loop leaves it: a manifest and a ``student/`` directory."""
    path = root / name
    fake_student(path / "student", step)
    manifest = {
        "format": 1, "name": name, "step": step, "total_steps": 40, "hop": 1, "num_hops": 1,
        "stage": "train", "stage_index": 1, "reason": reason, "dev": {"accuracy": step / 100},
    }  # fmt: skip
    (path / "manifest.json").write_text(json.dumps(manifest))
    return SavedCheckpoint(
        path, name, step, 40, 1, 1, "train", 1, reason, {"accuracy": step / 100}, path / "student"
    )


def test_checkpoints_are_stored_kept_listed_downloaded_and_scoped(
    client: TestClient, settings: Settings, sm: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"checkpoints_keep": 2})
    job = client.post("/v1/jobs", json=FINETUNE).json()
    job_id = job["id"]
    claim(sm, job_id)
    staging = settings.artifacts_root / ".partial"
    for step in (10, 20, 30):
        saved = local_checkpoint(staging, f"step-{step:08d}", step)
        worker_checkpoints.store(sm, settings, job_id, 1, saved)
        assert not saved.path.exists()  # the local copy is gone

    listing = client.get(f"/v1/jobs/{job_id}/checkpoints").json()
    assert [c["name"] for c in listing["items"]] == ["step-00000020", "step-00000030"]
    newest = listing["items"][-1]
    assert newest["step"] == 30 and newest["total_steps"] == 40 and newest["hop"] == 1
    assert newest["reason"] == "interval" and newest["stage"] == "train"
    assert newest["dev"] == {"accuracy": 0.3}
    assert newest["attempt"] == 1
    store = artifact_storage(settings)
    keys = store.list_keys(checkpoints.checkpoint_key(job_id))
    assert newest["size_bytes"] == sum(store.size(k) for k in keys if "/step-00000030/" in k)
    # the oldest was deleted from the store and the table; each save is an event
    assert not any("/step-00000010/" in k for k in keys)
    assert event_types(sm, job_id).count("checkpoint") == 3
    # not artifacts, but counted in the tenant's stored bytes
    assert client.get(f"/v1/jobs/{job_id}/artifacts").json()["items"] == []
    with sm() as s:
        tenant_id = s.get(Job, job_id).tenant_id  # type: ignore[union-attr]
        assert quotas.stored_bytes(s, tenant_id) == sum(c["size_bytes"] for c in listing["items"])

    r = client.get(newest["archive_url"])
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
        folder = f"{job_id}-step-00000030"
        assert {f"{folder}/config.json", f"{folder}/model.safetensors"} <= set(members)
        assert all(n.startswith(folder + "/") for n in members)
        blob = tar.extractfile(members[f"{folder}/model.safetensors"]).read()  # type: ignore[union-attr]
    stored = store.read_bytes(
        f"{checkpoints.checkpoint_key(job_id, 'step-00000030')}/student/model.safetensors"
    )
    assert blob == stored
    tar_dir = tmp_path / "x"
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        tar.extractall(tar_dir, filter="data")
    model = BertForSequenceClassification.from_pretrained(tar_dir / folder)
    assert model.config.num_labels == 2

    assert client.get(f"/v1/jobs/{job_id}/checkpoints/step-00000010/archive").status_code == 404
    assert client.get(f"/v1/jobs/{job_id}/checkpoints/..%2Fx/archive").status_code == 404
    bad = client.get(f"/v1/jobs/{job_id}/checkpoints/a%00b/archive")
    assert bad.status_code == 422, bad.text
    other = {"Authorization": f"Bearer {new_key(settings.database_url, 'other')}"}
    assert client.get(f"/v1/jobs/{job_id}/checkpoints", headers=other).status_code == 404
    assert client.get(newest["archive_url"], headers=other).status_code == 404

    # the final output is published next to the checkpoints without removing them
    out = staging / "final"
    fake_student(out, 99)
    published = store.put_dir(job_id, out, keep=(checkpoints.CHECKPOINTS_DIR,))
    assert {o.key for o in published} == {f"{job_id}/config.json", f"{job_id}/model.safetensors"}
    assert store.list_keys(checkpoints.checkpoint_key(job_id)) == keys
    # once it succeeded, each keeps its student only: still listed and downloadable
    manifest_bytes = store.size(
        f"{checkpoints.checkpoint_key(job_id, 'step-00000030')}/manifest.json"
    )
    assert worker_checkpoints.keep_students(sm, settings, job_id) >= 2 * manifest_bytes
    cut = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["items"]
    assert [c["name"] for c in cut] == ["step-00000020", "step-00000030"]
    assert cut[-1]["size_bytes"] == newest["size_bytes"] - manifest_bytes
    left = store.list_keys(checkpoints.checkpoint_key(job_id, "step-00000030"))
    assert left and all("/step-00000030/student/" in k for k in left)
    again = client.get(newest["archive_url"])
    assert again.status_code == 200, again.text
    with tarfile.open(fileobj=io.BytesIO(again.content), mode="r:gz") as tar:
        member = tar.extractfile(f"{folder}/model.safetensors")
        assert member is not None and member.read() == blob
    with sm() as s:  # the tenant's stored bytes shrink with them
        assert quotas.stored_bytes(s, tenant_id) == sum(c["size_bytes"] for c in cut)


def test_resume_falls_back_from_a_corrupt_checkpoint_then_to_a_fresh_start(
    client: TestClient, settings: Settings, sm: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"checkpoints_keep": 3})
    job_id = client.post("/v1/jobs", json=FINETUNE).json()["id"]
    claim(sm, job_id)
    staging = settings.artifacts_root / ".partial"
    for step in (10, 20, 30):
        worker_checkpoints.store(
            sm, settings, job_id, 1, local_checkpoint(staging, f"step-{step:08d}", step)
        )
    store = artifact_storage(settings)
    newest = store.local_path(checkpoints.checkpoint_key(job_id, "step-00000030"))
    weights = newest / "student" / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[len(blob) // 2] ^= 0xFF  # one flipped bit pattern in the middle: same size
    weights.write_bytes(bytes(blob))

    got = worker_checkpoints.fetch_latest(sm, settings, job_id, tmp_path / "resume")
    assert got is not None
    assert got.info.name == "step-00000020" and got.info.step == 20
    assert (got.directory / "student" / "model.safetensors").is_file()
    with sm() as s:
        warnings = [e.message for e in events.list_events(s, job_id) if e.type == "warning"]
    assert len(warnings) == 1
    assert "step-00000030" in warnings[0] and "checksum" in warnings[0]

    # the older ones lose a file / their manifest: nothing loads, the job starts afresh
    (
        store.local_path(checkpoints.checkpoint_key(job_id, "step-00000020")) / "manifest.json"
    ).unlink()
    (
        store.local_path(checkpoints.checkpoint_key(job_id, "step-00000010")) / "manifest.json"
    ).write_text("{}")
    assert worker_checkpoints.fetch_latest(sm, settings, job_id, tmp_path / "resume") is None
    assert not (tmp_path / "resume").exists()
    with sm() as s:
        warnings = [e.message for e in events.list_events(s, job_id) if e.type == "warning"]
    assert len(warnings) == 1 + 3 + 1
    assert "starts afresh" in warnings[-1]
