"""Job dependencies (``waiting``), on PostgreSQL and the real Redis broker: a job naming
``job:<id>`` of an unfinished job waits for it, is queued when it succeeds and fails when it
fails or is cancelled; and the progress and stored spec of finished jobs tell the truth."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, update
from sqlalchemy.orm import Session

from api.main import create_app
from core import dependencies, events, repository, tenants
from core.db import Job, make_sessionmaker, utcnow
from core.queue import make_celery
from core.settings import Settings
from kd_engine.references import builtin_model_path
from tests.checks import NO_EXTRAS
from tests.integration.test_api import FINETUNE, auth, make_key, queued_job_ids

SMALL = {
    "dataset": {
        "source": "builtin:rotten_tomatoes",
        "max_train_examples": 16,
        "max_eval_examples": 8,
    },
    "training": {"epochs": 1, "batch_size": 8, "max_seq_length": 16, "max_steps": 1,
                 "device": "cpu"},
}  # fmt: skip


@pytest.fixture
def client(settings: Settings, key_headers: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers=key_headers) as c:
        yield c


def student_of(teacher_id: str, **extra: Any) -> dict[str, Any]:
    return {
        **FINETUNE,
        **SMALL,
        "teacher": f"job:{teacher_id}",
        "student": {"num_layers": 1},
        "method": {"name": "vanilla_kd"},
        **extra,
    }


def job_events(settings: Settings, job_id: str) -> list[tuple[str, str]]:
    with Session(create_engine(settings.database_url)) as s:
        return [(e.type, e.message) for e in events.list_events(s, job_id)]


def set_status(settings: Settings, job_id: str, status: str) -> None:
    with Session(create_engine(settings.database_url)) as s:
        s.execute(update(Job).where(Job.id == job_id).values(status=status))
        s.commit()


def succeed_with_a_classifier(settings: Settings, job_id: str, num_layers: int = 6) -> None:
    """Mark ``job_id`` succeeded with a classifier's config.json as its stored model (what a
    finetune job leaves: enough for the checks run at release)."""
    config = json.loads((builtin_model_path("minilm-l6") / "config.json").read_text())
    config.update(
        {
            "architectures": ["BertForSequenceClassification"],
            "id2label": {"0": "rotten", "1": "fresh"},
            "num_hidden_layers": num_layers,
        }
    )
    store = settings.artifacts_root / job_id
    store.mkdir()
    (store / "config.json").write_text(json.dumps(config))
    set_status(settings, job_id, "succeeded")


def release(settings: Settings) -> list[str]:
    """The reconciler's pass: every waiting job."""
    with make_sessionmaker(create_engine(settings.database_url))() as s:
        return dependencies.release_waiting(s, settings, make_celery(settings))


def test_a_student_submitted_with_its_teacher_waits_then_is_queued_when_it_succeeds(
    client: TestClient, settings: Settings
) -> None:
    teacher = client.post("/v1/jobs", json={**FINETUNE, **SMALL}).json()
    r = client.post("/v1/jobs", json=student_of(teacher["id"]))
    assert r.status_code == 201, r.text
    student = r.json()
    assert student["status"] == "waiting"
    assert queued_job_ids(settings) == [teacher["id"]]  # the student was not sent
    assert job_events(settings, student["id"]) == [
        ("waiting", f"vanilla_kd job waiting for job {teacher['id']} to succeed")
    ]
    listed = client.get("/v1/jobs", params={"status": "waiting"}).json()["items"]
    assert [j["id"] for j in listed] == [student["id"]]
    assert release(settings) == []  # the teacher is still queued: nothing moves

    succeed_with_a_classifier(settings, teacher["id"])
    assert release(settings) == [student["id"]]
    assert client.get(f"/v1/jobs/{student['id']}").json()["status"] == "queued"
    assert set(queued_job_ids(settings)) == {teacher["id"], student["id"]}
    kinds = job_events(settings, student["id"])
    assert kinds[-1] == ("queued", f"dependency {teacher['id']} succeeded; job queued")
    assert release(settings) == []  # released once


def test_the_worker_releases_the_waiting_job_when_its_teacher_succeeds(
    client: TestClient, settings: Settings
) -> None:
    """A real (tiny) finetune run by the worker's execute; the student waiting for it is
    queued by the worker itself, and a student whose layers the teacher turns out not to have
    fails then, naming the field."""
    from worker.runner import execute

    teacher = client.post(
        "/v1/jobs", json={**FINETUNE, **SMALL, "student": {"num_layers": 2}, "export": NO_EXTRAS}
    ).json()
    good = client.post("/v1/jobs", json=student_of(teacher["id"], export=NO_EXTRAS)).json()
    bad = client.post(
        "/v1/jobs", json=student_of(teacher["id"], student={"layers": [0, 4]}, export=NO_EXTRAS)
    ).json()  # the teacher will have 2 layers: checked only once it exists
    assert (good["status"], bad["status"]) == ("waiting", "waiting")
    assert execute(teacher["id"], settings) == "succeeded"
    # (its spec turned the report off: the report route says so)
    no_report = client.get(f"/v1/jobs/{teacher['id']}/report")
    assert no_report.status_code == 404
    assert no_report.json()["error"]["message"] == (
        f"job {teacher['id']} has no report: export.report is false in its spec"
    )
    assert client.get(f"/v1/jobs/{good['id']}").json()["status"] == "queued"
    assert set(queued_job_ids(settings)) == {teacher["id"], good["id"]}
    failed = client.get(f"/v1/jobs/{bad['id']}").json()
    assert failed["status"] == "failed"
    assert "student.layers" in failed["error"] and "out of range" in failed["error"]
    assert job_events(settings, bad["id"])[-1][0] == "failed"
    assert execute(good["id"], settings) == "succeeded"


@pytest.mark.parametrize("outcome", ["failed", "cancelled"])
def test_a_waiting_job_fails_naming_its_dependency_when_that_does_not_succeed(
    client: TestClient, settings: Settings, outcome: str
) -> None:
    teacher = client.post("/v1/jobs", json={**FINETUNE, **SMALL}).json()
    student = client.post("/v1/jobs", json=student_of(teacher["id"])).json()
    # a job of a job that waits: it fails too (the failure cascades down the chain)
    grandchild = client.post(
        "/v1/jobs", json=student_of(student["id"], student={"num_layers": 1})
    ).json()
    assert grandchild["status"] == "waiting"
    if outcome == "cancelled":  # the API's cancel releases the jobs waiting for it
        assert client.post(f"/v1/jobs/{teacher['id']}/cancel").json()["status"] == "cancelled"
    else:  # the worker failed it; the reconciler's pass finds the waiting job
        set_status(settings, teacher["id"], "failed")
        assert release(settings) == [student["id"], grandchild["id"]]
    done = client.get(f"/v1/jobs/{student['id']}").json()
    assert done["status"] == "failed" and done["finished_at"] is not None
    assert f"dependency job:{teacher['id']} {outcome}" in done["error"]
    assert job_events(settings, student["id"])[-1] == ("failed", done["error"])
    chained = client.get(f"/v1/jobs/{grandchild['id']}").json()
    assert chained["status"] == "failed"
    assert f"dependency job:{student['id']} failed" in chained["error"]
    assert queued_job_ids(settings) == [teacher["id"]]


def test_a_teacher_whose_worker_was_lost_fails_the_jobs_waiting_for_it(
    client: TestClient, settings: Settings
) -> None:
    from worker.reconciler import reconcile_once

    teacher = client.post("/v1/jobs", json={**FINETUNE, **SMALL}).json()
    student = client.post("/v1/jobs", json=student_of(teacher["id"])).json()
    with Session(create_engine(settings.database_url)) as s:
        assert repository.claim(s, teacher["id"], "w")
        s.execute(
            update(Job)
            .where(Job.id == teacher["id"])
            .values(heartbeat_at=utcnow() - timedelta(seconds=settings.heartbeat_timeout_s + 5))
        )
        s.commit()
    report = reconcile_once(settings.model_copy(update={"max_attempts": 1}))
    assert report.failed == [teacher["id"]] and report.released == [student["id"]], report
    error = client.get(f"/v1/jobs/{student['id']}").json()["error"]
    assert f"dependency job:{teacher['id']} failed" in error


def test_a_deleted_dependency_fails_the_waiting_job(client: TestClient, settings: Settings) -> None:
    teacher = client.post("/v1/jobs", json={**FINETUNE, **SMALL}).json()
    student = client.post("/v1/jobs", json=student_of(teacher["id"])).json()
    set_status(settings, teacher["id"], "failed")
    # the API refuses to delete a job an unfinished job names; the row may still go by hand
    assert client.delete(f"/v1/jobs/{teacher['id']}").status_code == 409
    with Session(create_engine(settings.database_url)) as s:
        assert repository.delete_finished(s, teacher["id"])
        s.commit()
    assert release(settings) == [student["id"]]
    error = client.get(f"/v1/jobs/{student['id']}").json()["error"]
    assert f"dependency job:{teacher['id']} deleted" in error


def test_cancel_of_a_waiting_job_is_immediate(client: TestClient, settings: Settings) -> None:
    teacher = client.post("/v1/jobs", json={**FINETUNE, **SMALL}).json()
    student = client.post("/v1/jobs", json=student_of(teacher["id"])).json()
    r = client.post(f"/v1/jobs/{student['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    assert job_events(settings, student["id"])[-1] == ("cancelled", "cancelled while waiting")
    assert client.post(f"/v1/jobs/{student['id']}/cancel").status_code == 409
    succeed_with_a_classifier(settings, teacher["id"])
    assert release(settings) == []  # a cancelled job is not released
    assert client.get(f"/v1/jobs/{teacher['id']}").json()["status"] == "succeeded"
    assert queued_job_ids(settings) == [teacher["id"]]


@pytest.mark.parametrize("status", ["failed", "cancelled", "cancelling"])
def test_a_dependency_that_cannot_succeed_is_422_naming_the_field_and_status(
    client: TestClient, settings: Settings, status: str
) -> None:
    teacher = client.post("/v1/jobs", json={**FINETUNE, **SMALL}).json()
    set_status(settings, teacher["id"], status)
    r = client.post("/v1/jobs", json=student_of(teacher["id"]))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "teacher" and f"is {status}" in err["message"], err
    # the same for a pretrained student's model
    body = student_of(
        teacher["id"], student={"type": "pretrained", "model": f"job:{teacher['id']}"}
    )
    body["teacher"] = "builtin:minilm-l6"
    body["method"] = {"name": "finetune"}
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "student.model", r.json()
    assert queued_job_ids(settings) == [teacher["id"]]


def test_another_tenants_unfinished_job_is_422_like_a_missing_one(
    client: TestClient, settings: Settings
) -> None:
    with TestClient(create_app(settings), headers=auth(make_key(settings, "other"))) as c:
        theirs = c.post("/v1/jobs", json={**FINETUNE, **SMALL}).json()
    r = client.post("/v1/jobs", json=student_of(theirs["id"]))
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "teacher"
    assert "no such job" in r.json()["error"]["message"]


def test_waiting_jobs_count_against_the_active_jobs_quota(
    client: TestClient, settings: Settings
) -> None:
    with Session(create_engine(settings.database_url)) as s:
        tenants.ensure_tenant(s, "test").max_active_jobs = 2
        s.commit()
    teacher = client.post("/v1/jobs", json={**FINETUNE, **SMALL}).json()
    assert client.post("/v1/jobs", json=student_of(teacher["id"])).json()["status"] == "waiting"
    r = client.post("/v1/jobs", json=student_of(teacher["id"]))
    assert r.status_code == 429, r.text
    assert r.json()["error"]["details"]["current"] == 2


def test_a_submit_racing_the_teachers_success_is_queued_at_once(
    client: TestClient, settings: Settings
) -> None:
    """The release that runs right after a waiting job is stored: its dependency is found
    succeeded (here: marked so before the submit's own release, by a second submit)."""
    teacher = client.post("/v1/jobs", json={**FINETUNE, **SMALL}).json()
    first = client.post("/v1/jobs", json=student_of(teacher["id"])).json()
    succeed_with_a_classifier(settings, teacher["id"])
    # the first stays waiting until a release runs (the worker's, the reconciler's) ...
    assert client.get(f"/v1/jobs/{first['id']}").json()["status"] == "waiting"
    # ... a new job of the succeeded teacher is simply queued
    second = client.post("/v1/jobs", json=student_of(teacher["id"])).json()
    assert second["status"] == "queued"
    assert release(settings) == [first["id"]]


# -- truthful progress and spec ------------------------------------------------------------


def test_a_failed_or_cancelled_job_keeps_its_last_progress(
    client: TestClient, settings: Settings
) -> None:
    from worker.runner import _finish, sessions_for

    progress = {"stage": "finetune", "epoch": 0, "step": 7, "total_steps": 20, "losses": {}}
    sm = sessions_for(settings.database_url)
    for status in ("failed", "cancelled"):
        job = client.post("/v1/jobs", json={**FINETUNE, **SMALL}).json()
        with sm() as s:
            assert repository.claim(s, job["id"], "w")
            repository.heartbeat(s, job["id"], progress)
            s.commit()
        _finish(sm, job["id"], status, "stopped", error="x" if status == "failed" else None)
        done = client.get(f"/v1/jobs/{job['id']}").json()
        assert done["status"] == status
        got = done["progress"]
        assert (got["stage"], got["step"], got["total_steps"]) == ("finetune", 7, 20), got
    # a job failed as lost keeps it too
    job = client.post("/v1/jobs", json={**FINETUNE, **SMALL}).json()
    with sm() as s:
        assert repository.claim(s, job["id"], "w")
        repository.heartbeat(s, job["id"], progress)
        s.commit()
        s.execute(
            update(Job)
            .where(Job.id == job["id"])
            .values(heartbeat_at=utcnow() - timedelta(seconds=settings.heartbeat_timeout_s + 5))
        )
        s.commit()
    from worker.reconciler import reconcile_once

    assert reconcile_once(settings.model_copy(update={"max_attempts": 1})).failed == [job["id"]]
    done = client.get(f"/v1/jobs/{job['id']}").json()
    assert done["status"] == "failed" and done["progress"]["step"] == 7


@pytest.mark.parametrize(
    ("dataset", "field"),
    [
        ({"source": "file://d.csv", "test_source": "file://t.csv", "test_fraction": 0.2},
         "dataset.test_fraction"),
        ({"source": "file://d.csv", "dev_source": "file://v.csv", "dev_fraction": 0.1},
         "dataset.dev_fraction"),
        ({"source": "builtin:rotten_tomatoes", "test_fraction": 0.2}, "dataset.test_fraction"),
        ({"source": "builtin:rotten_tomatoes", "label_column": "y"}, "dataset.label_column"),
    ],
)  # fmt: skip
def test_a_setting_the_job_would_ignore_is_422_naming_it(
    client: TestClient, settings: Settings, dataset: dict[str, Any], field: str
) -> None:
    r = client.post("/v1/jobs", json={**FINETUNE, "dataset": dataset})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == field, err
    assert "ignored" in err["message"]
    assert queued_job_ids(settings) == []


def test_the_stored_spec_leaves_out_the_defaults_the_job_ignores(
    client: TestClient, settings: Settings
) -> None:
    rows = "text,label\n" + "".join(f"row number {i},{'ab'[i % 2]}\n" for i in range(40))
    for name in ("d.csv", "t.csv"):
        (settings.data_root / name).write_text(rows)
    builtin = client.post("/v1/jobs", json=FINETUNE).json()["spec"]["dataset"]
    for gone in ("dev_fraction", "test_fraction", "text_column", "label_column"):
        assert gone not in builtin, builtin
    assert builtin["split_seed"] == 0  # still seeds the subsets
    r = client.post(
        "/v1/jobs",
        json={**FINETUNE, "dataset": {"source": "file://d.csv", "test_source": "file://t.csv"}},
    )
    assert r.status_code == 201, r.text
    stored = r.json()["spec"]["dataset"]
    assert "test_fraction" not in stored and stored["dev_fraction"] == 0.1
    assert stored["text_column"] == "text"
    split = client.post("/v1/jobs", json={**FINETUNE, "dataset": {"source": "file://d.csv"}})
    assert split.json()["spec"]["dataset"]["test_fraction"] == 0.1
