"""A job's ``name`` and ``metadata`` over HTTP, on a migrated PostgreSQL with a real Redis
broker: stored and returned, validated with field-named 422s, filterable in ``GET /v1/jobs``
and on the dashboard's list; uploads named by their filename beside their id in submit errors
and on the dashboard; every unknown setting of a spec reported in one 422."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from core.settings import Settings
from tests.integration.test_files import csv_bytes, rows, upload
from tests.integration.test_ui import _metrics, _succeed, login

SPEC: dict[str, Any] = {
    "teacher": "builtin:minilm-l6",
    "method": {"name": "finetune"},
    "dataset": {"source": "builtin:rotten_tomatoes"},
}


@pytest.fixture
def client(settings: Settings, key_headers: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers=key_headers, follow_redirects=False) as c:
        yield c


def submit(client: TestClient, **extra: Any) -> dict[str, Any]:
    r = client.post("/v1/jobs", json={**SPEC, **extra})
    assert r.status_code == 201, r.text
    return dict(r.json())


def ids(client: TestClient, query: str) -> list[str]:
    r = client.get(f"/v1/jobs?{query}")
    assert r.status_code == 200, r.text
    return [j["id"] for j in r.json()["items"]]


def test_name_and_metadata_are_stored_returned_and_filterable(client: TestClient) -> None:
    a = submit(client, name="  sst2 baseline ", metadata={"team": "nlp", "run": "1"})
    b = submit(client, name="sst2 small", metadata={"team": "nlp", "run": "2"})
    c = submit(client)
    assert a["name"] == "sst2 baseline" and a["metadata"] == {"team": "nlp", "run": "1"}
    assert c["name"] is None and c["metadata"] == {}
    assert "name" not in a["spec"] and "metadata" not in a["spec"]  # the worker's spec
    got = client.get(f"/v1/jobs/{a['id']}").json()
    assert (got["name"], got["metadata"]) == ("sst2 baseline", {"team": "nlp", "run": "1"})
    assert ids(client, "name=sst2%20small") == [b["id"]]
    assert ids(client, "name=sst2") == []  # exact
    assert ids(client, "name_contains=SST2") == [b["id"], a["id"]]
    assert ids(client, "name_contains=100%25") == []  # % is literal
    assert ids(client, "metadata=team=nlp") == [b["id"], a["id"]]
    assert ids(client, "metadata=team=nlp&metadata=run=1") == [a["id"]]
    assert ids(client, "metadata=team=nlp&status=queued&name_contains=small") == [b["id"]]
    assert ids(client, "metadata=team=cv") == []
    bad = client.get("/v1/jobs?metadata=team")
    assert bad.status_code == 422 and bad.json()["error"]["field"] == "metadata"
    assert "key=value" in bad.json()["error"]["message"]


@pytest.mark.parametrize(
    ("extra", "field", "reason"),
    [
        ({"name": "x" * 129}, "name", "at most 128"),
        ({"name": "  "}, "name", "must not be empty"),
        ({"name": "a\nb"}, "name", "control characters"),
        ({"metadata": {"bad key": "v"}}, "metadata", "keys are 1 to 64"),
        ({"metadata": {"k": 3}}, "metadata.k", "string"),
        ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16"),
        ({"metadata": {"k": "v" * 513}}, "metadata", "at most 512"),
        ({"metadata": ["k"]}, "metadata", "dictionary"),
    ],
)
def test_bad_name_or_metadata_is_a_422_naming_the_field(
    client: TestClient, extra: dict[str, Any], field: str, reason: str
) -> None:
    r = client.post("/v1/jobs", json={**SPEC, **extra})
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["field"] == field and reason in error["message"], error
    assert client.get("/v1/jobs").json()["items"] == []


def test_an_idempotent_retry_with_another_name_is_refused(client: TestClient) -> None:
    headers = {"Idempotency-Key": "k-1"}
    first = client.post("/v1/jobs", json={**SPEC, "name": "a"}, headers=headers)
    again = client.post("/v1/jobs", json={**SPEC, "name": "a"}, headers=headers)
    assert first.status_code == again.status_code == 201
    assert again.json()["id"] == first.json()["id"]
    other = client.post("/v1/jobs", json={**SPEC, "name": "b"}, headers=headers)
    assert other.status_code == 422, other.text


def test_every_unknown_setting_is_reported_in_one_422(client: TestClient) -> None:
    r = client.post(
        "/v1/jobs",
        json={
            **SPEC,
            "method": {"name": "vanilla_kd", "alpah": 0.5, "temprature": 2},
            "training": {"epoch": 1},
        },
    )
    assert r.status_code == 422
    error = r.json()["error"]
    fields = [d["field"] for d in error["details"]]
    assert set(fields) == {"method.alpah", "method.temprature", "training.epoch"}
    for f in fields:
        assert f in error["message"], error["message"]
    assert "valid settings" in error["message"]


def test_uploads_are_named_by_filename_in_errors_and_on_the_dashboard(
    client: TestClient, settings: Settings, key_headers: dict[str, str]
) -> None:
    data = upload(client, "reviews.csv", csv_bytes(rows())).json()
    wrong = client.post("/v1/jobs", json={**SPEC, "teacher": data["id"]})
    assert wrong.status_code == 422
    assert f"{data['id']!r} (reviews.csv)" in wrong.json()["error"]["message"]
    # a message written with the id alone gets the filename beside it, once
    dataset = {"source": data["id"], "text_column": "review"}
    again = client.post("/v1/jobs", json={**SPEC, "dataset": dataset})
    assert again.status_code == 422, again.text
    message = again.json()["error"]["message"]
    assert message.startswith(f"{data['id']} (reviews.csv) has no column 'review'"), message
    assert message.count("reviews.csv") == 1
    job = submit(client, name="my reviews", dataset={"source": data["id"]})
    submit(client, name="other")
    login(client, key_headers["Authorization"].removeprefix("Bearer "))
    page = client.get("/ui/jobs").text
    assert "my reviews" in page and "other" in page
    assert f"{data['id']} (reviews.csv)" in page and "<th>dataset</th>" in page
    filtered = client.get("/ui/jobs?name=REVIEWS").text
    assert job["id"] in filtered and "other" not in filtered.split('id="jobs"')[1]
    assert 'value="REVIEWS"' in filtered
    one = client.get(f"/ui/jobs/{job['id']}").text
    assert '<span id="job-name">my reviews</span>' in one
    assert f"{data['id']} (reviews.csv)" in one
    # the compare page groups students by dataset, an upload named by its filename
    _succeed(settings, job["id"], _metrics(0.8, 0.002))
    compare = client.get("/ui/compare").text
    assert f"{data['id']} (reviews.csv) · test accuracy" in compare, compare
