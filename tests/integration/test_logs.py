"""Structured logs: JSON lines naming the job, from the worker's real run of a job and from an
API request on a job's path; plain text names it too."""

from __future__ import annotations

import io
import json
import logging
import uuid

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from api.main import create_app
from core import logs, repository, tenants
from core.settings import Settings
from worker.runner import execute


def test_every_line_of_a_worker_run_names_its_job_in_json(settings: Settings, db: Session) -> None:
    job_id = str(uuid.uuid4())
    tenant = tenants.ensure_tenant(db, "test")
    # a stored spec the worker cannot read: the run fails at once, logging why
    repository.create_job(db, job_id, "vanilla_kd", {"method": {"name": "?"}}, tenant_id=tenant.id)
    db.commit()
    handler = logs.configure("json")
    stream = io.StringIO()
    handler.setStream(stream)
    try:
        logging.getLogger("distillery.test").info("before the job")
        assert execute(job_id, settings) == "failed"
        logging.getLogger("distillery.test").info("after the job")
    finally:
        logs.configure("text")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert lines[0]["message"] == "before the job" and lines[0]["job_id"] == "-"
    assert lines[-1]["message"] == "after the job" and lines[-1]["job_id"] == "-"
    during = lines[1:-1]
    assert during, lines
    assert all(line["job_id"] == job_id for line in during), during
    assert any("failed" in line["message"] and line["level"] == "WARNING" for line in during)
    assert {"time", "level", "logger", "job_id", "message"} <= set(during[0])


def test_an_api_request_on_a_job_path_names_the_job(settings: Settings) -> None:
    app = create_app(settings)

    @app.get("/v1/jobs/{job_id}/log-probe")
    def probe(job_id: str) -> dict[str, str]:
        logging.getLogger("distillery.test").info("probe")
        return {}

    handler = logs.configure("text")
    stream = io.StringIO()
    handler.setStream(stream)
    with TestClient(app) as client:
        client.get("/v1/jobs/abc-123/log-probe")
        client.get("/healthz")
        logging.getLogger("distillery.test").info("outside")
    text = stream.getvalue()
    assert "INFO distillery.test [job abc-123] probe" in text, text
    assert "INFO distillery.test [job -] outside" in text, text
