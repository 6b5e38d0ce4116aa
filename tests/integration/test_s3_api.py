"""The API and the worker's ``execute`` on the s3 storage backend (moto's S3 server over
HTTP): a model archive and a dataset uploaded into the bucket (checked and unpacked through
the store), a job trained from both, its student in the bucket; a store that breaks is a 503
JSON answer, and an API configured with a missing bucket does not start."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from api.main import create_app
from core.settings import Settings
from core.storage import StorageError
from tests import s3
from tests.checks import NO_EXTRAS
from tests.integration import test_files
from tests.integration.conftest import new_key
from worker.runner import execute

teacher_dir = test_files.teacher_dir  # the module's fixtures, used here too
teacher_tgz = test_files.teacher_tgz


def s3_settings(settings: Settings, endpoint: str, bucket: str, cache: Path) -> Settings:
    return settings.model_copy(
        update={
            "storage_backend": "s3",
            "s3_bucket": bucket,
            "s3_prefix": "api",
            "s3_endpoint_url": endpoint,
            "s3_region": s3.REGION,
            "s3_access_key_id": s3.ACCESS_KEY,
            "s3_secret_access_key": SecretStr(s3.SECRET_KEY),
            "storage_cache_dir": cache,
        }
    )


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    return s3.new_bucket(s3_endpoint)


@pytest.fixture
def on_s3(settings: Settings, s3_endpoint: str, bucket: str, tmp_path: Path) -> Settings:
    return s3_settings(settings, s3_endpoint, bucket, tmp_path / "storage-cache")


@pytest.fixture
def client(on_s3: Settings) -> Iterator[TestClient]:
    key = new_key(on_s3.database_url, "s3")
    with TestClient(create_app(on_s3), headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


def test_uploads_and_a_job_go_through_the_bucket(
    client: TestClient, on_s3: Settings, s3_endpoint: str, bucket: str, teacher_tgz: bytes
) -> None:
    model = test_files.upload(client, "teacher.tar.gz", teacher_tgz, purpose="model")
    assert model.status_code == 201, model.text
    model_id = model.json()["id"]
    assert model.json()["report"]["num_layers"] == 1
    data = test_files.upload(client, "reviews.csv", test_files.csv_bytes(test_files.rows()))
    assert data.status_code == 201, data.text
    data_id = data.json()["id"]
    objects = s3.all_objects(s3_endpoint, bucket)
    assert f"api/uploads/{data_id}/data.csv" in objects
    assert f"api/uploads/{model_id}/model/config.json" in objects
    assert f"api/uploads/{model_id}/model/model.safetensors" in objects
    assert not [o for o in objects if o.endswith("/archive")]  # unpacked, then deleted
    assert test_files.stored_files(on_s3) == []  # nothing in the local uploads root

    job = client.post(
        "/v1/jobs",
        json={
            "teacher": model_id,
            "method": {"name": "finetune"},
            "dataset": {"source": data_id},
            "training": {"epochs": 1, "batch_size": 8, "max_seq_length": 16, "max_steps": 1,
                         "device": "cpu"},
            "export": NO_EXTRAS,
        },
    )  # fmt: skip
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    assert execute(job_id, on_s3) == "succeeded"
    objects = s3.all_objects(s3_endpoint, bucket)
    assert f"api/artifacts/{job_id}/model.safetensors" in objects
    listing = client.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]
    config = client.get(f"/v1/jobs/{job_id}/artifacts/config.json")
    assert config.status_code == 200 and b"num_hidden_layers" in config.content
    assert [p for p in on_s3.artifacts_root.rglob("*") if p.is_file()] == []
    assert {a["name"] for a in listing} >= {"config.json", "model.safetensors"}


def test_a_broken_store_is_a_503_and_a_missing_bucket_stops_the_api(
    client: TestClient, on_s3: Settings, s3_endpoint: str, bucket: str, tmp_path: Path
) -> None:
    boto = s3.client(s3_endpoint)
    boto.delete_bucket(Bucket=bucket)  # empty: nothing was stored yet
    r = test_files.upload(client, "reviews.csv", test_files.csv_bytes(test_files.rows()))
    assert r.status_code == 503, r.text
    error = r.json()["error"]
    assert error["code"] == "unavailable" and "Traceback" not in r.text
    assert bucket not in r.text  # the bucket's name stays in the server log
    missing = s3_settings(on_s3, s3_endpoint, "no-such-bucket-y", tmp_path / "c2")
    with (
        pytest.raises(StorageError, match="DISTILLERY_S3_BUCKET"),
        TestClient(create_app(missing)),
    ):
        pass
