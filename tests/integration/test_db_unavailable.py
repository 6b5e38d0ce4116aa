"""The database going away (issue 20, fault 1), on a real PostgreSQL: the API answers 503 with
``Retry-After`` (never a 500), the worker's database work is retried through a terminated
connection and gives up past its deadline with :class:`DatabaseUnavailable`, and an error a
job stores never shows SQL or parameters. The end-to-end run with a real worker is
``tests/e2e/test_db_outage.py``."""

from __future__ import annotations

import socket
import time
import uuid

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session

from api.main import create_app
from core import repository, tenants
from core.db import Job, make_engine, make_sessionmaker
from core.db_errors import is_transient, public_message
from core.settings import Settings
from worker import db_retry
from worker.db_retry import DatabaseUnavailable


def closed_port_url() -> str:
    """A PostgreSQL URL on a local port nothing listens on (connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"postgresql+psycopg://postgres@127.0.0.1:{port}/nothing"


def test_the_api_answers_503_with_retry_after_while_the_database_is_unreachable(
    settings: Settings,
) -> None:
    down = settings.model_copy(update={"database_url": closed_port_url(), "db_retry_after_s": 7})
    client = TestClient(create_app(down), raise_server_exceptions=False)
    headers = {"Authorization": "Bearer dk_abcdefgh_" + "x" * 32}
    answers = [
        client.get("/v1/jobs", headers=headers),
        client.get(f"/v1/jobs/{uuid.uuid4()}", headers=headers),
        client.get("/v1/files", headers=headers),
        client.post(
            "/v1/jobs",
            headers=headers,
            json={"teacher": "builtin:minilm-l6", "method": {"name": "finetune"}},
        ),
    ]
    for r in answers:
        assert r.status_code == 503, (r.request.url, r.status_code, r.text)
        assert r.headers["Retry-After"] == "7"
        error = r.json()["error"]
        assert error["code"] == "unavailable"
        assert error["message"] == "the database is unavailable; retry later"
        assert "SQL" not in r.text and "SELECT" not in r.text and "127.0.0.1" not in r.text
    assert client.get("/healthz").status_code == 503


def test_a_unit_of_work_on_a_terminated_connection_is_retried_on_a_new_one(
    settings: Settings,
) -> None:
    engine = make_engine(settings.database_url)
    sm = make_sessionmaker(engine)
    admin = create_engine(settings.database_url)
    tries: list[int] = []
    recovered: list[db_retry.Recovery] = []

    def work() -> int:
        with sm() as s:
            pid = int(s.scalar(text("SELECT pg_backend_pid()")) or 0)
            tries.append(pid)
            if len(tries) == 1:  # the server terminates this connection mid-transaction
                with admin.begin() as c:
                    c.execute(text("SELECT pg_terminate_backend(:p)"), {"p": pid})
            value = int(s.scalar(text("SELECT 41 + 1")) or 0)
            s.commit()
            return value

    try:
        assert db_retry.call(work, what="test", deadline_s=10, on_recovered=recovered.append) == 42
    finally:
        admin.dispose()
        engine.dispose()
    assert len(tries) == 2 and tries[0] != tries[1]  # the second try got a new connection
    assert len(recovered) == 1 and recovered[0].attempts == 2
    assert recovered[0].error.startswith("AdminShutdown: terminating connection")


def test_past_its_deadline_the_work_raises_database_unavailable(settings: Settings) -> None:
    sm = make_sessionmaker(make_engine(closed_port_url()))
    tries = 0

    def work() -> None:
        nonlocal tries
        tries += 1
        with sm() as s:
            s.execute(text("SELECT 1"))

    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as info:
        db_retry.call(work, what="progress", deadline_s=1.5)
    took = time.monotonic() - started
    assert 0.5 <= took <= 1.5 + 1, took  # no try starts after the deadline
    assert tries >= 3  # 0.1 s, 0.2 s, 0.4 s ... between tries
    assert info.value.what == "progress" and info.value.attempts == tries
    assert "[SQL" not in str(info.value) and "Connection refused" in str(info.value)

    # a programming error is not retried
    def broken() -> None:
        nonlocal tries
        tries += 1
        with make_sessionmaker(make_engine(settings.database_url))() as s:
            s.execute(text("SELECT * FROM no_such_table"))

    tries = 0
    with pytest.raises(DBAPIError) as bad:
        db_retry.call(broken, what="read", deadline_s=5)
    assert tries == 1 and not is_transient(bad.value)


def test_a_stored_job_error_never_shows_sql_or_parameters(
    settings: Settings, key_headers: dict[str, str]
) -> None:
    from worker.runner import _finish, _user_reason

    engine = make_engine(settings.database_url)
    with Session(engine) as s:
        job_id = str(uuid.uuid4())
        tenant = tenants.ensure_tenant(s, "test")
        repository.create_job(
            s, job_id, "finetune", {"method": {"name": "finetune"}}, tenant_id=tenant.id
        )
        assert repository.claim(s, job_id, "w1")
        s.commit()
        try:  # a real error of the driver, with a statement and its parameters
            s.execute(
                text("UPDATE jobs SET progress = :p WHERE nope = :secret"),
                {"p": '{"step": 25}', "secret": "s3cr3t-value"},
            )
        except DBAPIError as e:
            error: DBAPIError = e
        s.rollback()
    assert "[SQL:" in str(error)  # what the job showed before
    reason = _user_reason(error)
    assert reason.startswith("internal error (UndefinedColumn: column")
    _finish(make_sessionmaker(engine), job_id, "failed", reason, 1, error=reason)
    with Session(engine) as s:
        stored = s.scalar(select(Job.error).where(Job.id == job_id))
    engine.dispose()
    shown = TestClient(create_app(settings), headers=key_headers).get(f"/v1/jobs/{job_id}")
    assert shown.status_code == 200, shown.text
    assert shown.json()["status"] == "failed" and shown.json()["error"] == stored == reason
    for text_ in (reason, shown.text, public_message(error)):
        assert "[SQL:" not in text_ and "[parameters:" not in text_
        assert "s3cr3t-value" not in text_ and "UPDATE jobs" not in text_
