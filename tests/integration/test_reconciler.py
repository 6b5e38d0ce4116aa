"""The reconciler, the heartbeat thread and the bounded publish, on the real PostgreSQL and
Redis: rows set up in the database, messages in (and taken out of) the real broker."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session

from api.main import create_app
from bench.http_faults import SilentBroker
from core import events, repository, tenants
from core.db import Job, JobEvent, make_engine, make_sessionmaker, utcnow
from core.queue import make_celery
from core.settings import Settings
from worker import reconciler
from worker.heartbeat import Heartbeat
from worker.reconciler import reconcile_once


@pytest.fixture
def rsettings(settings: Settings) -> Settings:
    """Short liveness timeouts for the tests."""
    return settings.model_copy(
        update={
            "heartbeat_timeout_s": 5.0,
            "heartbeat_interval_s": 0.2,
            "max_attempts": 3,
            "requeue_grace_s": 2.0,
            "broker_publish_timeout_s": 2.0,
        }
    )


@pytest.fixture
def sessions(rsettings: Settings) -> Iterator[Session]:
    engine = create_engine(rsettings.database_url)
    with Session(engine) as s:
        yield s
    engine.dispose()


def new_job(s: Session) -> str:
    job_id = str(uuid.uuid4())
    tenant = tenants.ensure_tenant(s, "test")
    repository.create_job(
        s, job_id, "finetune", {"method": {"name": "finetune"}}, tenant_id=tenant.id
    )
    s.commit()
    return job_id


def start(s: Session, job_id: str, worker: str) -> int:
    """Claim the job as the runner does (the ``started`` event included); its attempt."""
    assert repository.claim(s, job_id, worker)
    attempt = int(s.scalar(select(Job.attempt).where(Job.id == job_id)) or 0)
    events.record(s, job_id, "started", "", data={"attempt": attempt, "worker": worker})
    s.commit()
    return attempt


def age(s: Session, job_id: str, seconds: float, **values: object) -> None:
    """Make the job's heartbeat and last update ``seconds`` old (and set ``values``)."""
    old = utcnow() - timedelta(seconds=seconds)
    s.execute(
        update(Job).where(Job.id == job_id).values(heartbeat_at=old, updated_at=old, **values)
    )
    s.commit()


def row(s: Session, job_id: str) -> Job:
    s.expire_all()
    job = s.get(Job, job_id)
    assert job is not None
    return job


def event_types(s: Session, job_id: str) -> list[str]:
    q = select(JobEvent.type).where(JobEvent.job_id == job_id).order_by(JobEvent.id)
    return list(s.scalars(q))


def queued_ids(settings: Settings) -> list[str]:
    r = redis.Redis.from_url(settings.broker_url)
    return [json.loads(m)["headers"]["id"] for m in r.lrange(settings.queue, 0, -1)]


def test_a_stale_running_job_with_attempts_left_is_requeued_and_sent(
    rsettings: Settings, sessions: Session
) -> None:
    lost, alive = new_job(sessions), new_job(sessions)
    start(sessions, lost, "w1")
    start(sessions, alive, "w2")
    sessions.execute(update(Job).where(Job.id == lost).values(progress={"step": 7}))
    sessions.commit()
    age(sessions, lost, 60)

    report = reconcile_once(rsettings)

    assert report.acquired and report.retried == [lost] and not report.errors
    job = row(sessions, lost)
    assert (job.status, job.attempt, job.worker, job.heartbeat_at) == ("queued", 1, None, None)
    assert event_types(sessions, lost)[-1] == "retried"
    retried = sessions.scalars(
        select(JobEvent).where(JobEvent.job_id == lost, JobEvent.type == "retried")
    ).one()
    assert retried.message == "worker lost at step 7; attempt 2 of 3"
    assert retried.data["lost_attempt"] == 1
    assert queued_ids(rsettings) == [lost]
    assert row(sessions, alive).status == "running"
    # The next claim is attempt 2.
    assert repository.claim(sessions, lost, "w3")
    sessions.commit()
    assert row(sessions, lost).attempt == 2


def test_a_lost_job_out_of_attempts_is_failed_listing_them(
    rsettings: Settings, sessions: Session
) -> None:
    job_id = new_job(sessions)
    for n in (1, 2, 3):
        start(sessions, job_id, f"w{n}")
        if n < 3:
            age(sessions, job_id, 60)
            assert reconcile_once(rsettings).retried == [job_id]
    age(sessions, job_id, 60)
    redis.Redis.from_url(rsettings.broker_url).delete(rsettings.queue)

    report = reconcile_once(rsettings)

    assert report.failed == [job_id] and report.retried == []
    job = row(sessions, job_id)
    assert job.status == "failed" and job.finished_at is not None
    assert job.error is not None
    assert "lost on every attempt (3 of 3" in job.error
    assert "attempt 1 on w1, attempt 2 on w2, attempt 3 on w3" in job.error
    assert event_types(sessions, job_id)[-1] == "failed"
    assert queued_ids(rsettings) == []


def test_stale_cancelling_is_cancelled_and_stale_pausing_is_paused(
    rsettings: Settings, sessions: Session
) -> None:
    cancelling, pausing = new_job(sessions), new_job(sessions)
    for job_id, status in ((cancelling, "cancelling"), (pausing, "pausing")):
        start(sessions, job_id, "w1")
        age(sessions, job_id, 60, status=status)

    report = reconcile_once(rsettings)

    assert (report.cancelled, report.paused, report.retried) == ([cancelling], [pausing], [])
    assert row(sessions, cancelling).status == "cancelled"
    assert event_types(sessions, cancelling)[-1] == "cancelled"
    assert row(sessions, pausing).status == "paused"
    assert event_types(sessions, pausing)[-1] == "paused"
    assert queued_ids(rsettings) == []


def test_failed_and_finished_jobs_are_never_touched(rsettings: Settings, sessions: Session) -> None:
    job_id = new_job(sessions)
    start(sessions, job_id, "w1")
    sessions.execute(update(Job).where(Job.id == job_id).values(status="failed", error="bad data"))
    sessions.commit()
    age(sessions, job_id, 3600)
    report = reconcile_once(rsettings)
    assert not report.acted()
    assert row(sessions, job_id).error == "bad data"


def test_queued_jobs_missing_from_the_broker_are_sent_again(
    rsettings: Settings, sessions: Session
) -> None:
    celery = make_celery(rsettings)
    missing, present, young, delivered, delivered_long_ago = (new_job(sessions) for _ in range(5))
    for job_id in (missing, present, delivered, delivered_long_ago):
        age(sessions, job_id, 60)
    for job_id in (present, delivered, delivered_long_ago):
        celery.send_task("distillery.run_job", args=[job_id], task_id=job_id, queue="cpu")
    # Two messages delivered and not acknowledged (in the transport's unacked hash), as a
    # worker holds them; one of them delivered long ago (its consumer is gone).
    with celery.connection_for_read() as conn:
        channel = conn.default_channel
        taken = {}
        for _ in range(3):
            m = channel.basic_get("cpu", no_ack=False)
            assert m is not None
            taken[m.headers["id"]] = m
            if m.headers["id"] == present:
                m.requeue()
        assert set(taken) == {present, delivered, delivered_long_ago}
        broker = redis.Redis.from_url(rsettings.broker_url)
        broker.zadd(
            reconciler.UNACKED_INDEX_KEY,
            {taken[delivered_long_ago].delivery_tag: time.time() - 600},
        )

        report = reconcile_once(rsettings)

        assert sorted(report.resent) == sorted([missing, delivered_long_ago])
        assert sorted(queued_ids(rsettings)) == sorted([present, missing, delivered_long_ago])
        assert young not in report.resent  # queued less than the grace ago (being sent)
        assert reconcile_once(rsettings).resent == []  # now held: not sent twice
        broker.delete(reconciler.UNACKED_KEY, reconciler.UNACKED_INDEX_KEY)


def test_only_one_of_concurrent_passes_acts(rsettings: Settings, sessions: Session) -> None:
    job_id = new_job(sessions)
    start(sessions, job_id, "w1")
    age(sessions, job_id, 60)
    barrier = threading.Barrier(4)
    reports: list[reconciler.ReconcileReport] = []

    def one() -> None:
        barrier.wait()
        reports.append(reconcile_once(rsettings))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(reports) == 4
    assert sum(len(r.retried) for r in reports) == 1
    assert queued_ids(rsettings) == [job_id]
    assert event_types(sessions, job_id).count("retried") == 1


def test_a_held_lock_stops_a_pass(rsettings: Settings, sessions: Session) -> None:
    job_id = new_job(sessions)
    start(sessions, job_id, "w1")
    age(sessions, job_id, 60)
    broker = redis.Redis.from_url(rsettings.broker_url)
    broker.set(reconciler.LOCK_NAME, "another-worker", px=60_000)
    report = reconcile_once(rsettings)
    assert not report.acquired and not report.acted()
    assert row(sessions, job_id).status == "running"
    assert broker.get(reconciler.LOCK_NAME) == b"another-worker"  # not released by the loser
    broker.delete(reconciler.LOCK_NAME)
    assert reconcile_once(rsettings).retried == [job_id]
    assert broker.get(reconciler.LOCK_NAME) is None  # released by its owner


def test_the_heartbeat_thread_keeps_a_blocked_job_alive(
    rsettings: Settings, sessions: Session
) -> None:
    short = rsettings.model_copy(update={"heartbeat_timeout_s": 1.0})
    job_id = new_job(sessions)
    attempt = start(sessions, job_id, "w1")
    sm = make_sessionmaker(make_engine(short.database_url))
    with Heartbeat(sm, job_id, attempt, short.heartbeat_interval_s) as beat:
        time.sleep(2.5)  # the training loop blocked (a long evaluation): no progress reports
        assert reconcile_once(short).retried == []
        assert row(sessions, job_id).status == "running"
        assert beat.beats >= 5 and not beat.lost
    time.sleep(1.5)  # the thread stopped: the heartbeat ages
    assert reconcile_once(short).retried == [job_id]


def test_the_heartbeat_thread_notices_its_job_was_taken_away(
    rsettings: Settings, sessions: Session
) -> None:
    job_id = new_job(sessions)
    attempt = start(sessions, job_id, "w1")
    age(sessions, job_id, 60)
    assert reconcile_once(rsettings).retried == [job_id]
    assert repository.claim(sessions, job_id, "w2")  # attempt 2 runs elsewhere
    sessions.commit()
    sm = make_sessionmaker(make_engine(rsettings.database_url))
    with Heartbeat(sm, job_id, attempt, 0.1) as beat:
        deadline = time.monotonic() + 5
        while not beat.lost and time.monotonic() < deadline:
            time.sleep(0.05)
    assert beat.lost
    assert row(sessions, job_id).worker == "w2"


def test_get_does_not_change_a_stale_job(
    rsettings: Settings, sessions: Session, key_headers: dict[str, str]
) -> None:
    job_id = new_job(sessions)
    start(sessions, job_id, "w1")
    age(sessions, job_id, 3600)
    with TestClient(create_app(rsettings), headers=key_headers) as c:
        r = c.get(f"/v1/jobs/{job_id}")
    assert r.status_code == 200
    assert r.json()["status"] == "running"
    assert row(sessions, job_id).status == "running"
    assert event_types(sessions, job_id) == ["started"]


def test_a_silent_broker_fails_the_submit_within_the_timeout(
    rsettings: Settings, key_headers: dict[str, str], sessions: Session
) -> None:
    silent = SilentBroker()
    try:
        cfg = rsettings.model_copy(update={"broker_url": f"redis://127.0.0.1:{silent.port}/0"})
        with TestClient(create_app(cfg), headers=key_headers) as c:
            t0 = time.monotonic()
            r = c.post(
                "/v1/jobs",
                json={
                    "teacher": "builtin:minilm-l6",
                    "method": {"name": "finetune"},
                    "dataset": {"source": "builtin:rotten_tomatoes"},
                },
            )
            took = time.monotonic() - t0
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "unavailable"
        assert took < cfg.broker_publish_timeout_s + 3.0
        assert silent.conns, "the API did connect to the silent broker"
        jobs = list(sessions.scalars(select(Job)))
        assert len(jobs) == 1
        assert jobs[0].status == "failed"
        assert jobs[0].error is not None
        assert "broker unavailable" in jobs[0].error and "within 2 s" in jobs[0].error
        assert event_types(sessions, jobs[0].id) == ["queued", "failed"]
    finally:
        silent.close()


def test_the_visibility_timeout_applies_on_the_redis_transport(rsettings: Settings) -> None:
    cfg = rsettings.model_copy(update={"visibility_timeout_s": 123_456})
    app = make_celery(cfg)
    with app.connection_for_write() as conn:
        channel = conn.default_channel
        assert channel.visibility_timeout == 123_456  # not the transport's 1 h default
        assert channel.socket_timeout == cfg.broker_publish_timeout_s
        assert channel.socket_connect_timeout == cfg.broker_publish_timeout_s
    assert app.conf.task_acks_late and app.conf.task_reject_on_worker_lost
    assert app.conf.worker_prefetch_multiplier == 1


def test_a_pass_with_the_broker_down_reports_it_and_changes_nothing(
    rsettings: Settings, sessions: Session
) -> None:
    job_id = new_job(sessions)
    start(sessions, job_id, "w1")
    age(sessions, job_id, 60)
    down = rsettings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    report = reconcile_once(down)
    assert not report.acquired and report.errors
    assert row(sessions, job_id).status == "running"


def test_the_operator_command_runs_one_pass(rsettings: Settings, sessions: Session) -> None:
    import os
    import subprocess
    import sys
    from pathlib import Path

    job_id = new_job(sessions)
    start(sessions, job_id, "w1")
    age(sessions, job_id, 60)
    env = {
        **os.environ,
        "DISTILLERY_DATABASE_URL": rsettings.database_url,
        "DISTILLERY_BROKER_URL": rsettings.broker_url,
        "DISTILLERY_HEARTBEAT_TIMEOUT_S": "5",
    }
    out = subprocess.run(
        [sys.executable, "-m", "worker.reconciler", "--once"],
        cwd=Path(__file__).resolve().parents[2],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(out.stdout)["retried"] == [job_id]
    assert row(sessions, job_id).status == "queued"
    assert queued_ids(rsettings) == [job_id]


def test_a_stalled_attempt_cannot_finish_or_publish_the_job_of_the_next_attempt(
    rsettings: Settings, sessions: Session, tmp_path: Path
) -> None:
    from worker.runner import _finish, _publish, sessions_for

    sm = sessions_for(rsettings.database_url)
    job_id = new_job(sessions)
    assert start(sessions, job_id, "w1") == 1
    age(sessions, job_id, rsettings.heartbeat_timeout_s + 5)
    assert reconcile_once(rsettings).retried == [job_id]
    assert start(sessions, job_id, "w2") == 2
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.json").write_text("{}")
    # attempt 1 wakes up: neither its failure nor its output lands on attempt 2's job
    _finish(sm, job_id, "failed", "stale", 1, error="stale")
    assert not _publish(sm, rsettings, job_id, out, {}, 1)
    job = row(sessions, job_id)
    assert (job.status, job.attempt, job.error) == ("running", 2, None)
    assert repository.list_artifacts(sessions, job_id) == []
    assert "succeeded" not in event_types(sessions, job_id)
    # attempt 2 finishes it
    assert _publish(sm, rsettings, job_id, out, {}, 2)
    assert row(sessions, job_id).status == "succeeded"
    assert [a.name for a in repository.list_artifacts(sessions, job_id)] == ["metrics.json"]
