"""API tests on a migrated PostgreSQL with a real Redis broker (the queue is inspected)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from api.main import create_app
from core import repository, tenants
from core.db import Job
from core.settings import Settings
from kd_engine import registry
from kd_engine.report_html import format_number
from tests.checks import NO_EXTRAS

FINETUNE = {
    "teacher": "builtin:minilm-l6",
    "method": {"name": "finetune"},
    "dataset": {"source": "builtin:rotten_tomatoes"},
}


@pytest.fixture
def api_key(settings: Settings) -> str:
    """A key of a fresh tenant ``test`` (made like ``python -m core.admin create-key``)."""
    return make_key(settings, "test")


def make_key(settings: Settings, tenant: str) -> str:
    """A new key of ``tenant`` (the tenant is created if missing)."""
    engine = create_engine(settings.database_url)
    with Session(engine) as s:
        _, key = tenants.create_key(s, tenants.ensure_tenant(s, tenant).id, "tests")
        s.commit()
    engine.dispose()
    return key


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def client(settings: Settings, api_key: str) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers=auth(api_key)) as c:
        yield c


def queued_job_ids(settings: Settings) -> list[str]:
    """Task ids of the messages waiting in the ``cpu`` queue (Celery's Redis list)."""
    r = redis.Redis.from_url(settings.broker_url)
    return [json.loads(m)["headers"]["id"] for m in r.lrange(settings.queue, 0, -1)]


def count_jobs(settings: Settings) -> int:
    with Session(create_engine(settings.database_url)) as s:
        return int(s.scalar(select(func.count()).select_from(Job)) or 0)


def test_submit_persists_and_enqueues_the_job_id(client: TestClient, settings: Settings) -> None:
    r = client.post("/v1/jobs", json=FINETUNE)
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["status"] == "queued"
    assert job["method"] == "finetune"
    assert job["spec"]["training"]["epochs"] == 3  # defaults are filled in and stored
    assert queued_job_ids(settings) == [job["id"]]
    assert client.get(f"/v1/jobs/{job['id']}").json()["id"] == job["id"]


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"method": {"name": "vanilla_kd", "alpha": 1.5}}, "method.alpha"),
        ({"method": {"name": "no_such_method"}}, "method"),
        ({"training": {"learning_rate": -1}}, "training.learning_rate"),
        (
            {
                "student": {
                    "type": "fresh",
                    "num_layers": 2,
                    "hidden_size": 100,
                    "num_heads": 3,
                    "intermediate_size": 64,
                }
            },
            "student",
        ),
        ({"dataset": {"source": "builtin:imdb"}}, "dataset.source"),
        ({"dataset": {"source": "file:///etc/passwd"}}, "dataset.source"),
        ({"teacher": "file://../../etc"}, "teacher"),
        ({"teacher": "http://example.com/model"}, "teacher"),
        ({"teacher": "job:00000000-0000-0000-0000-000000000000"}, "teacher"),
        ({"student": {"layers": [0, 6]}}, "student.layers"),
        ({"unexpected": 1}, "unexpected"),
        ({"export": {"onnx": False, "int8": True}}, "export.int8"),
        ({"export": {"onnx": "sometimes"}}, "export.onnx"),
        ({"export": {"opset": 18}}, "export.opset"),
    ],
)
def test_bad_spec_is_422_naming_the_field_and_nothing_is_stored_or_queued(
    client: TestClient, settings: Settings, patch: dict[str, object], field: str
) -> None:
    r = client.post("/v1/jobs", json={**FINETUNE, **patch})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == field, err
    assert err["message"]
    assert count_jobs(settings) == 0
    assert queued_job_ids(settings) == []


def test_kd_from_a_base_encoder_is_rejected_with_the_fix(client: TestClient) -> None:
    r = client.post("/v1/jobs", json={**FINETUNE, "method": {"name": "vanilla_kd"}})
    assert r.status_code == 422
    assert "run a finetune job" in r.json()["error"]["message"]


def test_kd_from_an_unfinished_job_waits_for_it(client: TestClient) -> None:
    teacher = client.post("/v1/jobs", json=FINETUNE).json()
    r = client.post(
        "/v1/jobs",
        json={**FINETUNE, "teacher": f"job:{teacher['id']}", "method": {"name": "vanilla_kd"}},
    )
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "waiting"  # tests/integration/test_dependencies.py: the rest


def test_unknown_job_is_404_json(client: TestClient) -> None:
    for path in ("/v1/jobs/nope", "/v1/jobs/nope/metrics", "/v1/jobs/nope/artifacts"):
        r = client.get(path)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "not_found"
    assert client.post("/v1/jobs/nope/cancel").status_code == 404


def test_cancel_queued_is_immediate_and_finished_is_409(
    client: TestClient, settings: Settings
) -> None:
    job = client.post("/v1/jobs", json=FINETUNE).json()
    r = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert r.status_code == 200
    assert r.json()["status"] == "cancelled"
    assert r.json()["finished_at"] is not None
    # a cancelled job cannot be claimed by a worker that receives it later
    with Session(create_engine(settings.database_url)) as s:
        assert repository.claim(s, job["id"], "w") is False
    # a second cancel is a 409 like that of any finished job; the job stays cancelled
    again = client.post(f"/v1/jobs/{job['id']}/cancel")
    assert again.status_code == 409
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled"
    other = client.post("/v1/jobs", json=FINETUNE).json()
    with Session(create_engine(settings.database_url)) as s:
        assert repository.claim(s, other["id"], "w")
        assert repository.transition(s, other["id"], ("running",), "succeeded")
        s.commit()
    r = client.post(f"/v1/jobs/{other['id']}/cancel")
    assert r.status_code == 409
    assert r.json()["error"]["code"] == "conflict"


def test_cancel_running_goes_to_cancelling(client: TestClient, settings: Settings) -> None:
    job = client.post("/v1/jobs", json=FINETUNE).json()
    with Session(create_engine(settings.database_url)) as s:
        assert repository.claim(s, job["id"], "w")
        s.commit()
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "cancelling"


def test_claim_is_conditional_so_a_second_delivery_runs_nothing(
    client: TestClient, settings: Settings
) -> None:
    job = client.post("/v1/jobs", json=FINETUNE).json()
    engine = create_engine(settings.database_url)
    with Session(engine) as s:
        assert repository.claim(s, job["id"], "w1") is True
        s.commit()
    with Session(engine) as s:
        assert repository.claim(s, job["id"], "w2") is False
        s.commit()
    got = client.get(f"/v1/jobs/{job['id']}").json()
    assert got["status"] == "running"
    assert got["attempt"] == 1


def test_list_is_newest_first_with_cursor_pagination(client: TestClient) -> None:
    ids = [client.post("/v1/jobs", json=FINETUNE).json()["id"] for _ in range(5)]
    page1 = client.get("/v1/jobs", params={"limit": 2}).json()
    page2 = client.get("/v1/jobs", params={"limit": 2, "cursor": page1["next_cursor"]}).json()
    page3 = client.get("/v1/jobs", params={"limit": 2, "cursor": page2["next_cursor"]}).json()
    seen = [j["id"] for p in (page1, page2, page3) for j in p["items"]]
    assert seen == list(reversed(ids))
    assert page3["next_cursor"] is None
    client.post(f"/v1/jobs/{ids[0]}/cancel")
    cancelled = client.get("/v1/jobs", params={"status": "cancelled"}).json()["items"]
    assert [j["id"] for j in cancelled] == [ids[0]]
    bad = client.get("/v1/jobs", params={"cursor": "garbage!"})
    assert bad.status_code == 422
    assert bad.json()["error"]["field"] == "cursor"


def test_metrics_and_artifacts_of_a_queued_job_are_empty(client: TestClient) -> None:
    job = client.post("/v1/jobs", json=FINETUNE).json()
    m = client.get(f"/v1/jobs/{job['id']}/metrics").json()
    assert m == {"job_id": job["id"], "status": "queued", "epochs": [], "final": None}
    a = client.get(f"/v1/jobs/{job['id']}/artifacts").json()
    assert a["items"] == []
    r = client.get(f"/v1/jobs/{job['id']}/archive")
    assert r.status_code == 409
    r = client.get(f"/v1/jobs/{job['id']}/artifacts/..%2F..%2Fetc%2Fpasswd")
    assert r.status_code == 404


def test_healthz_reports_database_and_broker(client: TestClient) -> None:
    r = client.get("/healthz")
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "database": "ok", "broker": "ok"}


def test_healthz_is_503_when_the_broker_is_down(settings: Settings) -> None:
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down)) as c:
        r = c.get("/healthz")
    assert r.status_code == 503
    assert r.json()["broker"].startswith("error")
    assert r.json()["database"] == "ok"


def test_submit_with_broker_down_is_503_and_the_job_says_why(
    settings: Settings, api_key: str
) -> None:
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down), headers=auth(api_key)) as c:
        r = c.post("/v1/jobs", json=FINETUNE)
        assert r.status_code == 503
        assert r.json()["error"]["code"] == "unavailable"
        jobs = c.get("/v1/jobs").json()["items"]
    assert len(jobs) == 1
    assert jobs[0]["status"] == "failed"
    assert "broker unavailable" in jobs[0]["error"]


def test_file_dataset_under_the_data_root_is_accepted(
    client: TestClient, settings: Settings
) -> None:
    rows = "".join(f"review {i},{'pos' if i % 2 else 'neg'}\n" for i in range(20))
    (settings.data_root / "reviews.csv").write_text("text,label\n" + rows)
    r = client.post("/v1/jobs", json={**FINETUNE, "dataset": {"source": "file://reviews.csv"}})
    assert r.status_code == 201, r.text
    r = client.post("/v1/jobs", json={**FINETUNE, "dataset": {"source": "file://missing.csv"}})
    assert r.status_code == 422
    assert "does not exist" in r.json()["error"]["message"]


def test_a_running_job_without_heartbeat_is_requeued_by_the_reconciler_not_by_a_read(
    client: TestClient, settings: Settings
) -> None:
    from datetime import timedelta

    from core.db import utcnow

    job = client.post("/v1/jobs", json=FINETUNE).json()
    fresh = client.post("/v1/jobs", json=FINETUNE).json()
    engine = create_engine(settings.database_url)
    with Session(engine) as s:
        assert repository.claim(s, job["id"], "w1")
        assert repository.claim(s, fresh["id"], "w2")
        old = utcnow() - timedelta(seconds=settings.heartbeat_timeout_s + 5)
        s.execute(Job.__table__.update().where(Job.id == job["id"]).values(heartbeat_at=old))
        s.commit()
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "running"  # reads only
    from worker.reconciler import reconcile_once

    report = reconcile_once(settings)
    assert report.retried == [job["id"]]
    lost = client.get(f"/v1/jobs/{job['id']}").json()
    assert (lost["status"], lost["attempt"], lost["error"]) == ("queued", 1, None)
    assert client.get(f"/v1/jobs/{fresh['id']}").json()["status"] == "running"


def test_pretrained_student_is_checked_against_the_teacher_vocabulary(
    client: TestClient, settings: Settings
) -> None:
    ok = client.post(
        "/v1/jobs",
        json={**FINETUNE, "student": {"type": "pretrained", "model": "builtin:minilm-l3"}},
    )
    assert ok.status_code == 201, ok.text
    other = settings.models_root / "other-vocab"
    other.mkdir()
    (other / "config.json").write_text(
        json.dumps(
            {
                "model_type": "bert",
                "vocab_size": 100,
                "num_hidden_layers": 2,
                "hidden_size": 64,
                "num_attention_heads": 2,
            }
        )
    )
    bad = client.post(
        "/v1/jobs",
        json={**FINETUNE, "student": {"type": "pretrained", "model": "file://other-vocab"}},
    )
    assert bad.status_code == 422
    assert bad.json()["error"]["field"] == "student.model"
    assert "vocabulary" in bad.json()["error"]["message"]
    missing = client.post(
        "/v1/jobs", json={**FINETUNE, "student": {"type": "pretrained", "model": "builtin:nope"}}
    )
    assert missing.status_code == 422
    assert missing.json()["error"]["field"] == "student.model"


@pytest.fixture
def classifier_teacher(settings: Settings) -> str:
    """A 6-layer classifier checkpoint's config under the models root (enough to validate)."""
    from kd_engine.references import builtin_model_path

    config = json.loads((builtin_model_path("minilm-l6") / "config.json").read_text())
    config.update(
        {
            "architectures": ["BertForSequenceClassification"],
            "id2label": {"0": "rotten", "1": "fresh"},
        }
    )
    target = settings.models_root / "teacher"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(config))
    return "file://teacher"


def test_an_impossible_layer_mapping_is_422_before_queueing(
    client: TestClient, settings: Settings, classifier_teacher: str
) -> None:
    body = {**FINETUNE, "teacher": classifier_teacher, "student": {"num_layers": 2}}
    r = client.post("/v1/jobs", json={**body, "method": {"name": "pkd", "layer_mapping": [9]}})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"].startswith("method.layer_mapping"), err
    assert "9" in err["message"]
    assert queued_job_ids(settings) == []
    ok = client.post("/v1/jobs", json={**body, "method": {"name": "pkd", "layer_mapping": [3]}})
    assert ok.status_code == 201, ok.text


@pytest.mark.parametrize(
    ("student", "field", "words"),
    [
        ({"layers": [0, 6]}, "student.layers", ["index 6", "6 layers"]),
        ({"num_layers": 7}, "student.num_layers", ["7", "6 layers"]),
        ({"model": "builtin:minilm-l3", "layers": [1, 3]}, "student.layers", ["index 3"]),
        ({"model": "builtin:minilm-l3", "num_layers": 4}, "student.num_layers", ["3 layers"]),
    ],
)
def test_pretrained_student_layers_out_of_range_are_422_naming_the_field(
    client: TestClient,
    settings: Settings,
    classifier_teacher: str,
    student: dict[str, object],
    field: str,
    words: list[str],
) -> None:
    body = {**FINETUNE, "teacher": classifier_teacher, "method": {"name": "pkd"}}
    pretrained = {"type": "pretrained", "model": "builtin:minilm-l6", **student}
    r = client.post("/v1/jobs", json={**body, "student": pretrained})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == field, err
    assert all(w in err["message"] for w in words), err
    assert "pretrained model" in err["message"], err
    assert count_jobs(settings) == 0
    assert queued_job_ids(settings) == []


def test_pretrained_student_cut_to_its_first_layers_is_accepted(
    client: TestClient, settings: Settings, classifier_teacher: str
) -> None:
    body = {**FINETUNE, "teacher": classifier_teacher, "method": {"name": "pkd"}}
    ids = []
    for choice in ({"num_layers": 2}, {"layers": [0, 1]}, {"layers": [2, 5], "num_layers": 2}):
        student = {"type": "pretrained", "model": "builtin:minilm-l6", **choice}
        r = client.post("/v1/jobs", json={**body, "student": student})
        assert r.status_code == 201, r.text
        stored = r.json()["spec"]["student"]
        assert stored["model"] == "builtin:minilm-l6"
        assert (stored["num_layers"], stored["layers"]) == (
            choice.get("num_layers"),
            choice.get("layers"),
        )
        ids.append(r.json()["id"])
    assert sorted(queued_job_ids(settings)) == sorted(ids)
    # The cut shape reaches the method's check: PKD needs 2 student layers without a mapping.
    one = {"type": "pretrained", "model": "builtin:minilm-l6", "num_layers": 1}
    r = client.post("/v1/jobs", json={**body, "student": one})
    assert r.status_code == 422, r.text


@pytest.mark.parametrize("method", registry.names())
def test_every_method_validates_with_its_defaults(
    client: TestClient, classifier_teacher: str, method: str
) -> None:
    body = {
        **FINETUNE,
        "teacher": classifier_teacher,
        # born_again trains generations of the teacher's architecture: every layer kept.
        "student": {} if method == "born_again" else {"num_layers": 2},
        "method": {"name": method},
    }
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 201, r.text


def write_config(settings: Settings, name: str, **changes: object) -> str:
    """The minilm-l6 config.json with ``changes`` under the models root as ``file://name``."""
    from kd_engine.references import builtin_model_path

    config = json.loads((builtin_model_path("minilm-l6") / "config.json").read_text())
    config.update(changes)
    target = settings.models_root / name
    target.mkdir()
    (target / "config.json").write_text(json.dumps(config))
    return f"file://{name}"


def mate_kd_body(teacher: str, **method: object) -> dict[str, object]:
    return {
        **FINETUNE,
        "teacher": teacher,
        "student": {"num_layers": 2},
        "method": {"name": "mate_kd", **method},
    }


def test_mate_kd_is_accepted_with_defaults_and_a_masked_lm_generator(
    client: TestClient, settings: Settings, classifier_teacher: str
) -> None:
    r = client.post("/v1/jobs", json=mate_kd_body(classifier_teacher))
    assert r.status_code == 201, r.text
    stored = r.json()["spec"]["method"]
    assert stored["generator"] is None and stored["generator_layers"] is None
    mlm = write_config(settings, "mlm", architectures=["BertForMaskedLM"])
    r = client.post("/v1/jobs", json=mate_kd_body(classifier_teacher, generator=mlm))
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["method"]["generator"] == "file://mlm"
    r = client.post("/v1/jobs", json=mate_kd_body(classifier_teacher, generator_layers=6))
    assert r.status_code == 201, r.text
    assert len(queued_job_ids(settings)) == 3


@pytest.mark.parametrize(
    ("generator", "words"),
    [
        ("http://example.com/mlm", ["must start with"]),
        ("builtin:nope", ["unknown built-in model"]),
        ("file://../../etc", ["outside"]),
        ("file://missing", ["does not exist"]),
        ("hf://bert-base-uncased", ["hub references are disabled"]),
        ("job:00000000-0000-0000-0000-000000000000", ["no such job"]),
        # a base encoder (BertModel) has no masked-LM head to sample from
        ("builtin:minilm-l6", ["not a masked-LM checkpoint", "BertModel"]),
        ("file://classifier", ["not a masked-LM checkpoint", "BertForSequenceClassification"]),
        ("file://other-vocab", ["vocabulary (100 tokens)", "(30522)"]),
    ],
)
def test_a_bad_generator_is_422_naming_method_generator(
    client: TestClient,
    settings: Settings,
    classifier_teacher: str,
    generator: str,
    words: list[str],
) -> None:
    write_config(settings, "classifier", architectures=["BertForSequenceClassification"])
    write_config(settings, "other-vocab", architectures=["BertForMaskedLM"], vocab_size=100)
    r = client.post("/v1/jobs", json=mate_kd_body(classifier_teacher, generator=generator))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "method.generator", err
    assert all(w in err["message"] for w in words), err
    assert count_jobs(settings) == 0
    assert queued_job_ids(settings) == []


@pytest.mark.parametrize(
    ("method", "words"),
    [
        ({"generator_layers": 7}, ["6 layers", "7"]),
        ({"generator_layers": 2, "generator": "file://mlm"}, ["remove it or method.generator"]),
    ],
)
def test_bad_generator_layers_are_422_naming_the_field(
    client: TestClient,
    settings: Settings,
    classifier_teacher: str,
    method: dict[str, object],
    words: list[str],
) -> None:
    write_config(settings, "mlm", architectures=["BertForMaskedLM"])
    r = client.post("/v1/jobs", json=mate_kd_body(classifier_teacher, **method))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "method.generator_layers", err
    assert all(w in err["message"] for w in words), err
    assert queued_job_ids(settings) == []


def test_a_generator_from_a_job_needs_a_succeeded_job_with_a_masked_lm(
    client: TestClient, settings: Settings, classifier_teacher: str
) -> None:
    queued = client.post("/v1/jobs", json=FINETUNE).json()
    failed = client.post("/v1/jobs", json=FINETUNE).json()
    done = client.post("/v1/jobs", json=FINETUNE).json()
    with Session(create_engine(settings.database_url)) as s:
        assert repository.claim(s, failed["id"], "w")
        assert repository.transition(s, failed["id"], ("running",), "failed")
        assert repository.claim(s, done["id"], "w")
        assert repository.transition(s, done["id"], ("running",), "succeeded")
        s.commit()
    r = client.post(
        "/v1/jobs", json=mate_kd_body(classifier_teacher, generator=f"job:{failed['id']}")
    )
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "method.generator", err
    assert "is failed" in err["message"], err
    # a queued generator job: this one waits for it (its checks run when it succeeds)
    r = client.post(
        "/v1/jobs", json=mate_kd_body(classifier_teacher, generator=f"job:{queued['id']}")
    )
    assert r.status_code == 201, r.text
    assert r.json()["status"] == "waiting"
    # A succeeded job's model is its student: a sequence classifier, not a masked LM.
    store = settings.artifacts_root / done["id"]
    store.mkdir()
    (store / "config.json").write_text(
        json.dumps({"architectures": ["BertForSequenceClassification"], "vocab_size": 30522})
    )
    r = client.post(
        "/v1/jobs", json=mate_kd_body(classifier_teacher, generator=f"job:{done['id']}")
    )
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "method.generator"
    assert "not a masked-LM checkpoint" in r.json()["error"]["message"]
    assert count_jobs(settings) == 4


def test_progress_shows_the_adversarial_phase(client: TestClient, settings: Settings) -> None:
    job = client.post("/v1/jobs", json=FINETUNE).json()
    report = {"stage": "mate_kd", "step": 3, "losses": {"generator_kl": 0.25}}
    with Session(create_engine(settings.database_url)) as s:
        assert repository.claim(s, job["id"], "w")
        repository.heartbeat(s, job["id"], {**report, "phase": "generator"})
        s.commit()
    progress = client.get(f"/v1/jobs/{job['id']}").json()["progress"]
    assert progress["phase"] == "generator"
    assert progress["losses"] == {"generator_kl": 0.25}
    with Session(create_engine(settings.database_url)) as s:
        repository.heartbeat(s, job["id"], report)  # a report from before the field existed
        s.commit()
    assert client.get(f"/v1/jobs/{job['id']}").json()["progress"]["phase"] == ""


def test_tinybert_stage_lengths_are_settings_checked_at_the_api(
    client: TestClient, classifier_teacher: str, settings: Settings
) -> None:
    body = {
        **FINETUNE,
        "teacher": classifier_teacher,
        "student": {"num_layers": 2},
        "method": {"name": "tinybert", "intermediate_epochs": 2, "prediction_epochs": 0},
        "training": {"epochs": 2},
    }
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "method.prediction_epochs"
    assert queued_job_ids(settings) == []
    # Stage lengths do not depend on training.epochs: a job that sets it is refused, naming
    # the method settings to use (the recipe would silently replace it).
    ok = {**body, "method": {**body["method"], "prediction_epochs": 1}, "training": {"epochs": 1}}
    r = client.post("/v1/jobs", json=ok)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "training.epochs"
    assert "set method.intermediate_epochs and method.prediction_epochs instead" in err["message"]
    r = client.post("/v1/jobs", json={**ok, "training": {}})
    assert r.status_code == 201, r.text
    epochs = [s["epochs"]["value"] for s in r.json()["plan"]["stages"]]
    assert epochs == [2, 1]


@pytest.mark.parametrize("method", ["pkd", "tinybert", "ckd", "alp_kd", "rail_kd", "crd"])
@pytest.mark.parametrize("student", [{"type": "bilstm"}, {"type": "cnn"}])
def test_token_aligned_methods_reject_non_transformer_students(
    client: TestClient, classifier_teacher: str, method: str, student: dict[str, str]
) -> None:
    body = {
        **FINETUNE,
        "teacher": classifier_teacher,
        "student": student,
        "method": {"name": method},
    }
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "student"
    assert "not a transformer" in r.json()["error"]["message"]


@pytest.mark.parametrize("method", ["vanilla_kd", "universal_kd"])
def test_output_level_methods_accept_a_bilstm_student(
    client: TestClient, classifier_teacher: str, method: str
) -> None:
    body = {
        **FINETUNE,
        "teacher": classifier_teacher,
        "student": {"type": "bilstm"},
        "method": {"name": method},
    }
    assert client.post("/v1/jobs", json=body).status_code == 201


def test_a_bilstm_checkpoint_cannot_be_a_teacher(client: TestClient, settings: Settings) -> None:
    target = settings.models_root / "lstm"
    target.mkdir()
    (target / "config.json").write_text(
        json.dumps(
            {
                "model_type": "distillery-bilstm",
                "architectures": ["BiLSTMForSequenceClassification"],
                "id2label": {"0": "rotten", "1": "fresh"},
            }
        )
    )
    r = client.post(
        "/v1/jobs", json={**FINETUNE, "teacher": "file://lstm", "method": {"name": "vanilla_kd"}}
    )
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "teacher"


RT = "builtin:rotten_tomatoes"


@pytest.mark.parametrize(
    ("dataset", "field", "message"),
    [
        (
            {"source": RT, "eval_sets": [{"name": "a", "source": "file:///etc/passwd"}]},
            "dataset.eval_sets.0.source",
            "",
        ),
        (
            {
                "source": RT,
                "eval_sets": [
                    {"name": "a", "source": "builtin:vader_amazon"},
                    {"name": "b", "source": "builtin:imdb"},
                ],
            },
            "dataset.eval_sets.1.source",
            "unknown built-in",
        ),
        (
            {"source": RT, "eval_sets": [{"name": "a", "source": RT}]},
            "dataset.eval_sets.0.source",
            "own dataset",
        ),
        (
            {"source": RT, "eval_sets": [{"name": "a", "source": "file://missing.csv"}]},
            "dataset.eval_sets.0.source",
            "does not exist",
        ),
        ({"source": "builtin:vader_tweets"}, "dataset.source", "evaluation only"),
        ({"source": RT, "task": "regression"}, "dataset.task", "classification dataset"),
        ({"source": "builtin:vader_movies", "task": "classification"}, "dataset.task", ""),
        (
            {
                "source": RT,
                "eval_sets": [{"name": "a", "source": "x"}, {"name": "a", "source": "y"}],
            },
            "dataset.eval_sets",
            "twice",
        ),
        ({"source": RT, "task": "ordinal"}, "dataset.task", ""),
    ],
)
def test_bad_task_or_eval_set_is_422_naming_the_field(
    client: TestClient, settings: Settings, dataset: dict[str, object], field: str, message: str
) -> None:
    r = client.post("/v1/jobs", json={**FINETUNE, "dataset": dataset})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == field, err
    assert message in err["message"], err
    assert count_jobs(settings) == 0


def test_regression_job_with_eval_sets_is_accepted(client: TestClient, settings: Settings) -> None:
    (settings.data_root / "ood.csv").write_text("text,label\ngood,1.5\nbad,-2.25\n")
    dataset = {
        "source": "builtin:vader_movies",
        "eval_sets": [
            {"name": "tweets", "source": "builtin:vader_tweets"},
            {"name": "mine", "source": "file://ood.csv"},
        ],
    }
    r = client.post("/v1/jobs", json={**FINETUNE, "dataset": dataset})
    assert r.status_code == 201, r.text
    assert r.json()["spec"]["dataset"]["task"] == "auto"
    assert r.json()["spec"]["dataset"]["eval_sets"][1]["label_column"] is None


def test_eval_sets_are_checked_against_a_classifier_teachers_labels(
    client: TestClient, settings: Settings
) -> None:
    """A classifier teacher (a finetuned MiniLM config saved under the models root): built-in
    eval sets must carry its labels, and its task must match dataset.task."""
    teacher = settings.models_root / "rt"
    teacher.mkdir()
    config = {
        "model_type": "bert",
        "architectures": ["BertForSequenceClassification"],
        "num_hidden_layers": 6,
        "hidden_size": 384,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "vocab_size": 30522,
        "id2label": {"0": "rotten", "1": "fresh"},
    }
    (teacher / "config.json").write_text(json.dumps(config))
    body = {**FINETUNE, "teacher": "file://rt", "method": {"name": "vanilla_kd"}}
    ok = {"source": RT, "eval_sets": [{"name": "amazon", "source": "builtin:vader_amazon"}]}
    assert client.post("/v1/jobs", json={**body, "dataset": ok}).status_code == 201
    spam = {"source": RT, "eval_sets": [{"name": "spam", "source": "builtin:sms_spam"}]}
    r = client.post("/v1/jobs", json={**body, "dataset": spam})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "dataset.eval_sets.0.source"
    r = client.post("/v1/jobs", json={**body, "dataset": {"source": RT, "task": "regression"}})
    assert r.status_code == 422
    assert r.json()["error"]["field"] == "dataset.task"
    assert "classification model" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("method", "student", "field", "words"),
    [
        ({"assistants": [{"num_layers": 6}]}, 2, "method.assistants.0.num_layers", "fewer"),
        ({"assistants": [{"num_layers": 9}]}, 2, "method.assistants.0.num_layers", "more than"),
        ({"assistants": [{"layers": [0, 9]}]}, 2, "method.assistants.0.layers", "out of range"),
        (
            {"assistants": [{"num_layers": 3}, {"num_layers": 4}]},
            2,
            "method.assistants.1.num_layers",
            "fewer than the assistant 1",
        ),
        ({"assistants": [{"num_layers": 2}]}, 2, "student.num_layers", "fewer than"),
        ({}, 5, "method.assistants", "no assistant fits"),
        ({"assistants": [{"type": "bilstm"}]}, 2, "method", ""),
        ({"assistants": []}, 2, "method", ""),
    ],
    ids=[
        "as-deep-as-teacher",
        "deeper-than-teacher",
        "layer-index",
        "not-decreasing",
        "student-not-smaller",
        "no-room-for-default",
        "bilstm-assistant",
        "empty",
    ],
)
def test_bad_takd_assistants_are_422_naming_the_field(
    client: TestClient,
    settings: Settings,
    classifier_teacher: str,
    method: dict[str, object],
    student: int,
    field: str,
    words: str,
) -> None:
    body = {
        **FINETUNE,
        "teacher": classifier_teacher,
        "student": {"num_layers": student},
        "method": {"name": "takd", **method},
    }
    r = client.post("/v1/jobs", json=body)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"].startswith(field), err
    assert words in err["message"], err
    assert count_jobs(settings) == 0 and queued_job_ids(settings) == []


def test_born_again_needs_a_student_of_the_teachers_shape(
    client: TestClient, classifier_teacher: str
) -> None:
    body = {**FINETUNE, "teacher": classifier_teacher, "method": {"name": "born_again"}}
    r = client.post("/v1/jobs", json={**body, "student": {"num_layers": 3}})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "student"
    assert "teacher's shape" in r.json()["error"]["message"]
    named = client.post("/v1/jobs", json={**body, "student": {"layers": list(range(6))}})
    assert named.is_success and named.json()["spec"]["method"]["init"] == "student"
    # No student: each generation is the teacher's architecture drawn at random (issue 23),
    # and the stored spec says so.
    default = client.post("/v1/jobs", json=body)
    assert default.status_code == 201, default.text
    assert default.json()["spec"]["method"]["init"] == "random"
    both = {**body, "student": {}, "method": {"name": "born_again", "init": "random"}}
    r = client.post("/v1/jobs", json=both)
    assert r.status_code == 422 and r.json()["error"]["field"] == "student", r.text


def test_takd_assistant_is_downloadable_through_the_api(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    """A real (tiny) finetune then takd job, run by the worker's execute: the assistant is one
    artifact file, listed with its sha256, downloadable, and it unpacks to a model directory;
    the job's report downloads from its own route."""
    import hashlib
    import io
    import re
    import tarfile

    from worker.runner import execute

    small = {
        "dataset": {
            "source": "builtin:rotten_tomatoes",
            "max_train_examples": 16,
            "max_eval_examples": 8,
        },
        "training": {"epochs": 1, "batch_size": 8, "max_seq_length": 16, "max_steps": 1,
                     "device": "cpu"},
    }  # fmt: skip
    teacher = client.post(
        "/v1/jobs", json={**FINETUNE, **small, "student": {"num_layers": 3}, "export": NO_EXTRAS}
    ).json()
    early = client.get(f"/v1/jobs/{teacher['id']}/report")  # queued: no report yet
    assert early.status_code == 404 and early.headers["content-type"] == "application/json"
    assert "is queued; its report is written when it succeeds" in early.json()["error"]["message"]
    assert execute(teacher["id"], settings) == "succeeded"
    body = {
        **FINETUNE,
        **small,
        "teacher": f"job:{teacher['id']}",
        "student": {"num_layers": 1},
        "method": {"name": "takd", "assistants": [{"num_layers": 2}]},
    }
    job = client.post("/v1/jobs", json=body)
    assert job.status_code == 201, job.text
    job_id = job.json()["id"]
    assert execute(job_id, settings) == "succeeded"

    done = client.get(f"/v1/jobs/{job_id}").json()["progress"]
    assert (done["stage"], done["hop"], done["num_hops"]) == ("done", 2, 2)
    assert done["step"] == 2  # one step per hop
    final = client.get(f"/v1/jobs/{job_id}/metrics").json()["final"]
    assert [h["name"] for h in final["hops"]] == ["assistant_1", "student"]
    assert final["hops"][0]["artifact"] == "assistant_1.tar.gz"
    items = {a["name"]: a for a in client.get(f"/v1/jobs/{job_id}/artifacts").json()["items"]}
    assert {"assistant_1.tar.gz", "model.safetensors", "metrics.json"} <= items.keys()
    r = client.get(f"/v1/jobs/{job_id}/artifacts/assistant_1.tar.gz")
    assert r.status_code == 200
    assert hashlib.sha256(r.content).hexdigest() == items["assistant_1.tar.gz"]["sha256"]
    assert len(r.content) == items["assistant_1.tar.gz"]["size_bytes"]
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    config = json.loads((tmp_path / "assistant_1" / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert (tmp_path / "assistant_1" / "model.safetensors").is_file()
    # The whole-job archive carries it too.
    archive = client.get(f"/v1/jobs/{job_id}/archive")
    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        assert f"{job_id}/assistant_1.tar.gz" in tar.getnames()
        assert sorted(tar.getnames()) == sorted(f"{job_id}/{name}" for name in items)
        assert {m.mode for m in tar.getmembers()} == {0o644}  # readable once extracted
        weights = tar.extractfile(f"{job_id}/model.safetensors")
        assert weights is not None
        assert hashlib.sha256(weights.read()).hexdigest() == items["model.safetensors"]["sha256"]
    for name in items:  # stored readable too (the store writes 0644)
        assert (settings.artifacts_root / job_id / name).stat().st_mode & 0o777 == 0o644
    # The report: an artifact, and its own route (text/html, a page that runs no script, with
    # the test metrics, KL to the teacher, a row per hop and inline SVG charts).
    assert "report.html" in items
    report = client.get(f"/v1/jobs/{job_id}/report")
    assert report.status_code == 200
    assert report.headers["content-type"] == "text/html; charset=utf-8"
    assert "default-src 'none'" in report.headers["content-security-policy"]
    assert hashlib.sha256(report.content).hexdigest() == items["report.html"]["sha256"]
    page = report.text
    assert page.startswith("<!DOCTYPE html>") and "<script" not in page
    assert "<h2>Test split</h2>" in page and "assistant_1 (earlier hop" in page
    assert format_number(final["teacher_kl"]) in page
    assert format_number(final["test"]["accuracy"]) in page
    charts = re.findall(r'<svg class="chart"[^>]*aria-label="([^"]*)"', page)
    # teacher's and student's confusion matrices, learning curves (training loss, dev metrics)
    assert len(charts) == 4 and "training loss" in charts and "<img" not in page
    assert final["report"]["file"] == "report.html"
    other = TestClient(client.app, headers=auth(make_key(settings, "other")))
    assert other.get(f"/v1/jobs/{job_id}/report").status_code == 404  # another tenant's


def test_minimax_knn_corpus_is_checked_at_submission(
    client: TestClient, settings: Settings
) -> None:
    """``method.corpus``: a built-in corpus or a file under the data root, else a 422 naming it
    (before the teacher is looked at); a good one is queued."""
    teacher = settings.models_root / "rt"
    teacher.mkdir()
    config = {
        "model_type": "bert",
        "architectures": ["BertForSequenceClassification"],
        "num_hidden_layers": 6,
        "hidden_size": 384,
        "num_attention_heads": 12,
        "intermediate_size": 1536,
        "vocab_size": 30522,
        "id2label": {"0": "rotten", "1": "fresh"},
    }
    (teacher / "config.json").write_text(json.dumps(config))
    (settings.data_root / "sentences.csv").write_text("text\nA plot.\n")
    body = {**FINETUNE, "teacher": "file://rt"}
    for corpus in (None, "file://sentences.csv"):
        method = {"name": "minimax_knn", **({"corpus": corpus} if corpus else {})}
        r = client.post("/v1/jobs", json={**body, "method": method})
        assert r.status_code == 201, r.text
    assert r.json()["spec"]["method"]["corpus"] == "file://sentences.csv"
    for corpus, message in [
        ("builtin:nope", "rotten_tomatoes_plot"),
        ("file://missing.csv", "does not exist"),
        ("file://../outside.csv", "outside"),
        ("hf://someone/corpus", "builtin:<name> or file://"),
        ("s3://bucket/x", "must start with"),
    ]:
        r = client.post(
            "/v1/jobs", json={**body, "method": {"name": "minimax_knn", "corpus": corpus}}
        )
        assert r.status_code == 422, r.text
        err = r.json()["error"]
        assert err["field"] == "method.corpus", err
        assert message in err["message"], err
    r = client.post("/v1/jobs", json={**body, "method": {"name": "minimax_knn", "num_augments": 9}})
    assert r.status_code == 422 and r.json()["error"]["field"] == "method.num_augments"
    assert count_jobs(settings) == 2
