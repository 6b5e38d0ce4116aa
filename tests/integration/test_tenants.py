"""API keys and tenants on a migrated PostgreSQL with a real Redis broker: 401s, the keys API,
every job route scoped to the caller's tenant, ``job:`` references across tenants, quotas and
the admin command."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session

from api.main import create_app
from core import quotas, repository, tenants
from core.settings import Settings
from kd_engine.references import builtin_model_path

ROOT = Path(__file__).resolve().parents[2]
FINETUNE = {
    "teacher": "builtin:minilm-l6",
    "method": {"name": "finetune"},
    "dataset": {"source": "builtin:rotten_tomatoes"},
}


def make_key(db: Session, tenant: str, name: str = "tests") -> str:
    """A new key of ``tenant`` (created if missing), committed."""
    _, key = tenants.create_key(db, tenants.ensure_tenant(db, tenant).id, name)
    db.commit()
    return key


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def app(settings: Settings) -> FastAPI:
    return create_app(settings)


@pytest.fixture
def anon(app: FastAPI) -> Iterator[TestClient]:
    """A client that sends no key."""
    with TestClient(app) as c:
        yield c


@pytest.fixture
def alice(app: FastAPI, db: Session) -> Iterator[TestClient]:
    """A client of tenant ``alice``."""
    with TestClient(app, headers=auth(make_key(db, "alice"))) as c:
        yield c


@pytest.fixture
def bob(app: FastAPI, db: Session) -> Iterator[TestClient]:
    """A client of tenant ``bob``."""
    with TestClient(app, headers=auth(make_key(db, "bob"))) as c:
        yield c


def assert_401(r: Any, words: str = "") -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    err = r.json()["error"]
    assert err["code"] == "unauthorized"
    assert words in err["message"], err


def test_every_route_but_health_and_docs_needs_a_key(app: FastAPI, anon: TestClient) -> None:
    """Every operation of the OpenAPI schema (so a router added later is covered too)."""
    checked = 0
    for template, operations in app.openapi()["paths"].items():
        if template == "/healthz":
            continue
        path = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), template)
        for method in operations:
            r = anon.request(method.upper(), path, json={})
            assert_401(r, "missing API key")
            checked += 1
    assert checked >= 11  # jobs (8 operations) and keys (3)
    for path in ("/healthz", "/docs", "/openapi.json"):
        assert anon.get(path).status_code == 200, path
    scheme = anon.get("/openapi.json").json()["components"]["securitySchemes"]["ApiKey"]
    assert scheme == {**scheme, "type": "http", "scheme": "bearer"}


def test_malformed_wrong_and_revoked_keys_are_401(
    anon: TestClient, alice: TestClient, db: Session
) -> None:
    key = make_key(db, "carol")
    prefix, sep, secret = key[:11], key[11], key[12:]  # the secret may hold '_' itself
    assert prefix.startswith("dk_") and sep == "_" and len(secret) >= 43
    assert anon.get("/v1/jobs", headers=auth(key)).status_code == 200
    assert_401(anon.get("/v1/jobs", headers={"Authorization": key}), "Bearer <key>")
    assert_401(anon.get("/v1/jobs", headers={"Authorization": f"Basic {key}"}), "Bearer <key>")
    assert_401(anon.get("/v1/jobs", headers=auth("not-a-key")), "malformed")
    wrong_secret = prefix + "_" + ("A" if secret[0] != "A" else "B") + secret[1:]
    assert_401(anon.get("/v1/jobs", headers=auth(wrong_secret)), "invalid API key")
    unknown = "dk_zzzzzzzz_" + secret
    assert_401(anon.get("/v1/jobs", headers=auth(unknown)), "invalid API key")
    # revoked by the admin function (the API's DELETE is tested below): 401 at once
    row = next(k for k in tenants.list_keys(db, tenants.ensure_tenant(db, "carol").id))
    tenants.revoke_key(db, row.id)
    db.commit()
    assert_401(anon.get("/v1/jobs", headers=auth(key)), "revoked")
    assert_401(anon.post("/v1/jobs", json=FINETUNE, headers=auth(key)), "revoked")
    assert alice.get("/v1/jobs").status_code == 200  # other keys are unaffected


def test_keys_api_creates_lists_and_revokes_within_the_tenant(
    anon: TestClient, alice: TestClient, bob: TestClient
) -> None:
    r = alice.post("/v1/keys", json={"name": "ci"})
    assert r.status_code == 201, r.text
    created = r.json()
    assert created["name"] == "ci" and created["revoked_at"] is None
    assert created["key"].startswith(created["prefix"] + "_")
    new = created["key"]
    assert anon.get("/v1/jobs", headers=auth(new)).status_code == 200
    listing = alice.get("/v1/keys").json()["items"]
    assert [k["name"] for k in listing] == ["tests", "ci"]
    assert all(
        set(k) == {"id", "prefix", "name", "created_at", "revoked_at", "last_used_at"}
        for k in listing
    )
    assert new not in json.dumps(listing)
    assert [k["name"] for k in bob.get("/v1/keys").json()["items"]] == ["tests"]
    # bob cannot see or revoke alice's key; nor can anyone revoke an unknown or malformed id
    for path in (f"/v1/keys/{created['id']}", f"/v1/keys/{uuid.uuid4()}", "/v1/keys/nope"):
        r = bob.delete(path)
        assert r.status_code == 404, path
        assert r.json()["error"]["code"] == "not_found"
    assert anon.get("/v1/jobs", headers=auth(new)).status_code == 200
    r = alice.delete(f"/v1/keys/{created['id']}")
    assert r.status_code == 200
    assert r.json()["revoked_at"] is not None
    assert_401(anon.get("/v1/jobs", headers=auth(new)), "revoked")
    again = alice.delete(f"/v1/keys/{created['id']}").json()  # revoking twice changes nothing
    assert again["revoked_at"] == r.json()["revoked_at"]
    bad = alice.post("/v1/keys", json={"name": "a\u0000b"})
    assert bad.status_code == 422
    assert bad.json()["error"]["field"] == "name"
    assert alice.post("/v1/keys", json={"name": "x" * 101}).status_code == 422


def test_a_key_may_revoke_itself(anon: TestClient, db: Session) -> None:
    key = make_key(db, "dave")
    own = anon.get("/v1/keys", headers=auth(key)).json()["items"][0]
    r = anon.delete(f"/v1/keys/{own['id']}", headers=auth(key))
    assert r.status_code == 200
    assert_401(anon.get("/v1/keys", headers=auth(key)), "revoked")


def succeeded_job_with_a_model(client: TestClient, settings: Settings, db: Session) -> str:
    """A job of ``client``'s tenant made succeeded, with a classifier config and a weights
    file stored as its artifacts."""
    job_id = str(client.post("/v1/jobs", json=FINETUNE).json()["id"])
    assert repository.claim(db, job_id, "w")
    assert repository.transition(db, job_id, ("running",), "succeeded")
    config = json.loads((builtin_model_path("minilm-l6") / "config.json").read_text())
    config.update(
        {
            "architectures": ["BertForSequenceClassification"],
            "id2label": {"0": "rotten", "1": "fresh"},
        }
    )
    store = settings.artifacts_root / job_id
    store.mkdir()
    (store / "config.json").write_text(json.dumps(config))
    (store / "model.safetensors").write_bytes(b"\0" * 100)
    repository.replace_artifacts(
        db,
        job_id,
        [
            ("config.json", (store / "config.json").stat().st_size, "0" * 64),
            ("model.safetensors", 100, "1" * 64),
        ],
    )
    db.commit()
    return job_id


def test_another_tenants_job_is_404_on_every_route_and_lists_are_separate(
    alice: TestClient, bob: TestClient, settings: Settings, db: Session
) -> None:
    done = succeeded_job_with_a_model(alice, settings, db)
    queued = alice.post("/v1/jobs", json=FINETUNE).json()["id"]
    own = bob.post("/v1/jobs", json=FINETUNE).json()["id"]
    reads = [
        ("GET", "/v1/jobs/{id}"),
        ("GET", "/v1/jobs/{id}/metrics"),
        ("GET", "/v1/jobs/{id}/artifacts"),
        ("GET", "/v1/jobs/{id}/artifacts/config.json"),
        ("GET", "/v1/jobs/{id}/archive"),
    ]
    for method, template in reads:
        assert alice.request(method, template.format(id=done)).status_code == 200, template
        r = bob.request(method, template.format(id=done))
        missing = bob.request(method, template.format(id="0" * 8 + done[8:]))
        assert r.status_code == missing.status_code == 404, template
        assert r.json()["error"]["message"] == missing.json()["error"]["message"].replace(
            "0" * 8 + done[8:], done
        )
    r = bob.post(f"/v1/jobs/{queued}/cancel")
    assert r.status_code == 404
    assert alice.get(f"/v1/jobs/{queued}").json()["status"] == "queued"  # not cancelled
    assert {j["id"] for j in alice.get("/v1/jobs").json()["items"]} == {done, queued}
    assert [j["id"] for j in bob.get("/v1/jobs").json()["items"]] == [own]
    assert bob.get("/v1/jobs", params={"status": "succeeded"}).json()["items"] == []
    assert alice.post(f"/v1/jobs/{queued}/cancel").json()["status"] == "cancelled"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"teacher": "job:{id}", "method": {"name": "vanilla_kd"}}, "teacher"),
        ({"student": {"type": "pretrained", "model": "job:{id}"}}, "student.model"),
        (
            {
                "teacher": "file://teacher",
                "student": {"num_layers": 2},
                "method": {"name": "mate_kd", "generator": "job:{id}"},
            },
            "method.generator",
        ),
    ],
)
def test_a_job_reference_to_another_tenants_model_is_refused_like_a_missing_job(
    alice: TestClient,
    bob: TestClient,
    settings: Settings,
    db: Session,
    patch: dict[str, object],
    field: str,
) -> None:
    done = succeeded_job_with_a_model(alice, settings, db)
    (settings.models_root / "teacher").mkdir()  # bob's own teacher, for the generator case
    shutil.copy(settings.artifacts_root / done / "config.json", settings.models_root / "teacher")
    body = json.loads(json.dumps({**FINETUNE, **patch}).replace("{id}", done))
    theirs = bob.post("/v1/jobs", json=body)
    assert theirs.status_code == 422, theirs.text
    err = theirs.json()["error"]
    assert err["field"] == field, err
    assert err["message"] == f"'job:{done}': no such job"
    if field != "method.generator":  # alice's own model is a classifier, not a masked LM
        ok = alice.post("/v1/jobs", json=body)
        assert ok.status_code == 201, ok.text
    assert [j["id"] for j in bob.get("/v1/jobs").json()["items"]] == []


def test_active_jobs_quota_is_429_with_the_limit(
    alice: TestClient, bob: TestClient, db: Session, settings: Settings, app: FastAPI
) -> None:
    tenants.set_quota(db, tenants.ensure_tenant(db, "alice"), 2, None)
    db.commit()
    first = alice.post("/v1/jobs", json=FINETUNE).json()
    assert alice.post("/v1/jobs", json=FINETUNE).status_code == 201
    r = alice.post("/v1/jobs", json=FINETUNE)
    assert r.status_code == 429, r.text
    err = r.json()["error"]
    assert err["code"] == "quota_exceeded"
    assert err["details"] == {"quota": "max_active_jobs", "limit": 2, "current": 2}
    assert "2" in err["message"]
    assert len(alice.get("/v1/jobs").json()["items"]) == 2
    assert bob.post("/v1/jobs", json=FINETUNE).status_code == 201  # bob has no limit
    alice.post(f"/v1/jobs/{first['id']}/cancel")
    assert alice.post("/v1/jobs", json=FINETUNE).status_code == 201
    # the settings' default applies to tenants without their own quota
    app.state.settings = settings.model_copy(update={"default_max_active_jobs": 1})
    r = bob.post("/v1/jobs", json=FINETUNE)
    assert r.status_code == 429
    assert r.json()["error"]["details"]["limit"] == 1
    assert alice.post("/v1/jobs", json=FINETUNE).status_code == 429  # its own 2, 2 active


def test_stored_bytes_quota_counts_the_tenants_artifacts(
    alice: TestClient, bob: TestClient, db: Session, settings: Settings
) -> None:
    done = succeeded_job_with_a_model(alice, settings, db)
    alice_id = tenants.ensure_tenant(db, "alice").id
    stored = quotas.stored_bytes(db, alice_id)
    assert stored == 100 + (settings.artifacts_root / done / "config.json").stat().st_size
    assert quotas.stored_bytes(db, tenants.ensure_tenant(db, "bob").id) == 0
    tenants.set_quota(db, tenants.ensure_tenant(db, "alice"), None, stored)
    tenants.set_quota(db, tenants.ensure_tenant(db, "bob"), None, stored)
    db.commit()
    r = alice.post("/v1/jobs", json=FINETUNE)
    assert r.status_code == 429, r.text
    assert r.json()["error"]["details"] == {
        "quota": "max_stored_bytes",
        "limit": stored,
        "current": stored,
    }
    assert bob.post("/v1/jobs", json=FINETUNE).status_code == 201
    tenants.set_quota(db, tenants.ensure_tenant(db, "alice"), None, stored + 1)
    db.commit()
    assert alice.post("/v1/jobs", json=FINETUNE).status_code == 201


def admin(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "core.admin", *args, "--database-url", settings.database_url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_admin_command_creates_a_tenant_and_a_key_that_works(
    anon: TestClient, settings: Settings
) -> None:
    made = admin(settings, "create-tenant", "acme", "--max-active-jobs", "1")
    assert made.returncode == 0, made.stderr
    assert admin(settings, "create-tenant", "acme").returncode == 1  # taken
    assert admin(settings, "create-tenant", "bad name").returncode == 1
    out = admin(settings, "create-key", "acme", "--name", "ops")
    assert out.returncode == 0, out.stderr
    key = out.stdout.strip()
    assert re.fullmatch(r"dk_[a-z0-9]{8}_[A-Za-z0-9_-]{43}", key)
    assert anon.post("/v1/jobs", json=FINETUNE, headers=auth(key)).status_code == 201
    r = anon.post("/v1/jobs", json=FINETUNE, headers=auth(key))
    assert r.status_code == 429  # --max-active-jobs 1
    assert admin(settings, "set-quota", "acme", "--max-active-jobs", "3").returncode == 0
    assert anon.post("/v1/jobs", json=FINETUNE, headers=auth(key)).status_code == 201
    listing = admin(settings, "list-keys", "acme").stdout.splitlines()
    assert listing[0].split("\t")[:3] == ["id", "prefix", "name"]
    key_id, prefix, name = listing[1].split("\t")[:3]
    assert key.startswith(prefix + "_") and name == "ops"
    assert key not in admin(settings, "list-keys", "acme").stdout
    tenants_out = admin(settings, "list-tenants").stdout
    assert "acme" in tenants_out and "\t2\t" in tenants_out  # two active jobs
    assert admin(settings, "revoke-key", key_id).returncode == 0
    assert_401(anon.get("/v1/jobs", headers=auth(key)), "revoked")
    assert admin(settings, "create-key", "nobody").returncode == 1
