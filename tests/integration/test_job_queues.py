"""A job records the queue it is sent to (the submitting API's ``DISTILLERY_QUEUE``), and
every later send goes there, whichever process sends it: the reconciler of a ``cpu`` worker
(lost message, lost worker), a resume, a dependency's release (whose memory check uses the
job's queue). On the real PostgreSQL and Redis broker; the migration's backfill on SQLite."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session

from api.main import create_app
from core import repository, tenants
from core.db import Job
from core.settings import Settings
from tests.integration.test_api import FINETUNE
from tests.integration.test_dependencies import (
    SMALL,
    release,
    student_of,
    succeed_with_a_classifier,
)
from tests.integration.test_reconciler import age, start
from worker.reconciler import reconcile_once

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def cpu(settings: Settings) -> Settings:
    """A cpu worker's settings (short grace) with a tiny cpu memory budget."""
    return settings.model_copy(
        update={
            "queue": "cpu",
            "requeue_grace_s": 2.0,
            "heartbeat_timeout_s": 5.0,
            "queue_memory_bytes": {"cpu": 1, "gpu": 80 * 1024**3},
        }
    )


@pytest.fixture
def gpu_api(cpu: Settings, key_headers: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(cpu.model_copy(update={"queue": "gpu"})), headers=key_headers) as c:
        yield c


@pytest.fixture
def db(cpu: Settings) -> Iterator[Session]:
    engine = create_engine(cpu.database_url)
    with Session(engine) as s:
        yield s
    engine.dispose()


def held(settings: Settings, queue: str) -> list[str]:
    r = redis.Redis.from_url(settings.broker_url)
    return [json.loads(m)["headers"]["id"] for m in r.lrange(queue, 0, -1)]


def new_job(s: Session, queue: str) -> str:
    job_id = str(uuid.uuid4())
    tenant = tenants.ensure_tenant(s, "test")
    repository.create_job(s, job_id, "finetune", {}, tenant_id=tenant.id, queue=queue)
    s.commit()
    return job_id


def test_a_cpu_worker_s_pass_re_sends_each_lost_job_to_its_own_queue(
    cpu: Settings, db: Session
) -> None:
    on_cpu, on_gpu = new_job(db, "cpu"), new_job(db, "gpu")
    for job_id in (on_cpu, on_gpu):
        age(db, job_id, 60)
    report = reconcile_once(cpu)
    assert sorted(report.resent) == sorted([on_cpu, on_gpu]) and not report.errors
    assert held(cpu, "cpu") == [on_cpu] and held(cpu, "gpu") == [on_gpu]
    # held in their queues now: not sent again, nor to another queue
    assert reconcile_once(cpu).resent == []
    assert held(cpu, "cpu") == [on_cpu] and held(cpu, "gpu") == [on_gpu]


def test_a_lost_gpu_job_is_re_queued_to_gpu_by_a_cpu_worker_s_pass(
    cpu: Settings, db: Session
) -> None:
    job_id = new_job(db, "gpu")
    start(db, job_id, "gpu0")
    age(db, job_id, 60)
    assert reconcile_once(cpu).retried == [job_id]
    assert held(cpu, "gpu") == [job_id] and held(cpu, "cpu") == []


def test_submit_records_the_api_queue_and_resume_sends_there(
    cpu: Settings, gpu_api: TestClient, key_headers: dict[str, str], db: Session
) -> None:
    r = gpu_api.post("/v1/jobs", json={**FINETUNE, **SMALL})
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["queue"] == "gpu"
    assert held(cpu, "gpu") == [job["id"]] and held(cpu, "cpu") == []
    assert db.scalar(select(Job.queue).where(Job.id == job["id"])) == "gpu"
    # The same job is over the cpu queue's budget (1 byte): an API on cpu refuses it.
    with TestClient(create_app(cpu), headers=key_headers) as on_cpu:
        refused = on_cpu.post("/v1/jobs", json={**FINETUNE, **SMALL})
        assert refused.status_code == 422, refused.text
        assert refused.json()["error"]["details"]["queue"] == "cpu"
        assert gpu_api.post(f"/v1/jobs/{job['id']}/pause").json()["status"] == "paused"
        redis.Redis.from_url(cpu.broker_url).delete("gpu")
        # resumed through the cpu API: sent to the job's queue
        assert on_cpu.post(f"/v1/jobs/{job['id']}/resume").json()["status"] == "queued"
    assert held(cpu, "gpu") == [job["id"]] and held(cpu, "cpu") == []


def test_a_released_gpu_job_is_checked_against_the_gpu_budget_and_sent_to_gpu(
    cpu: Settings, gpu_api: TestClient
) -> None:
    teacher = gpu_api.post("/v1/jobs", json={**FINETUNE, **SMALL}).json()
    student = gpu_api.post("/v1/jobs", json=student_of(teacher["id"])).json()
    assert (student["status"], student["queue"]) == ("waiting", "gpu")
    redis.Redis.from_url(cpu.broker_url).delete("gpu")
    succeed_with_a_classifier(cpu, teacher["id"])
    assert release(cpu) == [student["id"]]  # a cpu worker's pass, with a 1-byte cpu budget
    got = gpu_api.get(f"/v1/jobs/{student['id']}").json()
    assert (got["status"], got["error"]) == ("queued", None)
    assert held(cpu, "gpu") == [student["id"]] and held(cpu, "cpu") == []


def test_the_migration_backfills_the_queue_and_downgrades(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from alembic import command
    from alembic.config import Config

    url = f"sqlite:///{tmp_path / 'm.db'}"
    cfg = Config(str(ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(ROOT / "migrations"))
    cfg.attributes.update({"url": url, "configure_logger": False})

    def alembic(what: str, revision: str, queue: str | None = None) -> None:
        monkeypatch.delenv("DISTILLERY_QUEUE", raising=False)
        if queue:
            monkeypatch.setenv("DISTILLERY_QUEUE", queue)
        getattr(command, what)(cfg, revision)

    alembic("upgrade", "0007_checkpoints")
    with sqlite3.connect(tmp_path / "m.db") as conn:
        conn.execute("INSERT INTO tenants (id, name, created_at) VALUES ('t', 't', '2026-01-01')")
        conn.execute(
            "INSERT INTO jobs (id, tenant_id, status, method, spec, attempt, created_at, "
            "updated_at) VALUES ('j', 't', 'queued', 'finetune', '{}', 0, '2026-01-01', "
            "'2026-01-01')"
        )
        conn.execute(
            "INSERT INTO files (id, tenant_id, kind, filename, size_bytes, sha256, status, "
            "report, created_at) VALUES ('f', 't', 'dataset', 'a.csv', 3, 'x', 'ready', '{}', "
            "'2026-01-02')"
        )
    alembic("upgrade", "head", queue="gpu")
    engine = create_engine(url)
    with Session(engine) as s:
        assert s.execute(select(Job.queue)).scalars().all() == ["gpu"]
        s.execute(update(Job).values(status="queued"))
        s.commit()
    with sqlite3.connect(tmp_path / "m.db") as conn:
        assert conn.execute("SELECT updated_at, error FROM files").fetchall() == [
            ("2026-01-02", None)
        ]
        conn.execute(
            "INSERT INTO files (id, tenant_id, kind, filename, size_bytes, sha256, status, "
            "report, created_at, updated_at) VALUES ('g', 't', 'dataset', 'b.csv', 0, '', "
            "'uploading', '{}', '2026-01-03', '2026-01-03')"
        )
    engine.dispose()
    alembic("downgrade", "0007_checkpoints")
    with sqlite3.connect(tmp_path / "m.db") as conn:
        assert conn.execute("SELECT id FROM files").fetchall() == [("f",)]
        columns = [r[1] for r in conn.execute("PRAGMA table_info(jobs)")]
        assert "queue" not in columns
