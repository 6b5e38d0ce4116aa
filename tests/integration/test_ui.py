"""The dashboard (``/ui``) on a migrated PostgreSQL with a real Redis broker, through
FastAPI's TestClient: the login cookie and its checks, tenant scoping, the submit form's errors,
the job, curves and compare pages of a job whose stored metrics are those a worker writes,
and cookie downloads. The browser test (tests/e2e/test_dashboard.py) runs the same pages on a
live stack with a real job."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from api.main import create_app
from api.ui.session import COOKIE
from core import repository, tenants
from core.db import utcnow
from core.settings import Settings
from tests.integration.conftest import new_key

FINETUNE: dict[str, Any] = {
    "teacher": "builtin:minilm-l6",
    "method": {"name": "finetune"},
    "dataset": {"source": "builtin:rotten_tomatoes"},
}


@pytest.fixture
def app_client(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(settings), follow_redirects=False) as c:
        yield c


def login(client: TestClient, key: str) -> None:
    r = client.post("/ui/login", data={"key": key, "next": "/ui/jobs"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs", r.text


def api_submit(client: TestClient, key: str, spec: dict[str, Any] = FINETUNE) -> str:
    r = client.post("/v1/jobs", json=spec, headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_pages_redirect_to_login_and_bad_keys_are_shown(
    app_client: TestClient, settings: Settings
) -> None:
    r = app_client.get("/ui/jobs?status=queued")
    assert r.status_code == 303
    assert r.headers["location"] == "/ui/login?next=/ui/jobs%3Fstatus%3Dqueued"
    assert app_client.get("/ui").headers["location"] == "/ui/jobs"
    # an htmx fragment: htmx is told to go to the login page
    frag = app_client.get("/ui/jobs/x/live", headers={"HX-Request": "true"})
    assert frag.status_code == 204 and frag.headers["HX-Redirect"].startswith("/ui/login")
    page = app_client.get("/ui/login?next=/ui/jobs")
    assert page.status_code == 200 and 'name="key"' in page.text
    for key, reason in (
        ("", "paste an API key"),
        ("nonsense", "malformed API key"),
        ("dk_abcdefgh_" + "x" * 40, "invalid API key"),
    ):
        bad = app_client.post("/ui/login", data={"key": key})
        assert bad.status_code == 401 and reason in bad.text, bad.text
        assert COOKIE not in bad.headers.get("set-cookie", "")
    # the static files need no login
    js = app_client.get("/ui/static/htmx.min.js")
    assert js.status_code == 200 and "htmx.org 2.0.11" in js.text[:200]


def test_login_cookie_flags_scoping_revocation_and_logout(
    app_client: TestClient, settings: Settings
) -> None:
    key = new_key(settings.database_url, "alpha")
    other_key = new_key(settings.database_url, "beta")
    mine = api_submit(app_client, key)
    theirs = api_submit(app_client, other_key)
    r = app_client.post("/ui/login", data={"key": key, "next": "//evil.example/"})
    assert r.status_code == 303 and r.headers["location"] == "/ui/jobs"  # no open redirect
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={key}") and "HttpOnly" in cookie
    assert "SameSite=strict" in cookie or "SameSite=Strict" in cookie
    assert "Path=/ui" in cookie and "Max-Age=43200" in cookie

    listed = app_client.get("/ui/jobs")
    assert listed.status_code == 200 and mine in listed.text and theirs not in listed.text
    assert "alpha" in listed.text
    assert mine in app_client.get("/ui/jobs?status=queued").text
    assert mine not in app_client.get("/ui/jobs?status=succeeded").text
    bad_filter = app_client.get("/ui/jobs?status=sleeping")
    assert bad_filter.status_code == 422 and "status" in bad_filter.text
    # another tenant's job: the same 404 page as a missing one, and no download
    for path in (f"/ui/jobs/{theirs}", f"/ui/jobs/{theirs}/curves", f"/ui/jobs/{theirs}/archive"):
        nf = app_client.get(path)
        assert nf.status_code == 404 and "no job" in nf.text and "<html" in nf.text
    assert app_client.get(f"/ui/jobs/{mine}").status_code == 200
    # cookie download of an unfinished job: the API's 409, as a page
    assert app_client.get(f"/ui/jobs/{mine}/archive").status_code == 409

    # the key is revoked: the cookie stops working at once
    with Session(create_engine(settings.database_url)) as s:
        row = tenants.authenticate(s, key)
        tenants.revoke_key(s, row.id)
        s.commit()
    gone = app_client.get("/ui/jobs")
    assert gone.status_code == 303 and "was%20revoked" in gone.headers["location"]
    assert f'{COOKIE}=""' in gone.headers["set-cookie"]  # the stale cookie is dropped
    login(app_client, other_key)
    assert theirs in app_client.get("/ui/jobs").text
    out = app_client.post("/ui/logout")
    assert out.status_code == 303 and f'{COOKIE}=""' in out.headers["set-cookie"]
    assert app_client.get("/ui/jobs").status_code == 303


def test_submit_form_shows_field_errors_and_submits(
    app_client: TestClient, settings: Settings
) -> None:
    login(app_client, new_key(settings.database_url, "alpha"))
    form = app_client.get("/ui/jobs/new")
    assert form.status_code == 200 and 'name="spec"' in form.text
    bad = {**FINETUNE, "training": {"epochs": 0}}
    r = app_client.post("/ui/jobs/new", data={"spec": json.dumps(bad), "token": "t1"})
    assert r.status_code == 422 and "training.epochs" in r.text
    assert "greater than or equal to 1" in r.text
    unknown = "teacher: builtin:minilm-l6\nmethod: {name: finetune, temprature: 2}\n"
    unknown += "dataset: {source: builtin:rotten_tomatoes}\n"
    r = app_client.post("/ui/jobs/new", data={"spec": unknown, "token": "t1"})
    assert r.status_code == 422 and "method.temprature" in r.text
    r = app_client.post("/ui/jobs/new", data={"spec": "teacher: [oops", "token": "t1"})
    assert r.status_code == 422 and "neither JSON nor YAML" in r.text
    r = app_client.post("/ui/jobs/new", data={"spec": "- a list", "token": "t1"})
    assert r.status_code == 422 and "must be a mapping" in r.text
    # a reference checked by the service (as POST /v1/jobs): its field and reason
    missing = {**FINETUNE, "teacher": "job:00000000-0000-0000-0000-000000000000"}
    r = app_client.post("/ui/jobs/new", data={"spec": json.dumps(missing), "token": "t1"})
    assert r.status_code == 422 and "teacher" in r.text and "no such job" in r.text

    yaml_spec = "teacher: builtin:minilm-l6\nmethod: {name: finetune}\n"
    yaml_spec += "dataset: {source: builtin:rotten_tomatoes}\ntraining: {max_steps: 2}\n"
    ok = app_client.post("/ui/jobs/new", data={"spec": yaml_spec, "token": "t1"})
    assert ok.status_code == 303 and ok.headers["location"].startswith("/ui/jobs/")
    job_id = ok.headers["location"].rsplit("/", 1)[1]
    again = app_client.post("/ui/jobs/new", data={"spec": yaml_spec, "token": "t1"})
    assert again.headers["location"] == ok.headers["location"]  # the token: one job
    page = app_client.get(f"/ui/jobs/{job_id}")
    assert (
        page.status_code == 200 and "queued" in page.text and 'hx-trigger="every 2s"' in page.text
    )
    live = app_client.get(f"/ui/jobs/{job_id}/live?was=queued", headers={"HX-Request": "true"})
    assert live.status_code == 200 and "HX-Refresh" not in live.headers
    cancelled = app_client.post(f"/ui/jobs/{job_id}/cancel")
    assert cancelled.status_code == 303
    live = app_client.get(f"/ui/jobs/{job_id}/live?was=queued", headers={"HX-Request": "true"})
    assert live.headers["HX-Refresh"] == "true" and "hx-trigger" not in live.text


def _succeed(settings: Settings, job_id: str, metrics: dict[str, Any]) -> None:
    """Mark ``job_id`` succeeded with ``metrics`` and the files a worker publishes (a tiny
    model.safetensors, metrics.json and a train log), as worker/runner.py's _publish does."""
    out = Path(settings.artifacts_root) / job_id
    out.mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"\0" * 64)
    (out / "metrics.json").write_text(json.dumps(metrics))
    (out / "train_log.jsonl").write_text(
        "".join(
            json.dumps({"event": "step", "stage": "finetune", "step": s, "loss": 1 / s}) + "\n"
            for s in range(1, 9)
        )
    )
    files = [
        (p.name, p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(out.iterdir())
    ]
    with Session(create_engine(settings.database_url)) as s:
        assert repository.claim(s, job_id, "w")
        repository.replace_artifacts(s, job_id, files)
        assert repository.transition(
            s, job_id, ("running",), "succeeded", metrics=metrics, finished_at=utcnow()
        )
        s.commit()


def _metrics(acc: float, latency_s: float) -> dict[str, Any]:
    return {
        "task": "classification",
        "selection_metric": "accuracy",
        "test": {"accuracy": acc, "macro_f1": acc - 0.05},
        "student": {
            "parameters": 22_000_000,
            "latency_s_batch1": latency_s,
            "latency_s_batch32": latency_s / 4,
            "bytes": 90_000_000,
        },
        "epochs": [
            {
                "stage": "finetune",
                "epoch": 1,
                "step": 4,
                "at": "epoch_end",
                "train_loss": 0.7,
                "dev": {"accuracy": acc - 0.1},
            },
            {
                "stage": "finetune",
                "epoch": 2,
                "step": 8,
                "at": "epoch_end",
                "train_loss": 0.5,
                "dev": {"accuracy": acc},
            },
        ],
        "stages": [
            {
                "name": "finetune",
                "index": 1,
                "loss": "ce",
                "steps": 8,
                "epochs": 2,
                "learning_rate": 2e-5,
                "best_dev": {"accuracy": acc},
                "seconds": 3.5,
            }
        ],
        "device": "cpu",
    }


def test_job_curves_compare_and_downloads_of_succeeded_jobs(
    app_client: TestClient, settings: Settings
) -> None:
    key = new_key(settings.database_url, "alpha")
    fast, slow, beaten = (api_submit(app_client, key) for _ in range(3))
    _succeed(settings, fast, _metrics(0.80, 0.002))
    _succeed(settings, slow, _metrics(0.85, 0.010))
    _succeed(settings, beaten, _metrics(0.78, 0.004))
    other = api_submit(app_client, new_key(settings.database_url, "beta"))
    _succeed(settings, other, _metrics(0.99, 0.001))
    login(app_client, key)

    page = app_client.get(f"/ui/jobs/{fast}")
    assert page.status_code == 200 and 'id="teacher-vs-student"' in page.text
    assert "0.8" in page.text and "2 ms" in page.text and "hx-trigger" not in page.text
    for name in ("model.safetensors", "metrics.json", "train_log.jsonl"):
        assert f"/ui/jobs/{fast}/artifacts/{name}" in page.text

    curves = app_client.get(f"/ui/jobs/{fast}/curves")
    assert curves.status_code == 200 and curves.text.count("<svg") == 2
    assert "train_log.jsonl" in curves.text and 'id="evaluations"' in curves.text

    archive = app_client.get(f"/ui/jobs/{fast}/archive")
    assert archive.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(archive.content), mode="r:gz") as tar:
        assert f"{fast}/model.safetensors" in tar.getnames()
    one = app_client.get(f"/ui/jobs/{fast}/artifacts/metrics.json")
    assert one.status_code == 200 and json.loads(one.content)["test"]["accuracy"] == 0.8
    assert app_client.get(f"/ui/jobs/{fast}/artifacts/nope.bin").status_code == 404

    compare = app_client.get("/ui/compare")
    assert compare.status_code == 200 and other not in compare.text
    rows = compare.text.split('<tr class="')[1:]
    front = [r for r in rows if r.startswith("front")]
    assert len(front) == 2 and fast in front[0] and slow in front[1]
    assert beaten in compare.text and compare.text.count('class="point front"') == 2
