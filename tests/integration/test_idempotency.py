"""``Idempotency-Key`` on POST /v1/jobs against PostgreSQL and Redis: replays, a different body,
bad keys, expiry, per-tenant scope, and a real race (concurrent requests to a real uvicorn)."""

from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta

import httpx
import pytest
import redis
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select, update
from sqlalchemy.orm import Session

from api.main import create_app
from core import idempotency, repository, tenants
from core.db import IdempotencyKey, Job, utcnow
from core.settings import Settings

FINETUNE = {
    "teacher": "builtin:minilm-l6",
    "method": {"name": "finetune"},
    "dataset": {"source": "builtin:rotten_tomatoes"},
}


def make_key(db: Session, tenant: str) -> str:
    _, key = tenants.create_key(db, tenants.ensure_tenant(db, tenant).id, "tests")
    db.commit()
    return key


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def client(settings: Settings, db: Session) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers=auth(make_key(db, "alice"))) as c:
        yield c


def jobs_in_db(db: Session) -> int:
    db.expire_all()
    return int(db.scalar(select(func.count()).select_from(Job)) or 0)


def queued(settings: Settings) -> list[str]:
    r = redis.Redis.from_url(settings.broker_url)
    return [json.loads(m)["headers"]["id"] for m in r.lrange(settings.queue, 0, -1)]


def test_the_same_key_and_body_return_the_first_job(
    client: TestClient, settings: Settings, db: Session
) -> None:
    first = client.post("/v1/jobs", json=FINETUNE, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == 201, first.text
    assert "idempotent-replayed" not in first.headers
    # the same spec with other key order and a default spelled out is the same request
    same = {**FINETUNE, "dataset": {"source": "builtin:rotten_tomatoes"}, "student": {}}
    again = client.post("/v1/jobs", json=same, headers={"Idempotency-Key": "k-1"})
    assert again.status_code == 201, again.text
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert jobs_in_db(db) == 1
    assert queued(settings) == [first.json()["id"]]  # queued once
    other = client.post("/v1/jobs", json=FINETUNE, headers={"Idempotency-Key": "k-2"})
    assert other.json()["id"] != first.json()["id"]
    assert client.post("/v1/jobs", json=FINETUNE).json()["id"] not in (
        first.json()["id"],
        other.json()["id"],
    )
    assert jobs_in_db(db) == 3


def test_the_same_key_with_another_body_is_422_naming_the_header(
    client: TestClient, settings: Settings, db: Session
) -> None:
    assert client.post("/v1/jobs", json=FINETUNE, headers={"Idempotency-Key": "k"}).is_success
    r = client.post(
        "/v1/jobs",
        json={**FINETUNE, "training": {"epochs": 1}},
        headers={"Idempotency-Key": "k"},
    )
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "Idempotency-Key"
    assert "different body" in err["message"]
    assert jobs_in_db(db) == 1
    assert len(queued(settings)) == 1


@pytest.mark.parametrize(
    ("key", "words"),
    [("x" * 256, "at most 255"), ("a\tb", "control characters"), ("", "empty")],
)
def test_a_bad_key_is_422(client: TestClient, db: Session, key: str, words: str) -> None:
    r = client.post("/v1/jobs", json=FINETUNE, headers={"Idempotency-Key": key})
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == "Idempotency-Key"
    assert words in r.json()["error"]["message"]
    assert jobs_in_db(db) == 0
    ok = client.post("/v1/jobs", json=FINETUNE, headers={"Idempotency-Key": "x" * 255})
    assert ok.status_code == 201


def test_keys_belong_to_a_tenant_and_expire(
    client: TestClient, settings: Settings, db: Session
) -> None:
    mine = client.post("/v1/jobs", json=FINETUNE, headers={"Idempotency-Key": "k"}).json()
    bob = {**auth(make_key(db, "bob")), "Idempotency-Key": "k"}
    theirs = client.post("/v1/jobs", json=FINETUNE, headers=bob)
    assert theirs.status_code == 201
    assert theirs.json()["id"] != mine["id"]
    assert "idempotent-replayed" not in theirs.headers
    # older than the TTL: the key is free again (and the old record is replaced)
    old = utcnow() - timedelta(seconds=settings.idempotency_ttl_s + 1)
    db.execute(update(IdempotencyKey).values(created_at=old))
    db.commit()
    fresh = client.post("/v1/jobs", json=FINETUNE, headers={"Idempotency-Key": "k"})
    assert fresh.status_code == 201
    assert fresh.json()["id"] != mine["id"]
    assert "idempotent-replayed" not in fresh.headers
    db.expire_all()
    assert db.scalar(select(func.count()).select_from(IdempotencyKey)) == 2  # bob's + new


def test_a_retry_of_a_submit_the_broker_refused_queues_the_same_job(
    settings: Settings, db: Session
) -> None:
    """The 503'd submit committed its job (failed, "could not be queued"); its retry with the
    same key queues that job again instead of making a second one, and a retry after that is
    a plain replay."""
    key = make_key(db, "alice")
    headers = {**auth(key), "Idempotency-Key": "k"}
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down), headers=headers) as c:
        r = c.post("/v1/jobs", json=FINETUNE)
        assert r.status_code == 503
        job_id = r.json()["error"]["details"]["job_id"]
        assert job_id in r.json()["error"]["message"]
        # the broker still down: the retry fails the same job again (no second job)
        again = c.post("/v1/jobs", json=FINETUNE)
        assert again.status_code == 503
        assert again.json()["error"]["details"]["job_id"] == job_id
    assert jobs_in_db(db) == 1
    with TestClient(create_app(settings), headers=headers) as c:
        r = c.post("/v1/jobs", json=FINETUNE)
        assert r.status_code == 201, r.text
        assert r.headers["idempotent-replayed"] == "true"
        assert r.json()["id"] == job_id
        assert r.json()["status"] == "queued" and r.json()["error"] is None
        replay = c.post("/v1/jobs", json=FINETUNE)
        assert replay.json()["id"] == job_id and replay.json()["status"] == "queued"
        types = [e["type"] for e in c.get(f"/v1/jobs/{job_id}/events").json()["events"]]
    assert types == ["queued", "failed", "queued", "failed", "queued"]
    assert jobs_in_db(db) == 1
    assert queued(settings) == [job_id]  # sent once, by the retry that queued it


def test_a_submit_that_stored_nothing_is_retried_with_its_key(
    settings: Settings, db: Session
) -> None:
    """A submit refused before its commit (here: the tenant's quota) leaves no key behind: its
    retry with the same key creates the job."""
    key = make_key(db, "alice")
    headers = {**auth(key), "Idempotency-Key": "k"}
    full = settings.model_copy(update={"default_max_active_jobs": 0})
    with TestClient(create_app(full), headers=headers) as c:
        assert c.post("/v1/jobs", json=FINETUNE).status_code == 429
    assert jobs_in_db(db) == 0
    with TestClient(create_app(settings), headers=headers) as c:
        r = c.post("/v1/jobs", json=FINETUNE)
    assert r.status_code == 201 and "idempotent-replayed" not in r.headers
    assert queued(settings) == [r.json()["id"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def live_url(settings: Settings) -> Iterator[str]:
    """The app served by a real uvicorn (its own threads and connection pool)."""
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def test_concurrent_requests_with_one_key_make_one_job(
    live_url: str, settings: Settings, db: Session
) -> None:
    key = make_key(db, "alice")
    n = 8
    barrier = threading.Barrier(n)
    answers: list[httpx.Response] = []
    lock = threading.Lock()

    def post() -> None:
        with httpx.Client(base_url=live_url, timeout=60) as http:
            barrier.wait()
            r = http.post(
                "/v1/jobs", json=FINETUNE, headers={**auth(key), "Idempotency-Key": "race"}
            )
        with lock:
            answers.append(r)

    threads = [threading.Thread(target=post) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert len(answers) == n
    assert all(r.status_code == 201 for r in answers), [r.text for r in answers]
    assert len({r.json()["id"] for r in answers}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in answers) == n - 1
    assert jobs_in_db(db) == 1
    assert queued(settings) == [answers[0].json()["id"]]


def test_a_create_that_loses_the_insert_race_returns_the_winner(
    settings: Settings, db: Session
) -> None:
    """The unique constraint decides when the lock does not (the winner commits between the
    loser's look-up and its insert): the loser's rows are rolled back, the winner's id comes
    back as a replay."""
    tenant = tenants.ensure_tenant(db, "alice")
    db.commit()
    winner_id = str(uuid.uuid4())
    engine = create_engine(settings.database_url)
    sha = idempotency.body_sha256(FINETUNE)

    def create() -> str:
        with Session(engine) as other:  # the winner, committing while the loser is inside
            repository.create_job(other, winner_id, "finetune", FINETUNE, tenant_id=tenant.id)
            other.add(
                IdempotencyKey(
                    tenant_id=tenant.id,
                    key="k",
                    route="POST /v1/jobs",
                    request_sha256=sha,
                    resource_id=winner_id,
                    created_at=utcnow(),
                )
            )
            other.commit()
        loser = str(uuid.uuid4())
        repository.create_job(db, loser, "finetune", FINETUNE, tenant_id=tenant.id)
        return loser

    outcome = idempotency.create_once(
        db,
        tenant_id=tenant.id,
        route="POST /v1/jobs",
        key="k",
        request_sha256=sha,
        ttl_s=settings.idempotency_ttl_s,
        create=create,
    )
    assert outcome == idempotency.Outcome(winner_id, replayed=True)
    assert jobs_in_db(db) == 1
    engine.dispose()
