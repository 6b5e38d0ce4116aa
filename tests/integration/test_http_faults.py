"""Issue 20, faults 3, 4 and 7, on a real stack: uvicorn (a process of its own, from
``devstack.stack.running_stack``, no worker), PostgreSQL and Redis, over real HTTP.

- 3: a request without a key is answered 401 before its body is read (the body is not
  consumed, the server's memory does not grow), on every route; the multipart exemption from
  the JSON limit holds only on ``POST /v1/files``, whose own cap is enforced while streaming.
- 4: an open event stream ends within its re-check interval once its key is revoked.
- 7: a JSONL line nested 100k levels deep is a 422 naming the line, as an upload and as a
  submitted dataset; 20 concurrent submits with a hung broker each answer 503 within the
  publish deadline.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bench.http_faults import (
    FINETUNE,
    MIB,
    MULTIPART,
    auth,
    concurrent_submits,
    hung_broker_api,
    multipart_head,
    rss,
    stream_huge,
)
from devstack.stack import Stack, running_stack
from tests.integration.conftest import new_key

UPLOAD_CAP = 2 * MIB
AUTH_CHECK_S = 1.0
STREAM_POLL_S = 0.2
EARLY = 48 * MIB
"""At most this much may leave the client before the server's answer stops it (loopback socket
buffers on both sides hold a few MiB)."""
MEMORY_GROWTH = 48 * MIB


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, pg_url: str, e2e_broker_url: str
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("http-faults")
    with running_stack(
        workdir,
        database_url=pg_url,
        broker_url=e2e_broker_url,
        workers=0,
        extra_env={
            "DISTILLERY_MAX_UPLOAD_BYTES": str(UPLOAD_CAP),
            "DISTILLERY_EVENTS_STREAM_AUTH_CHECK_S": str(AUTH_CHECK_S),
            "DISTILLERY_EVENTS_STREAM_POLL_S": str(STREAM_POLL_S),
            "DISTILLERY_WEBHOOK_DISPATCHER_IN_API": "false",
        },
    ) as s:
        yield s


@pytest.mark.parametrize(
    ("path", "headers"),
    [
        ("/v1/jobs", MULTIPART),  # the curl: a multipart body on a JSON route
        ("/v1/files", MULTIPART),  # the upload route itself
        ("/v1/jobs", {"content-type": "application/json"}),
        ("/v1/keys", MULTIPART),
    ],
)
def test_a_huge_body_without_a_key_is_401_before_it_is_read(
    stack: Stack, path: str, headers: dict[str, str]
) -> None:
    pid = stack.processes["api"].pid
    before = rss(pid)
    t0 = time.monotonic()
    r, sent = stream_huge(stack.base_url + path, headers, pid, multipart_head())
    took = time.monotonic() - t0
    assert r.status_code == 401, r.text
    assert r.json()["error"]["code"] == "unauthorized"
    assert r.headers["www-authenticate"] == "Bearer"
    assert sent.bytes < EARLY, f"{sent.bytes / MIB:.0f} MiB sent before the 401"
    assert sent.peak_rss - before < MEMORY_GROWTH, (before, sent.peak_rss)
    assert took < 10, took
    # a revoked or made-up key is the same
    r, sent = stream_huge(
        stack.base_url + path, {**headers, **auth("dk_abcdefgh_" + "x" * 40)}, pid
    )
    assert r.status_code == 401 and sent.bytes < EARLY


def test_a_dashboard_form_without_a_login_is_redirected_before_its_body_is_read(
    stack: Stack,
) -> None:
    pid = stack.processes["api"].pid
    before = rss(pid)
    form = {"content-type": "application/x-www-form-urlencoded"}
    r, sent = stream_huge(stack.base_url + "/ui/jobs/new", form, pid, b"spec=")
    assert r.status_code == 303, r.text
    assert r.headers["location"].startswith("/ui/login")
    assert sent.bytes < EARLY, f"{sent.bytes / MIB:.0f} MiB sent before the redirect"
    assert sent.peak_rss - before < MEMORY_GROWTH


def test_an_upload_over_the_cap_is_413_while_it_streams(stack: Stack) -> None:
    pid = stack.processes["api"].pid
    before = rss(pid)
    r, sent = stream_huge(
        stack.base_url + "/v1/files", {**MULTIPART, **auth(stack.api_key)}, pid, multipart_head()
    )
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["code"] == "too_large" and err["field"] == "file"
    assert err["details"] == {"limit_bytes": UPLOAD_CAP}
    assert f"{UPLOAD_CAP} bytes" in err["message"]
    assert sent.bytes < EARLY, f"{sent.bytes / MIB:.0f} MiB sent before the 413"
    assert sent.peak_rss - before < MEMORY_GROWTH
    assert not any((Path(stack.env["DISTILLERY_UPLOADS_ROOT"])).rglob("*.csv"))
    # a declared length over the cap: 413 at once, with none of the body sent
    head = {**MULTIPART, **auth(stack.api_key), "content-length": str(UPLOAD_CAP * 2)}
    assert raw_status(stack.base_url, "/v1/files", head) == 413


def raw_status(base_url: str, path: str, headers: dict[str, str]) -> int:
    """The status of a POST whose head alone is sent (its body never is)."""
    url = httpx.URL(base_url)
    head = f"POST {path} HTTP/1.1\r\nhost: {url.host}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items()) + "\r\n"
    with socket.create_connection((url.host, url.port or 80), timeout=10) as s:
        s.sendall(head.encode())
        answer = s.recv(65536)
    return int(answer.split(b" ", 2)[1])


def test_multipart_on_another_route_has_the_json_limit(stack: Stack) -> None:
    """The exemption is the upload route's only: a multipart body sent to ``POST /v1/jobs``
    with a valid key is cut at 1 MiB."""
    pid = stack.processes["api"].pid
    r, sent = stream_huge(
        stack.base_url + "/v1/jobs", {**MULTIPART, **auth(stack.api_key)}, pid, multipart_head()
    )
    assert r.status_code == 413, r.text
    assert r.json()["error"]["details"] == {"limit_bytes": MIB}
    assert sent.bytes < EARLY


def test_an_upload_under_the_cap_still_works(stack: Stack) -> None:
    rows = "".join(f"review {i},{'pos' if i % 2 else 'neg'}\n" for i in range(40))
    r = httpx.post(
        stack.base_url + "/v1/files",
        headers=auth(stack.api_key),
        files={"file": ("ok.csv", ("text,label\n" + rows).encode())},
        data={"purpose": "dataset"},
    )
    assert r.status_code == 201, r.text


# --- 4: an open event stream outlives its key --------------------------------------------------


def test_an_open_event_stream_ends_once_its_key_is_revoked(stack: Stack) -> None:
    admin = httpx.Client(base_url=stack.base_url, headers=auth(stack.api_key), timeout=30)
    made = admin.post("/v1/keys", json={"name": "stream"}).json()
    job = admin.post("/v1/jobs", json=FINETUNE)
    assert job.status_code == 201, job.text  # queued; no worker, so it stays open
    url = f"{stack.base_url}/v1/jobs/{job.json()['id']}/events/stream"
    lines: list[str] = []
    revoked_at: list[float] = []
    with httpx.stream("GET", url, headers=auth(made["key"]), timeout=15) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            lines.append(line)
            if line.startswith("event: queued") and not revoked_at:
                assert admin.delete(f"/v1/keys/{made['id']}").status_code == 200
                revoked_at.append(time.monotonic())
        closed_after = time.monotonic() - revoked_at[0]
    assert closed_after < AUTH_CHECK_S + STREAM_POLL_S + 2.0, closed_after
    assert "revoked" in [x for x in lines if x.startswith(":")][-1]
    again = httpx.get(url, headers=auth(made["key"]))
    assert again.status_code == 401
    admin.close()


# --- 7: deep JSON, a hung broker ---------------------------------------------------------------


def deep_jsonl(depth: int = 100_000) -> bytes:
    return (
        '{"text": "fine", "label": "pos"}\n{"text": "good", "label": "neg"}\n'
        + '{"text": "deep", "label": "pos", "x": '
        + "[" * depth
        + "]" * depth
        + "}\n"
    ).encode()


def test_a_deeply_nested_jsonl_line_is_422_naming_the_line(stack: Stack) -> None:
    key = auth(stack.api_key)
    r = httpx.post(
        stack.base_url + "/v1/files",
        headers=key,
        files={"file": ("deep.jsonl", deep_jsonl())},
        data={"purpose": "dataset"},
    )
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "file"
    assert "deep.jsonl: line 3 nests JSON" in err["message"]
    (Path(stack.env["DISTILLERY_DATA_ROOT"]) / "deep.jsonl").write_bytes(deep_jsonl())
    spec = {**FINETUNE, "dataset": {"source": "file://deep.jsonl"}}
    r = httpx.post(stack.base_url + "/v1/jobs", headers=key, json=spec, timeout=30)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["field"] == "dataset.source"
    assert "line 3 nests JSON" in err["message"]


@pytest.fixture
def hung_api(pg_url: str, tmp_path: Path) -> Iterator[tuple[str, str, float]]:
    """The app under a real uvicorn whose broker accepts TCP and never answers
    (:func:`bench.http_faults.hung_broker_api`); yields (base URL, a key, the publish
    deadline in s)."""
    deadline_s = 4.0
    with hung_broker_api(pg_url, deadline_s, tmp_path) as url:
        yield url, new_key(pg_url, "hung-broker"), deadline_s


def test_concurrent_submits_with_a_hung_broker_keep_the_deadline(
    hung_api: tuple[str, str, float],
) -> None:
    """20 submits at once, the broker silent: each is a 503 within the publish deadline plus
    a margin (before: each held a database connection while waiting, so the pool's 15 made
    the others wait for a whole deadline more)."""
    url, key, deadline_s = hung_api
    results = concurrent_submits(url, key, 20)
    assert len(results) == 20
    assert {status for status, _ in results} == {503}
    took = sorted(round(t, 2) for _, t in results)
    assert took[-1] < deadline_s + 3.0, f"answer times (s): {took}"
