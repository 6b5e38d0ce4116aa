"""The teacher-output cache through the worker's real ``execute``: a tenant's second job with
the same teacher and data reuses the cache its first job built (kept in the artifact store under
``cache/teacher/<tenant id>/<key>/``), and another tenant's identical job does not."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

from api.main import create_app
from core import tenants
from core.db import Job
from core.settings import Settings
from core.storage import artifact_storage
from kd_engine.teacher_cache import CACHE_FILE
from tests.checks import NO_EXTRAS
from worker.runner import execute
from worker.teacher_caches import CACHE_PREFIX

SMALL: dict[str, Any] = {
    "dataset": {
        "source": "builtin:rotten_tomatoes",
        "max_train_examples": 16,
        "max_eval_examples": 8,
    },
    "training": {"epochs": 1, "batch_size": 8, "max_seq_length": 16, "max_steps": 1,
                 "device": "cpu"},
    "export": NO_EXTRAS,  # not about export
}  # fmt: skip


def _client(settings: Settings, tenant: str) -> TestClient:
    engine = create_engine(settings.database_url)
    with Session(engine) as s:
        _, key = tenants.create_key(s, tenants.ensure_tenant(s, tenant).id, "tests")
        s.commit()
    engine.dispose()
    return TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"})


def _run(client: TestClient, settings: Settings, body: dict[str, Any]) -> dict[str, Any]:
    r = client.post("/v1/jobs", json={**body, **SMALL})
    assert r.status_code == 201, r.text
    job_id = r.json()["id"]
    assert execute(job_id, settings) == "succeeded"
    final: dict[str, Any] = client.get(f"/v1/jobs/{job_id}/metrics").json()["final"]
    return final


def _tenant_of(settings: Settings, job_teacher: str) -> str:
    engine = create_engine(settings.database_url)
    with Session(engine) as s:
        tenant = s.scalars(select(Job.tenant_id).where(Job.id == job_teacher)).one()
    engine.dispose()
    return tenant


def test_a_tenants_second_job_hits_the_cache_and_another_tenant_does_not(
    settings: Settings,
) -> None:
    finetune = {"teacher": "builtin:minilm-l6", "method": {"name": "finetune"}}
    with _client(settings, "alpha") as alpha, _client(settings, "beta") as beta:
        r = alpha.post("/v1/jobs", json={**finetune, **SMALL, "student": {"num_layers": 2}})
        teacher_a = r.json()["id"]
        assert execute(teacher_a, settings) == "succeeded"
        kd = {"teacher": f"job:{teacher_a}", "student": {"num_layers": 1},
              "method": {"name": "vanilla_kd"}}  # fmt: skip
        first = _run(alpha, settings, kd)["teacher_cache"]
        first_id = alpha.get("/v1/jobs?limit=1").json()["items"][0]["id"]
        # the build is visible in the job's events (it can take minutes on a large set),
        # and an epoch's dev metrics read as numbers, not a Python dict with 16 decimals
        events = alpha.get(f"/v1/jobs/{first_id}/events").json()["events"]
        messages = [e["message"] for e in events]
        assert any(
            m.startswith("stage teacher cache: computing the teacher's logits on 16 examples")
            for m in messages
        ), messages
        epoch = next(m for m in messages if m.startswith("epoch "))
        assert "{" not in epoch and re.search(r"accuracy \d\.\d{1,4}(,|$)", epoch), epoch
        second = _run(alpha, settings, kd)["teacher_cache"]
        assert (first["status"], second["status"]) == ("built", "hit")
        assert first["build_seconds"] > 0 and second["build_seconds"] == 0.0
        assert first["key"] == second["key"]
        store = artifact_storage(settings)
        tenant_a = _tenant_of(settings, teacher_a)
        assert store.list_keys(CACHE_PREFIX) == [
            f"{CACHE_PREFIX}/{tenant_a}/{first['key']}/{CACHE_FILE}"
        ]

        # Tenant beta trains the same teacher (the same spec, seeded: the same weights on the
        # CPU), then the same KD job: the cache key is the same, but alpha's cache is not used.
        r = beta.post("/v1/jobs", json={**finetune, **SMALL, "student": {"num_layers": 2}})
        teacher_b = r.json()["id"]
        assert execute(teacher_b, settings) == "succeeded"
        other = _run(beta, settings, {**kd, "teacher": f"job:{teacher_b}"})["teacher_cache"]
        assert other["status"] == "built"
        assert other["key"] == first["key"]
        tenant_b = _tenant_of(settings, teacher_b)
        assert tenant_b != tenant_a
        assert len(store.list_keys(f"{CACHE_PREFIX}/{tenant_b}")) == 1
        # The cache is not a job artifact: the job's files do not list it.
        items = alpha.get(f"/v1/jobs/{teacher_a}/artifacts").json()["items"]
        assert CACHE_FILE not in {a["name"] for a in items}


def test_a_corrupt_stored_cache_is_rebuilt_with_a_warning(settings: Settings) -> None:
    finetune = {"teacher": "builtin:minilm-l6", "method": {"name": "finetune"}}
    with _client(settings, "gamma") as client:
        r = client.post("/v1/jobs", json={**finetune, **SMALL, "student": {"num_layers": 2}})
        teacher = r.json()["id"]
        assert execute(teacher, settings) == "succeeded"
        kd = {"teacher": f"job:{teacher}", "student": {"num_layers": 1},
              "method": {"name": "vanilla_kd"}}  # fmt: skip
        first = _run(client, settings, kd)["teacher_cache"]
        store = artifact_storage(settings)
        [key] = store.list_keys(CACHE_PREFIX)
        path = Path(store.local_path(key))
        path.write_bytes(path.read_bytes()[:100])  # truncated
        r = client.post("/v1/jobs", json={**kd, **SMALL})
        job_id = r.json()["id"]
        assert execute(job_id, settings) == "succeeded"
        final = client.get(f"/v1/jobs/{job_id}/metrics").json()["final"]
        assert final["teacher_cache"]["status"] == "rebuilt"
        assert final["teacher_cache"]["key"] == first["key"]
        events = client.get(f"/v1/jobs/{job_id}/events").json()["events"]
        assert any(
            e["type"] == "warning" and "teacher cache was corrupt" in e["message"] for e in events
        )
        # The rebuilt cache replaced the corrupt one: the next job hits it.
        assert _run(client, settings, kd)["teacher_cache"]["status"] == "hit"
