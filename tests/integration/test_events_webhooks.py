"""Job events (pages and the SSE stream) and webhooks, against PostgreSQL, Redis, a real uvicorn
and a real HTTP receiver on 127.0.0.1 that checks every signature as a receiver would, with
``standardwebhooks.Webhook(secret).verify``."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session
from standardwebhooks import Webhook, WebhookVerificationError

from api.main import create_app
from core import events, tenants
from core.db import WebhookDelivery
from core.settings import Settings
from core.webhooks import deliver_due

ROOT = Path(__file__).resolve().parents[2]
FINETUNE = {
    "teacher": "builtin:minilm-l6",
    "method": {"name": "finetune"},
    "dataset": {"source": "builtin:rotten_tomatoes"},
}
PUBLIC_URL = "https://93.184.215.14/hook"  # a public address literal: no DNS needed


def make_key(settings: Settings, tenant: str) -> str:
    engine = create_engine(settings.database_url)
    with Session(engine) as s:
        _, key = tenants.create_key(s, tenants.ensure_tenant(s, tenant).id, "tests")
        s.commit()
    engine.dispose()
    return key


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def record(settings: Settings, job_id: str, type_: str, n: int = 1) -> list[int]:
    """Record ``n`` events of ``type_`` (as the worker does), committed; their ids."""
    engine = create_engine(settings.database_url)
    with Session(engine) as s:
        ids = [events.record(s, job_id, type_, f"{type_} {i}", data={"i": i}).id for i in range(n)]
        s.commit()
    engine.dispose()
    return ids


def quiet(settings: Settings, **update: Any) -> Settings:
    """``settings`` with ``update`` and no dispatcher thread in the API."""
    return settings.model_copy(update={"webhook_dispatcher_in_api": False, **update})


@pytest.fixture
def key(settings: Settings) -> str:
    return make_key(settings, "test")


@pytest.fixture
def client(settings: Settings, key: str) -> Iterator[TestClient]:
    with TestClient(create_app(quiet(settings)), headers=auth(key)) as c:
        yield c


def create_private_hook(
    settings: Settings, client: TestClient, url: str, events: list[str] | None = None
) -> dict[str, Any]:
    """Create an endpoint on ``url`` (a 127.0.0.1 receiver) through an API whose operator
    allows private addresses; its JSON (with the secret)."""
    with TestClient(create_app(quiet(settings, webhook_allow_private=True))) as c:
        body: dict[str, Any] = {"url": url}
        if events is not None:
            body["events"] = events
        r = c.post("/v1/webhooks", json=body, headers=client.headers)
    assert r.status_code == 201, r.text
    return dict(r.json())


def submit(http: TestClient | httpx.Client) -> str:
    r = http.post("/v1/jobs", json=FINETUNE)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Live:
    """A real uvicorn serving ``create_app(settings)`` (lifespan included) in a thread."""

    def __init__(self, settings: Settings) -> None:
        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(
                create_app(settings), host="127.0.0.1", port=self.port, log_level="warning"
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *_: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "uvicorn (and its dispatcher) did not stop"


# --- the event log -----------------------------------------------------------------------


def test_events_are_paginated_in_order_and_filtered(client: TestClient, settings: Settings) -> None:
    job = submit(client)
    record(settings, job, "started")
    epochs = record(settings, job, "epoch", 5)
    seen: list[dict[str, Any]] = []
    after = None
    pages = 0
    while True:
        params: dict[str, Any] = {"limit": 3}
        if after is not None:
            params["after"] = after
        r = client.get(f"/v1/jobs/{job}/events", params=params)
        assert r.status_code == 200, r.text
        body = r.json()
        seen += body["events"]
        pages += 1
        after = body["next_after"]
        if after is None:
            break
        assert after == body["events"][-1]["id"]
    assert pages == 3  # 7 events: 3 + 3 + 1
    assert [e["type"] for e in seen] == ["queued", "started"] + ["epoch"] * 5
    ids = [e["id"] for e in seen]
    assert ids == sorted(ids) and len(set(ids)) == 7
    assert set(seen[0]) == {"id", "time", "level", "type", "message", "data"}
    assert seen[2]["data"] == {"i": 0} and seen[2]["level"] == "info"

    r = client.get(f"/v1/jobs/{job}/events", params={"type": "epoch", "after": epochs[1]})
    assert [e["id"] for e in r.json()["events"]] == epochs[2:]
    assert r.json()["next_after"] is None
    r = client.get(f"/v1/jobs/{job}/events", params={"type": "failed"})
    assert r.json() == {"events": [], "next_after": None}


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({"limit": 0}, "limit"),
        ({"limit": 501}, "limit"),
        ({"limit": "x"}, "limit"),
        ({"after": -1}, "after"),
        ({"after": "abc"}, "after"),
        ({"type": "exploded"}, "type"),
    ],
)
def test_bad_event_query_parameters_are_422_naming_them(
    client: TestClient, params: dict[str, Any], field: str
) -> None:
    job = submit(client)
    r = client.get(f"/v1/jobs/{job}/events", params=params)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field


def test_another_tenants_job_events_are_404(
    client: TestClient, settings: Settings, key: str
) -> None:
    job = submit(client)
    other = auth(make_key(settings, "other"))
    for path in (f"/v1/jobs/{job}/events", f"/v1/jobs/{job}/events/stream"):
        r = client.get(path, headers=other)
        assert r.status_code == 404, r.text
    assert client.get("/v1/jobs/no-such-job/events").status_code == 404
    assert client.get(f"/v1/jobs/{job}/events", headers={"Authorization": ""}).status_code == 401


# --- the stream --------------------------------------------------------------------------


def read_sse(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Parse a text/event-stream: yields {"id", "event", "data"} per event and
    {"comment": text} per comment line."""
    fields: dict[str, Any] = {}
    for line in response.iter_lines():
        if line == "":
            if "data" in fields:
                yield fields
            fields = {}
        elif line.startswith(":"):
            yield {"comment": line[1:].strip()}
        else:
            name, _, value = line.partition(":")
            fields[name] = value.removeprefix(" ")


def test_the_stream_sends_events_live_resumes_and_ends_after_the_final_one(
    settings: Settings, key: str
) -> None:
    live_settings = quiet(settings, events_stream_poll_s=0.05, events_stream_keepalive_s=0.3)
    with Live(live_settings) as url, httpx.Client(base_url=url, headers=auth(key), timeout=30) as h:
        job = submit(h)
        got: list[dict[str, Any]] = []
        comments: list[str] = []
        with h.stream("GET", f"/v1/jobs/{job}/events/stream") as r:
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            for msg in read_sse(r):
                if "comment" in msg:
                    comments.append(msg["comment"])
                    if len(comments) == 1:  # quiet long enough: the job moves on meanwhile
                        record(settings, job, "started")
                        record(settings, job, "epoch", 2)
                        assert h.post(f"/v1/jobs/{job}/cancel").status_code == 200
                    continue
                got.append(msg)
                assert len(got) < 10, got
        # The loop ended: the server closed the stream after the final event.
        assert [m["event"] for m in got] == ["queued", "started", "epoch", "epoch", "cancelled"]
        ids = [int(m["id"]) for m in got]
        assert ids == sorted(ids)
        for m in got:
            data = json.loads(m["data"])
            assert data["id"] == int(m["id"]) and data["type"] == m["event"]
        assert "keep-alive" in comments

        # Last-Event-ID resumes after that event (and wins over ?after).
        with h.stream(
            "GET",
            f"/v1/jobs/{job}/events/stream",
            params={"after": 0},
            headers={"Last-Event-ID": str(ids[2])},
        ) as r:
            rest = [m for m in read_sse(r) if "comment" not in m]
        assert [int(m["id"]) for m in rest] == ids[3:]
        # ?after works the same; after the final event, a finished job's stream ends at once.
        with h.stream("GET", f"/v1/jobs/{job}/events/stream", params={"after": ids[0]}) as r:
            assert [int(m["id"]) for m in read_sse(r) if "comment" not in m] == ids[1:]
        t0 = time.monotonic()
        with h.stream(
            "GET", f"/v1/jobs/{job}/events/stream", headers={"Last-Event-ID": str(ids[-1])}
        ) as r:
            assert [m for m in read_sse(r) if "comment" not in m] == []
        assert time.monotonic() - t0 < 5
        r = h.get(f"/v1/jobs/{job}/events/stream", headers={"Last-Event-ID": "x1"})
        assert r.status_code == 422 and r.json()["error"]["field"] == "Last-Event-ID"


def test_a_client_that_goes_away_ends_its_stream(settings: Settings, key: str) -> None:
    """A stream of a job that never finishes, dropped by its client: the server stops it (and
    shuts down promptly, which it would not with a stream still running)."""
    live_settings = quiet(settings, events_stream_poll_s=0.05, events_stream_keepalive_s=0.1)
    t0 = time.monotonic()
    with Live(live_settings) as url:
        with httpx.Client(base_url=url, headers=auth(key), timeout=30) as h:
            job = submit(h)
            with h.stream("GET", f"/v1/jobs/{job}/events/stream") as r:
                first = next(m for m in read_sse(r) if "comment" not in m)
                assert first["event"] == "queued"
        time.sleep(0.5)  # the server notices within a poll
    assert time.monotonic() - t0 < 25


# --- webhook endpoints -------------------------------------------------------------------


def test_webhook_crud_secret_shown_once_and_tenant_scoped(
    client: TestClient, settings: Settings
) -> None:
    r = client.post("/v1/webhooks", json={"url": PUBLIC_URL, "description": "ci"})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["events"] == ["job.succeeded", "job.failed", "job.cancelled", "job.checkpoint"]
    assert created["secret"].startswith("whsec_")
    assert len(base64.b64decode(created["secret"].removeprefix("whsec_"))) == 32
    r = client.post("/v1/webhooks", json={"url": PUBLIC_URL, "events": ["job.failed"]})
    assert r.status_code == 201 and r.json()["events"] == ["job.failed"]
    assert r.json()["secret"] != created["secret"]

    listed = client.get("/v1/webhooks").json()["items"]
    assert [e["id"] for e in listed] == [created["id"], r.json()["id"]]
    assert all("secret" not in e for e in listed)
    assert created["secret"] not in client.get("/v1/webhooks").text
    assert client.get(f"/v1/webhooks/{created['id']}/deliveries").json() == {
        "items": [],
        "next_after": None,
    }

    other = auth(make_key(settings, "other"))
    assert client.get("/v1/webhooks", headers=other).json()["items"] == []
    assert client.delete(f"/v1/webhooks/{created['id']}", headers=other).status_code == 404
    r = client.get(f"/v1/webhooks/{created['id']}/deliveries", headers=other)
    assert r.status_code == 404
    assert client.delete(f"/v1/webhooks/{created['id']}").status_code == 204
    assert client.delete(f"/v1/webhooks/{created['id']}").status_code == 404
    assert len(client.get("/v1/webhooks").json()["items"]) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"url": PUBLIC_URL, "events": ["job.exploded"]}, "events.0"),
        ({"url": PUBLIC_URL, "surprise": 1}, "surprise"),
        ({}, "url"),
        ({"url": PUBLIC_URL, "description": "x" * 501}, "description"),
    ],
)
def test_bad_webhook_bodies_are_422_naming_the_field(
    client: TestClient, body: dict[str, Any], field: str
) -> None:
    r = client.post("/v1/webhooks", json=body)
    assert r.status_code == 422, r.text
    assert r.json()["error"]["field"] == field


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:9/hook", "loopback"),
        ("http://10.1.2.3/hook", "private"),
        ("http://169.254.169.254/latest/meta-data", "link-local"),
        ("http://[::1]/hook", "loopback"),
        ("http://localhost:8080/hook", "loopback"),
        ("http://0.0.0.0/", "unspecified"),
        ("http://224.0.0.1/", "multicast"),
        ("http://[::ffff:10.0.0.1]/", "private"),
        ("http://100.64.0.1/", "not public"),
        ("ftp://93.184.215.14/hook", "http:// or https://"),
        ("file:///etc/passwd", "http:// or https://"),
        ("http://no-such-host.invalid/hook", "does not resolve"),
    ],
)
def test_webhook_urls_to_non_public_addresses_are_refused(
    client: TestClient, url: str, reason: str
) -> None:
    r = client.post("/v1/webhooks", json={"url": url})
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "url"
    assert reason in err["message"], err
    assert client.get("/v1/webhooks").json()["items"] == []


def test_the_operator_can_allow_private_hosts_or_set_an_allow_list(
    settings: Settings, key: str
) -> None:
    def status(s: Settings, url: str) -> tuple[int, str]:
        with TestClient(create_app(quiet(s)), headers=auth(key)) as c:
            r = c.post("/v1/webhooks", json={"url": url})
            return r.status_code, r.text

    assert status(quiet(settings, webhook_allow_private=True), "http://127.0.0.1:9/")[0] == 201
    assert status(quiet(settings, webhook_allow_private=True), "http://localhost/")[0] == 201
    assert status(quiet(settings, webhook_allow_private=True), "gopher://127.0.0.1/")[0] == 422
    listed = quiet(settings, webhook_allowed_hosts=["127.0.0.0/8", "localhost"])
    assert status(listed, "http://127.0.0.1:9/")[0] == 201
    assert status(listed, "http://localhost:9/")[0] == 201
    code, text = status(listed, PUBLIC_URL)  # public, but not on the list
    assert code == 422 and "webhook_allowed_hosts" in text
    code, text = status(listed, "http://10.0.0.1/")
    assert code == 422 and "webhook_allowed_hosts" in text


# --- deliveries --------------------------------------------------------------------------


class Receiver:
    """A real HTTP server on 127.0.0.1 that answers with ``codes`` in turn (the last one
    repeated) and checks each request's Standard Webhooks signature with ``secret``."""

    def __init__(self, codes: list[int]) -> None:
        self.codes = codes
        self.secret = ""
        self.requests: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                with receiver.lock:
                    n = len(receiver.requests)
                    receiver.requests.append(
                        {
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": body,
                            "valid": receiver.verify(self.headers, body),
                        }
                    )
                code = receiver.codes[min(n, len(receiver.codes) - 1)]
                self.send_response(code)
                self.send_header("content-length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *_: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def verify(self, headers: Any, body: bytes) -> bool:
        """The Standard Webhooks check as a receiver makes it, with the specification's
        library: the signature over ``id.timestamp.body`` and the timestamp within 5 minutes."""
        if not self.secret.startswith("whsec_"):
            return False
        try:
            Webhook(self.secret).verify(body, dict(headers.items()))
        except WebhookVerificationError:
            return False
        return True

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def wait_for(check: Callable[[], bool], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_cancelled_job_is_delivered_signed_retried_until_it_succeeds(
    settings: Settings, key: str
) -> None:
    """REQUIRED evidence: a real job transition (cancel a queued job) -> job.cancelled, sent by
    the API's dispatcher thread to a real receiver that answers 500, 500, 200."""
    live = settings.model_copy(
        update={
            "webhook_allow_private": True,
            "webhook_poll_interval_s": 0.05,
            "webhook_retry_base_s": 0.2,
            "webhook_max_attempts": 5,
        }
    )
    with (
        Receiver([500, 500, 200]) as rx,
        Live(live) as url,
        httpx.Client(base_url=url, headers=auth(key), timeout=30) as h,
    ):
        r = h.post("/v1/webhooks", json={"url": rx.url, "events": ["job.cancelled"]})
        assert r.status_code == 201, r.text
        endpoint, rx.secret = r.json()["id"], r.json()["secret"]
        job = submit(h)
        assert h.post(f"/v1/jobs/{job}/cancel").json()["status"] == "cancelled"

        def done() -> bool:
            items = h.get(f"/v1/webhooks/{endpoint}/deliveries").json()["items"]
            return bool(items) and items[0]["state"] == "succeeded"

        wait_for(done)
        deliveries = h.get(f"/v1/webhooks/{endpoint}/deliveries").json()
    assert len(rx.requests) == 3
    assert all(req["valid"] for req in rx.requests), "a signature did not verify"
    assert len({req["headers"]["webhook-id"] for req in rx.requests}) == 1  # one message
    assert len({req["body"] for req in rx.requests}) == 1
    payload = json.loads(rx.requests[0]["body"])
    assert payload["type"] == "job.cancelled"
    assert payload["data"]["job_id"] == job and payload["data"]["status"] == "cancelled"
    assert payload["data"]["event"]["type"] == "cancelled"
    assert payload["timestamp"] == payload["data"]["event"]["time"]
    # a tampered body or another secret does not verify
    bad = dict(rx.requests[0]["headers"])
    assert not rx.verify(bad, rx.requests[0]["body"] + b" ")

    (d,) = deliveries["items"]
    assert deliveries["next_after"] is None
    assert d["event_type"] == "job.cancelled" and d["job_id"] == job
    assert d["state"] == "succeeded" and d["attempts"] == 3
    assert d["status_code"] == 200 and d["error"] is None and d["next_attempt_at"] is None
    assert [a["attempt"] for a in d["attempt_log"]] == [1, 2, 3]
    assert [a["status_code"] for a in d["attempt_log"]] == [500, 500, 200]
    assert [a["error"] for a in d["attempt_log"]] == ["HTTP 500", "HTTP 500", None]
    assert all(a["response_ms"] >= 0 for a in d["attempt_log"])
    assert d["msg_id"] == rx.requests[0]["headers"]["webhook-id"]


def test_a_delivery_fails_after_the_last_attempt_and_only_subscribed_events_are_sent(
    client: TestClient, settings: Settings
) -> None:
    s = quiet(
        settings,
        webhook_allow_private=True,
        webhook_retry_base_s=0.01,
        webhook_max_attempts=3,
    )
    with Receiver([503]) as rx:
        hook = create_private_hook(settings, client, rx.url, ["job.failed"])
        endpoint, rx.secret = hook["id"], hook["secret"]
        job = submit(client)
        client.post(f"/v1/jobs/{job}/cancel")  # job.cancelled: not subscribed
        record(s, job, "failed")
        sent = 0
        deadline = time.monotonic() + 20
        while sent < 3:
            assert time.monotonic() < deadline
            sent += deliver_due(s)
            time.sleep(0.02)
        assert deliver_due(s) == 0
    (d,) = client.get(f"/v1/webhooks/{endpoint}/deliveries").json()["items"]
    assert d["event_type"] == "job.failed" and d["state"] == "failed"
    assert d["attempts"] == 3 and d["next_attempt_at"] is None
    assert [a["status_code"] for a in d["attempt_log"]] == [503, 503, 503]
    assert len(rx.requests) == 3 and all(req["valid"] for req in rx.requests)


def test_the_address_is_checked_again_at_delivery_time(
    client: TestClient, settings: Settings
) -> None:
    """Created while private hosts were allowed; the operator turns that off (or DNS now
    answers a private address): the attempt is refused and never sent."""
    with Receiver([200]) as rx:
        endpoint = create_private_hook(settings, client, rx.url)["id"]
        job = submit(client)
        client.post(f"/v1/jobs/{job}/cancel")
        strict = quiet(settings, webhook_max_attempts=1)
        assert deliver_due(strict) == 1
    assert rx.requests == []
    (d,) = client.get(f"/v1/webhooks/{endpoint}/deliveries").json()["items"]
    assert d["state"] == "failed"
    assert d["error"].startswith("refused:") and "loopback" in d["error"]
    assert d["status_code"] is None


def test_a_named_host_is_sent_to_the_address_checked_with_its_own_host_header(
    client: TestClient, settings: Settings
) -> None:
    with Receiver([200]) as rx:
        port = rx.server.server_address[1]
        hook = create_private_hook(settings, client, f"http://localhost:{port}/hook?x=1")
        rx.secret = hook["secret"]
        job = submit(client)
        client.post(f"/v1/jobs/{job}/cancel")
        assert deliver_due(quiet(settings, webhook_allow_private=True)) == 1
    (req,) = rx.requests
    assert req["valid"] and req["headers"]["host"] == f"localhost:{port}"
    (d,) = client.get(f"/v1/webhooks/{hook['id']}/deliveries").json()["items"]
    assert d["state"] == "succeeded"


def test_concurrent_dispatchers_send_each_delivery_once(
    client: TestClient, settings: Settings
) -> None:
    s = quiet(settings, webhook_allow_private=True)
    with Receiver([200]) as rx:
        rx.secret = create_private_hook(settings, client, rx.url, ["job.checkpoint"])["secret"]
        job = submit(client)
        record(s, job, "checkpoint", 40)
        counts: list[int] = []

        def run() -> None:
            counts.append(deliver_due(s))

        threads = [threading.Thread(target=run) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
    assert sum(counts) == 40
    ids = [req["headers"]["webhook-id"] for req in rx.requests]
    assert len(ids) == 40 and len(set(ids)) == 40
    assert all(req["valid"] for req in rx.requests)
    engine = create_engine(settings.database_url)
    with Session(engine) as db:
        states = list(db.scalars(select(WebhookDelivery.state)))
    engine.dispose()
    assert states == ["succeeded"] * 40


def test_the_dispatcher_process_delivers(client: TestClient, settings: Settings) -> None:
    with Receiver([204]) as rx:
        rx.secret = create_private_hook(settings, client, rx.url)["secret"]
        job = submit(client)
        client.post(f"/v1/jobs/{job}/cancel")
        env = {
            **os.environ,
            "DISTILLERY_DATABASE_URL": settings.database_url,
            "DISTILLERY_WEBHOOK_ALLOW_PRIVATE": "true",
            "PYTHONPATH": str(ROOT),
        }
        subprocess.run(
            [sys.executable, "-m", "core.webhooks_dispatch", "--once"],
            cwd=ROOT,
            env=env,
            check=True,
            timeout=120,
        )
    assert len(rx.requests) == 1 and rx.requests[0]["valid"]
    assert json.loads(rx.requests[0]["body"])["data"]["job_id"] == job


def test_a_job_failed_by_the_worker_is_delivered_as_job_failed(
    client: TestClient, settings: Settings
) -> None:
    """The worker's own transition (running -> failed, its dataset gone after submit) records
    ``failed``; the endpoint gets ``job.failed`` with the reason."""
    from worker.runner import execute

    body = "text,label\n" + "".join(f"tweet {i},{['neg', 'pos'][i % 2]}\n" for i in range(30))
    (settings.data_root / "gone.csv").write_text(body, encoding="utf-8")
    spec = {**FINETUNE, "dataset": {"source": "file://gone.csv"}}
    with Receiver([200]) as rx:
        hook = create_private_hook(settings, client, rx.url, ["job.failed", "job.succeeded"])
        rx.secret = hook["secret"]
        r = client.post("/v1/jobs", json=spec)
        assert r.status_code == 201, r.text
        job = r.json()["id"]
        (settings.data_root / "gone.csv").unlink()
        assert execute(job, settings) == "failed"
        assert deliver_due(quiet(settings, webhook_allow_private=True)) == 1
    (req,) = rx.requests
    assert req["valid"]
    payload = json.loads(req["body"])
    assert payload["type"] == "job.failed" and payload["data"]["status"] == "failed"
    assert payload["data"]["event"]["level"] == "error"
    assert payload["data"]["event"]["message"] == client.get(f"/v1/jobs/{job}").json()["error"]
    types = [e["type"] for e in client.get(f"/v1/jobs/{job}/events").json()["events"]]
    assert types[0] == "queued" and types[1] == "started" and types[-1] == "failed"
