"""MLflow tracking through the worker's real ``execute``: a tiny job with
DISTILLERY_MLFLOW_TRACKING_URI on a local file store is read back with MlflowClient (the run,
its tags and params, the dev metric history, the test metrics, the student's files); with an
MLflow server that does not answer, the job still succeeds and carries a warning event."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from mlflow.tracking import MlflowClient
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from api.main import create_app
from core import tenants
from core.settings import Settings
from tests.checks import NO_EXTRAS
from worker.runner import execute

SPEC: dict[str, Any] = {
    "teacher": "builtin:minilm-l6",
    "student": {"num_layers": 1},
    "method": {"name": "finetune"},
    "dataset": {
        "source": "builtin:rotten_tomatoes",
        "max_train_examples": 8,
        "max_eval_examples": 8,
    },
    "training": {"epochs": 2, "batch_size": 8, "max_seq_length": 16, "max_steps": 2,
                 "device": "cpu"},
    "export": NO_EXTRAS,
}  # fmt: skip
ONE_STEP = {**SPEC, "training": {**SPEC["training"], "epochs": 1, "max_steps": 1}}


def _submit(settings: Settings, spec: dict[str, Any] = SPEC) -> str:
    engine = create_engine(settings.database_url)
    with Session(engine) as s:
        _, key = tenants.create_key(s, tenants.ensure_tenant(s, "ml").id, "tests")
        s.commit()
    engine.dispose()
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"}) as c:
        r = c.post("/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        return str(r.json()["id"])


def _events(settings: Settings, job_id: str) -> list[tuple[str, str]]:
    from core import events

    engine = create_engine(settings.database_url)
    with Session(engine) as s:
        rows = [(e.type, e.message) for e in events.list_events(s, job_id)]
    engine.dispose()
    return rows


def test_a_job_is_logged_as_an_mlflow_run(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants an opt-in for it
    uri = f"file://{tmp_path / 'mlruns'}"
    settings = settings.model_copy(update={"mlflow_tracking_uri": uri})
    job_id = _submit(settings)
    assert execute(job_id, settings) == "succeeded"

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name("distillery")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.run_name == job_id and run.info.status == "FINISHED"
    assert run.data.tags["distillery.job_id"] == job_id
    assert run.data.tags["distillery.method"] == "finetune"
    assert run.data.tags["distillery.tenant"]  # the tenant's id
    params = run.data.params
    assert params["method.name"] == "finetune"
    assert params["training.batch_size"] == "8" and params["training.max_steps"] == "2"
    assert params["student.num_layers"] == "1"
    assert params["dataset.source"] == "builtin:rotten_tomatoes"
    # One dev evaluation per epoch, at increasing global steps.
    dev = client.get_metric_history(run.info.run_id, "dev.accuracy")
    assert len(dev) == 2 and dev[0].step < dev[1].step
    # The values are the job's own (its metrics.json, logged with the student's files).
    metrics = json.loads(
        Path(client.download_artifacts(run.info.run_id, "student/metrics.json", str(tmp_path)))
        .read_text()
    )  # fmt: skip
    assert [m.value for m in dev] == pytest.approx(
        [e["dev"]["accuracy"] for e in metrics["epochs"]]
    )
    assert len(client.get_metric_history(run.info.run_id, "train_loss")) == 2
    assert run.data.metrics["test.accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id, "student")}
    assert {"student/config.json", "student/model.safetensors"} <= artifacts
    assert not [e for e in _events(settings, job_id) if "MLflow" in e[1]]


def test_an_unreachable_mlflow_is_a_warning_not_a_failure(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing answers there
    settings = settings.model_copy(update={"mlflow_tracking_uri": f"http://127.0.0.1:{port}"})
    job_id = _submit(settings, ONE_STEP)
    assert execute(job_id, settings) == "succeeded"
    warnings = [m for t, m in _events(settings, job_id) if t == "warning" and "MLflow" in m]
    assert len(warnings) == 1 and "the job goes on untracked" in warnings[0]
