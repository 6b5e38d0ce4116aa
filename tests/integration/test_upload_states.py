"""Upload rows before their bytes (``uploading``), their heartbeat, what the quota and jobs see
of them, and the reconciler's sweep of dead uploads and of stored files without a row; on the
real PostgreSQL, Redis and upload folder."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from api.main import create_app
from core import tenants
from core.db import File, utcnow
from core.settings import Settings
from core.upload_liveness import UploadHeartbeat, heartbeat_interval_s
from tests.integration.test_files import csv_bytes, rows, upload
from worker.reconciler import reconcile_once


@pytest.fixture
def usettings(settings: Settings) -> Settings:
    return settings.model_copy(update={"upload_stale_s": 30.0})


@pytest.fixture
def client(usettings: Settings, key_headers: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(usettings), headers=key_headers) as c:
        yield c


@pytest.fixture
def db(usettings: Settings) -> Iterator[Session]:
    engine = create_engine(usettings.database_url)
    with Session(engine) as s:
        yield s
    engine.dispose()


def add_upload(
    s: Session,
    settings: Settings,
    status: str,
    updated_at: datetime,
    size: int = 0,
    stored: bytes | None = None,
) -> str:
    """A row of tenant ``test`` (and its file ``data.csv`` when ``stored``), as a process that
    died at that point left it."""
    file_id = f"file-{uuid.uuid4().hex}"
    s.add(
        File(
            id=file_id,
            tenant_id=tenants.ensure_tenant(s, "test").id,
            kind="dataset",
            filename="d.csv",
            size_bytes=size,
            sha256="",
            status=status,
            report={},
            created_at=updated_at,
            updated_at=updated_at,
        )
    )
    s.commit()
    if stored is not None:
        (settings.uploads_root / file_id).mkdir()
        (settings.uploads_root / file_id / "data.csv").write_bytes(stored)
    return file_id


def test_the_sweep_removes_dead_uploads_and_files_without_a_row_and_nothing_else(
    usettings: Settings, client: TestClient, db: Session
) -> None:
    root = usettings.uploads_root
    ready = upload(client, "ok.csv", csv_bytes(rows())).json()
    long_ago = utcnow() - timedelta(seconds=120)
    dead = add_upload(db, usettings, "uploading", long_ago, 7, b"half")
    alive = add_upload(db, usettings, "uploading", utcnow(), 7, b"arriving")
    failed = add_upload(db, usettings, "failed", long_ago, 0, b"left over")
    orphan = f"file-{uuid.uuid4().hex}"
    (root / orphan / "model").mkdir(parents=True)
    (root / orphan / "model" / "config.json").write_text("{}")
    partial = f"file-{uuid.uuid4().hex}"  # only a write's hidden temporary file
    (root / partial).mkdir()
    (root / partial / ".tmp-x1y2").write_bytes(b"...")
    (root / "not-an-upload").mkdir()
    (root / "not-an-upload" / "keep.txt").write_text("an operator's file")

    report = reconcile_once(usettings)

    assert report.swept_uploads[0] == dead and not report.errors
    assert sorted(report.swept_uploads[1:]) == sorted([failed, orphan, partial])
    db.expire_all()
    states = {r.id: r.status for r in db.execute(select(File.id, File.status))}
    assert states == {ready["id"]: "ready", alive: "uploading", failed: "failed"}
    assert sorted(p.name for p in root.iterdir()) == sorted([ready["id"], alive, "not-an-upload"])
    assert (root / ready["id"] / "data.csv").is_file()
    assert reconcile_once(usettings).swept_uploads == []  # nothing more to do
    assert client.get(f"/v1/files/{ready['id']}").json()["status"] == "ready"


def test_the_heartbeat_counts_the_bytes_received_and_keeps_the_row_alive(
    usettings: Settings, db: Session
) -> None:
    assert heartbeat_interval_s(usettings) == 6.0
    assert heartbeat_interval_s(usettings.model_copy(update={"upload_stale_s": 600})) == 10.0
    start = utcnow() - timedelta(seconds=120)
    file_id = add_upload(db, usettings, "uploading", start)
    ready = add_upload(db, usettings, "ready", start, 5)
    engine = create_engine(usettings.database_url)
    with UploadHeartbeat(engine, file_id, 0.05) as beat:
        beat.received = 4096
        deadline = time.monotonic() + 10
        while beat.beats < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert reconcile_once(usettings).swept_uploads == []  # it beats: not dead
    UploadHeartbeat(engine, ready, 1).beat()  # a ready row is never touched
    engine.dispose()
    db.expire_all()
    row = db.get(File, file_id)
    assert row is not None and row.size_bytes == 4096 and row.updated_at > start
    other = db.get(File, ready)
    assert other is not None and (other.size_bytes, other.updated_at) == (5, start)


def test_bytes_still_uploading_count_in_the_quota_and_no_job_can_name_them(
    usettings: Settings, client: TestClient, key_headers: dict[str, str], db: Session
) -> None:
    content = csv_bytes(rows())
    arriving = add_upload(db, usettings, "uploading", utcnow(), 100, b"x" * 100)
    listed = client.get("/v1/files").json()["items"]
    assert [(f["id"], f["status"], f["size_bytes"]) for f in listed] == [
        (arriving, "uploading", 100)
    ]
    job = client.post(
        "/v1/jobs",
        json={
            "teacher": "builtin:minilm-l6",
            "method": {"name": "finetune"},
            "dataset": {"source": arriving},
        },
    )
    assert job.status_code == 422 and job.json()["error"]["field"] == "dataset.source"
    assert "still uploading" in job.json()["error"]["message"]
    capped = usettings.model_copy(update={"default_max_stored_bytes": len(content) + 50})
    with TestClient(create_app(capped), headers=key_headers) as c:
        r = upload(c, "a.csv", content)
        assert r.status_code == 429, r.text
        assert r.json()["error"]["details"]["current"] == 100  # the upload in progress
        # its own bytes are not counted twice: alone it fits
        assert c.delete(f"/v1/files/{arriving}").status_code == 204
        ok = upload(c, "a.csv", content)
        assert ok.status_code == 201, ok.text
        assert (ok.json()["status"], ok.json()["size_bytes"]) == ("ready", len(content))
    db.expire_all()
    assert list(db.scalars(select(File.status))) == ["ready"]
    assert not (Path(usettings.uploads_root) / arriving).exists()
