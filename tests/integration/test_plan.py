"""The effective plan at submit (issue 24): stages with their lengths, learning rates and where
each value comes from; a ``training`` setting the method's recipe overrides is refused; a fresh
student larger than its teacher is refused unless allowed. Real PostgreSQL and Redis."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from api.main import create_app
from core import tenants
from core.db import Job
from core.settings import Settings

RT = {"source": "builtin:rotten_tomatoes"}


@pytest.fixture
def client(settings: Settings) -> Iterator[TestClient]:
    engine = create_engine(settings.database_url)
    with Session(engine) as s:
        _, key = tenants.create_key(s, tenants.ensure_tenant(s, "plan").id, "tests")
        s.commit()
    engine.dispose()
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"}) as c:
        yield c


@pytest.fixture
def teacher(settings: Settings) -> str:
    """The minilm-l6 config as a fine-tuned classifier under the models root (enough to plan)."""
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


def count_jobs(settings: Settings) -> int:
    engine = create_engine(settings.database_url)
    with Session(engine) as s:
        n = s.scalar(select(func.count()).select_from(Job)) or 0
    engine.dispose()
    return n


def body(teacher: str, method: dict[str, Any], **training: Any) -> dict[str, Any]:
    return {
        "teacher": teacher,
        "student": {"num_layers": 2},
        "method": method,
        "dataset": RT,
        "training": training,
    }


def test_a_training_setting_the_recipe_overrides_is_422_naming_the_method_setting(
    client: TestClient, settings: Settings, teacher: str
) -> None:
    """The issue's case: mate_kd with training.epochs 2 and learning_rate 1e-4 used to be
    stored with the recipe's 30 epochs at 2e-5, without a word."""
    r = client.post(
        "/v1/jobs", json=body(teacher, {"name": "mate_kd"}, epochs=2, learning_rate=1e-4)
    )
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "training.epochs", err
    assert "mate_kd does not use training.epochs" in err["message"]
    assert "method.epochs" in err["message"]
    r = client.post("/v1/jobs", json=body(teacher, {"name": "mate_kd"}, learning_rate=1e-4))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "training.learning_rate"
    assert "set method.generator_warmup_learning_rate and method.learning_rate" in err["message"]
    # annealing_kd fixes warm-up 0 in both stages: nothing to set instead.
    r = client.post("/v1/jobs", json=body(teacher, {"name": "annealing_kd"}, warmup_ratio=0.2))
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "training.warmup_ratio"
    assert "its recipe fixes this value: leave it out" in err["message"]
    assert count_jobs(settings) == 0


def test_the_submit_answer_and_the_job_show_the_effective_plan(
    client: TestClient, teacher: str
) -> None:
    spec = body(
        teacher,
        {"name": "mate_kd", "epochs": 2, "learning_rate": 1e-4},
        max_steps=40,
        warmup_ratio=0.2,
    )
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 201, r.text
    job = r.json()
    plan = job["plan"]
    assert [s["name"] for s in plan["stages"]] == ["generator warm-up", "mate_kd"]
    warmup, adversarial = plan["stages"]
    assert warmup["epochs"] == {
        "value": 1,
        "source": "recipe",
        "fields": ["method.generator_warmup_epochs"],
    }
    assert warmup["warmup_ratio"] == {"value": 0.0, "source": "recipe", "fields": []}
    assert adversarial["epochs"] == {"value": 2, "source": "user", "fields": ["method.epochs"]}
    assert adversarial["learning_rate"] == {
        "value": 1e-4,
        "source": "user",
        "fields": ["method.learning_rate"],
    }
    assert adversarial["warmup_ratio"] == {
        "value": 0.2,
        "source": "user",
        "fields": ["training.warmup_ratio"],
    }
    assert adversarial["schedule"]["source"] == "default"
    assert adversarial["steps"] is None and adversarial["max_steps"] == 40
    # The job keeps its plan; lists leave it out.
    got = client.get(f"/v1/jobs/{job['id']}").json()
    assert got["plan"] == plan
    assert client.get("/v1/jobs").json()["items"][0]["plan"] is None


def test_a_one_stage_method_and_a_chain_show_their_stages(client: TestClient, teacher: str) -> None:
    r = client.post("/v1/jobs", json=body(teacher, {"name": "vanilla_kd"}, epochs=2))
    assert r.status_code == 201, r.text
    (stage,) = r.json()["plan"]["stages"]
    assert stage["epochs"] == {"value": 2, "source": "user", "fields": ["training.epochs"]}
    assert stage["learning_rate"] == {
        "value": 5e-5,
        "source": "default",
        "fields": ["training.learning_rate"],
    }
    # universal_kd: its probes stage of fixed steps (user), then training.epochs (default).
    r = client.post(
        "/v1/jobs",
        json=body(teacher, {"name": "universal_kd", "probe_steps": 50}, max_steps=20),
    )
    assert r.status_code == 201, r.text
    plan = r.json()["plan"]
    probes, distil = plan["stages"]
    assert probes["steps"] == {"value": 50, "source": "user", "fields": ["method.probe_steps"]}
    assert distil["epochs"] == {"value": 3, "source": "default", "fields": ["training.epochs"]}
    assert plan["notes"] == [
        "stage 'universal_kd teacher probes' (student) is cut from 50 to 20 steps by "
        "training.max_steps"
    ]
    # A chain plans one hop per model: takd's assistant, then the student.
    r = client.post("/v1/jobs", json=body(teacher, {"name": "takd"}))
    assert r.status_code == 201, r.text
    hops = [s["hop"] for s in r.json()["plan"]["stages"]]
    assert len(hops) >= 2 and hops[-1] == "student" and hops[0] != "student"


def test_a_fresh_student_larger_than_its_teacher_is_refused_unless_allowed(
    client: TestClient, settings: Settings, teacher: str
) -> None:
    """The issue's case: a 12 x 768 fresh student (about 110M parameters) against a 22.7M
    teacher was accepted without a word."""
    fresh = {
        "type": "fresh",
        "num_layers": 12,
        "hidden_size": 768,
        "num_heads": 12,
        "intermediate_size": 3072,
    }
    spec = {**body(teacher, {"name": "vanilla_kd"}), "student": fresh}
    r = client.post("/v1/jobs", json=spec)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "student.allow_larger_than_teacher"
    ours, theirs = err["details"]["student_parameters"], err["details"]["teacher_parameters"]
    assert 100_000_000 < ours < 120_000_000 and 20_000_000 < theirs < 25_000_000
    assert f"{ours:,} parameters" in err["message"] and f"{theirs:,}" in err["message"]
    assert count_jobs(settings) == 0
    spec["student"] = {**fresh, "allow_larger_than_teacher": True}
    assert client.post("/v1/jobs", json=spec).status_code == 201
    # A smaller fresh student needs no permission.
    small = {**fresh, "num_layers": 2, "hidden_size": 128, "num_heads": 2, "intermediate_size": 512}
    assert client.post("/v1/jobs", json={**spec, "student": small}).status_code == 201
