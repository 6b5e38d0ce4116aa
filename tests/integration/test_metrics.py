"""GET /metrics scraped over the app: jobs by status from real PostgreSQL rows, queue depth from
the real broker, heartbeats, busy workers, job and stage duration histograms, HTTP latency; the
bearer token; a broker that is down."""

from __future__ import annotations

import uuid
from datetime import timedelta

import redis
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update
from sqlalchemy.orm import Session

from api.main import create_app
from core import repository, tenants
from core.db import Job, utcnow
from core.settings import Settings


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value of every sample of a scrape."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def add_job(db: Session, status: str, method: str = "vanilla_kd", **values: object) -> str:
    job_id = str(uuid.uuid4())
    tenant = tenants.ensure_tenant(db, "test")
    repository.create_job(db, job_id, method, {"method": {"name": method}}, tenant_id=tenant.id)
    db.execute(update(Job).where(Job.id == job_id).values(status=status, **values))
    db.commit()
    return job_id


def test_metrics_report_jobs_queues_workers_durations_and_latency(
    settings: Settings, db: Session
) -> None:
    now = utcnow()
    for _ in range(3):
        add_job(db, "queued")
    add_job(db, "waiting", "finetune")
    fresh = add_job(db, "running", worker="w1", heartbeat_at=now - timedelta(seconds=3))
    stale = add_job(db, "running", worker="w2", heartbeat_at=now - timedelta(seconds=900))
    add_job(
        db,
        "succeeded",
        started_at=now - timedelta(seconds=120),
        finished_at=now,
        metrics={"stages": [{"name": "train", "seconds": 42.0}, {"name": "x"}]},
    )
    add_job(db, "failed", started_at=now - timedelta(seconds=30), finished_at=now)
    broker = redis.Redis.from_url(settings.broker_url)
    broker.delete("cpu")
    broker.rpush("cpu", "m1", "m2")
    broker.rpush("cpu\x06\x163", "m3")  # a priority-3 message of the same queue
    try:
        with TestClient(create_app(settings)) as client:
            for _ in range(2):
                assert client.get("/healthz").status_code == 200
            r = client.get("/metrics")
    finally:
        broker.delete("cpu", "cpu\x06\x163")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    got = samples(r.text)

    def value(name: str, **labels: str) -> float:
        return got[(name, tuple(sorted(labels.items())))]

    assert value("distillery_jobs_by_status", status="queued") == 3
    assert value("distillery_jobs_by_status", status="running") == 2
    assert value("distillery_jobs_by_status", status="cancelled") == 0
    assert value("distillery_jobs", status="waiting", method="finetune") == 1
    assert value("distillery_queue_depth", queue="cpu") == 3
    assert value("distillery_queue_depth", queue="gpu") == 0
    assert value("distillery_busy_workers") == 1  # w2's heartbeat is past the timeout
    assert 2 < value("distillery_heartbeat_age_seconds", job_id=fresh, worker="w1") < 60
    assert value("distillery_heartbeat_age_seconds", job_id=stale, worker="w2") > 800
    ok = {"method": "vanilla_kd", "status": "succeeded"}
    assert value("distillery_job_duration_seconds_count", **ok) == 1
    assert value("distillery_job_duration_seconds_sum", **ok) == 120
    assert value("distillery_job_duration_seconds_bucket", le="60.0", **ok) == 0
    assert value("distillery_job_duration_seconds_bucket", le="300.0", **ok) == 1
    failed = {"method": "vanilla_kd", "status": "failed"}
    assert value("distillery_job_duration_seconds_bucket", le="60.0", **failed) == 1
    stage = {"method": "vanilla_kd", "stage": "train"}
    assert value("distillery_stage_duration_seconds_count", **stage) == 1
    assert value("distillery_stage_duration_seconds_sum", **stage) == 42
    assert (
        "distillery_stage_duration_seconds_count",
        (("method", "vanilla_kd"), ("stage", "x")),
    ) not in got
    health = {"method": "GET", "route": "/healthz", "status": "200"}
    assert value("distillery_http_request_duration_seconds_count", **health) == 2
    assert value("distillery_scrape_error", source="database") == 0
    assert value("distillery_scrape_error", source="broker") == 0


def test_metrics_token_and_a_broker_that_is_down(settings: Settings) -> None:
    guarded = settings.model_copy(
        update={"metrics_token": "s3cret", "broker_url": "redis://127.0.0.1:1/0"}
    )
    with TestClient(create_app(guarded)) as client:
        refused = client.get("/metrics")
        assert refused.status_code == 401
        assert refused.json()["error"]["code"] == "unauthorized"
        assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = client.get("/metrics", headers={"Authorization": "Bearer s3cret"})
    assert r.status_code == 200, r.text
    got = samples(r.text)
    assert got[("distillery_scrape_error", (("source", "broker"),))] == 1
    assert got[("distillery_scrape_error", (("source", "database"),))] == 0
    assert not any(name == "distillery_queue_depth" for name, _ in got)
