"""The stack on the s3 storage backend: uvicorn and a real Celery worker configured with
DISTILLERY_STORAGE_BACKEND=s3 against a real S3 server (moto's server mode, over HTTP). A
dataset is uploaded through the files API, a tiny job trains on it writing a checkpoint every
step, and the upload, the checkpoints and the final student are objects in the bucket (listed
with boto3); the archives downloaded through the API match the listing's and the bucket's
sha256. The local artifacts and uploads roots stay empty."""

from __future__ import annotations

import hashlib
import io
import tarfile
import time
from collections.abc import Iterator

import httpx
import pytest

from devstack.stack import Stack, running_stack
from tests import s3
from tests.checks import NO_EXTRAS

pytestmark = pytest.mark.e2e

PREFIX = "e2e"
TINY_TRAINING = {
    "epochs": 1,
    "batch_size": 16,
    "max_seq_length": 32,
    "learning_rate": 1e-4,
    "max_steps": 2,
}


def csv_bytes(n: int = 48) -> bytes:
    lines = ["text,label"]
    lines += [
        f'"review {i} was {"bad" if i % 2 else "good"}",{("pos", "neg")[i % 2]}' for i in range(n)
    ]
    return ("\n".join(lines) + "\n").encode()


@pytest.fixture(scope="module")
def bucket(s3_endpoint: str) -> str:
    return s3.new_bucket(s3_endpoint)


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory,
    pg_url: str,
    e2e_broker_url: str,
    s3_endpoint: str,
    bucket: str,
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("s3-stack")
    with running_stack(
        workdir,
        database_url=pg_url,
        broker_url=e2e_broker_url,
        workers=1,
        extra_env={
            **s3.env(s3_endpoint, bucket, PREFIX),
            "DISTILLERY_STORAGE_CACHE_DIR": str(workdir / "storage-cache"),
            "DISTILLERY_CHECKPOINT_EVERY_STEPS": "1",
            "DISTILLERY_PROGRESS_EVERY_STEPS": "1",
        },
    ) as s:
        yield s


def wait_final(client: httpx.Client, job_id: str, timeout_s: float = 120) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return dict(job)
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s")


def test_upload_train_and_download_through_the_bucket(
    stack: Stack, s3_endpoint: str, bucket: str
) -> None:
    headers = {"Authorization": f"Bearer {stack.api_key}"}
    with httpx.Client(base_url=stack.base_url, headers=headers, timeout=60) as client:
        content = csv_bytes()
        up = client.post(
            "/v1/files",
            files={"file": ("reviews.csv", content, "text/csv")},
            data={"purpose": "dataset"},
        )
        assert up.status_code == 201, up.text
        file_id = up.json()["id"]
        assert up.json()["sha256"] == hashlib.sha256(content).hexdigest()
        objects = s3.all_objects(s3_endpoint, bucket)
        assert f"{PREFIX}/uploads/{file_id}/data.csv" in objects

        spec = {
            "teacher": "builtin:minilm-l6",
            "student": {"num_layers": 1},  # small checkpoints: fast uploads
            "method": {"name": "finetune"},
            "dataset": {"source": file_id},
            "training": TINY_TRAINING,
            "export": NO_EXTRAS,
        }
        r = client.post("/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        job = wait_final(client, job_id)
        assert job["status"] == "succeeded", job

        # The final student and the checkpoints are in the bucket; once the job succeeded the
        # worker strips the checkpoints to their students (just after publishing: wait for it).
        job_prefix = f"{PREFIX}/artifacts/{job_id}/"
        checkpoints = client.get(f"/v1/jobs/{job_id}/checkpoints").json()["items"]
        assert checkpoints, "a checkpoint every step: at least one is kept"
        names = {c["name"] for c in checkpoints}

        def job_objects() -> list[str]:
            keys = s3.all_objects(s3_endpoint, bucket)
            return [k.removeprefix(job_prefix) for k in keys if k.startswith(job_prefix)]

        deadline = time.monotonic() + 30
        while True:
            ours = job_objects()
            extra = [
                k for k in ours if k.startswith("checkpoints/") and k.split("/")[2] != "student"
            ]
            if not extra or time.monotonic() > deadline:
                break
            time.sleep(0.3)
        assert extra == []
        assert {"config.json", "model.safetensors", "metrics.json"} <= set(ours)
        for name in names:
            assert f"checkpoints/{name}/student/model.safetensors" in ours

        # The archive, built by the API from the bucket: each member matches the listing and
        # the sha256 recorded on its object.
        listing = {a["name"]: a for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]}
        archive = client.get(f"/v1/jobs/{job_id}/archive")
        assert archive.status_code == 200
        members = {}
        with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
            for m in tar.getmembers():
                f = tar.extractfile(m)
                assert f is not None
                members[m.name.removeprefix(f"{job_id}/")] = hashlib.sha256(f.read()).hexdigest()
        assert members == {name: a["sha256"] for name, a in listing.items()}
        boto = s3.client(s3_endpoint)
        for name, digest in members.items():
            head = boto.head_object(Bucket=bucket, Key=job_prefix + name)
            assert head["Metadata"]["sha256"] == digest
        # One file, streamed from the bucket.
        one = client.get(f"/v1/jobs/{job_id}/artifacts/model.safetensors")
        assert one.status_code == 200
        assert hashlib.sha256(one.content).hexdigest() == listing["model.safetensors"]["sha256"]
        assert int(one.headers["content-length"]) == listing["model.safetensors"]["size_bytes"]
        # A checkpoint's student archive.
        ckpt = client.get(f"/v1/jobs/{job_id}/checkpoints/{checkpoints[-1]['name']}/archive")
        assert ckpt.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(ckpt.content), mode="r:gz") as tar:
            assert any(n.endswith("/config.json") for n in tar.getnames())

        # Deleting the job and the upload removes their objects.
        assert client.delete(f"/v1/jobs/{job_id}").status_code == 204
        assert client.delete(f"/v1/files/{file_id}").status_code == 204
        left = s3.all_objects(s3_endpoint, bucket)
        assert not [k for k in left if k.startswith((job_prefix, f"{PREFIX}/uploads/"))]

    # Nothing went to the local roots.
    workdir = stack.log_dir.parent
    for root in ("artifacts", "uploads"):
        assert [p for p in (workdir / root).rglob("*") if p.is_file()] == []
