"""Input hardening, consistent answers and deletion, on a migrated PostgreSQL with a real Redis
broker: each test reproduces one finding of issue 9 (a 500, a silent 200 or an accepted job that
cannot run) and checks the clear 4xx or behaviour that replaces it."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from api.main import create_app
from core import repository
from core.db import Job, utcnow
from core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
FINETUNE: dict[str, Any] = {
    "teacher": "builtin:minilm-l6",
    "method": {"name": "finetune"},
    "dataset": {"source": "builtin:rotten_tomatoes"},
}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """The shared settings with a 64 KiB JSON body limit (the limit's tests stay small)."""
    return settings.model_copy(update={"max_json_body_bytes": 64 * 1024})


@pytest.fixture
def client(settings: Settings, key_headers: dict[str, str]) -> Iterator[TestClient]:
    with TestClient(create_app(settings), headers=key_headers) as c:
        yield c


def count_jobs(settings: Settings) -> int:
    with Session(create_engine(settings.database_url)) as s:
        return int(s.scalar(select(func.count()).select_from(Job)) or 0)


def error_of(r: Any, status: int) -> dict[str, Any]:
    """The error object of a JSON error answer with ``status``."""
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert err["message"]
    return err


def finish(settings: Settings, job_id: str, status: str, **values: Any) -> None:
    """Drive a queued job to ``status`` as a worker would (claim, then finish)."""
    with Session(create_engine(settings.database_url)) as s:
        assert repository.claim(s, job_id, "w")
        if status != "running":
            assert repository.transition(
                s, job_id, ("running",), status, finished_at=utcnow(), **values
            )
        s.commit()


def succeed_with_files(settings: Settings, job_id: str, files: dict[str, bytes]) -> Path:
    """Mark a job succeeded with ``files`` (written mode 0600) as its artifacts."""
    root = settings.artifacts_root.resolve() / job_id
    root.mkdir(parents=True)
    rows = []
    for name, data in files.items():
        (root / name).write_bytes(data)
        (root / name).chmod(0o600)
        rows.append((name, len(data), "0" * 64))
    finish(settings, job_id, "succeeded")
    with Session(create_engine(settings.database_url)) as s:
        repository.replace_artifacts(s, job_id, rows)
        s.commit()
    return root


def submit(client: TestClient, **patch: Any) -> dict[str, Any]:
    r = client.post("/v1/jobs", json={**FINETUNE, **patch})
    assert r.status_code == 201, r.text
    job: dict[str, Any] = r.json()
    return job


# --- NUL bytes, control characters, path parameters -------------------------------------------


@pytest.mark.parametrize(
    ("path", "field"),
    [
        ("/v1/jobs/%00", "job_id"),
        ("/v1/jobs/a%00b/metrics", "job_id"),
        ("/v1/jobs/%01/artifacts", "job_id"),
        ("/v1/jobs/%00/archive", "job_id"),
        ("/v1/jobs/00000000-0000-0000-0000-000000000000/artifacts/a%00b", "name"),
    ],
)
def test_nul_or_control_character_in_a_path_is_422_naming_the_parameter(
    client: TestClient, path: str, field: str
) -> None:
    err = error_of(client.get(path), 422)
    assert err["field"] == field
    assert "control character" in err["message"]


def test_nul_in_a_job_id_is_422_for_cancel_and_delete(client: TestClient) -> None:
    assert error_of(client.post("/v1/jobs/%00/cancel"), 422)["field"] == "job_id"
    assert error_of(client.delete("/v1/jobs/%00"), 422)["field"] == "job_id"


@pytest.mark.parametrize("job_id", ["nope", "x" * 64, "00000000-0000-0000-0000-00000000000Z"])
def test_a_job_id_that_is_not_a_uuid_is_404(client: TestClient, job_id: str) -> None:
    assert error_of(client.get(f"/v1/jobs/{job_id}"), 404)["code"] == "not_found"
    assert error_of(client.get(f"/v1/jobs/{job_id}/artifacts/config.json"), 404)


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"teacher": "job:a\u0000b"}, "teacher"),
        ({"teacher": "builtin:minilm-l6\u0007"}, "teacher"),
        (
            {"dataset": {"source": "builtin:rotten_tomatoes", "text_column": "te\u0000xt"}},
            "dataset.text_column",
        ),
        ({"dataset": {"source": "builtin:rotten\ttomatoes"}}, "dataset.source"),
        (
            {"dataset": {"source": "builtin:rotten_tomatoes", "label_column": "a\u0085b"}},
            "dataset.label_column",
        ),
        (
            {
                "dataset": {
                    "source": "builtin:rotten_tomatoes",
                    "eval_sets": [{"name": "ood", "source": "file://a\u0000.csv"}],
                }
            },
            "dataset.eval_sets.0.source",
        ),
        ({"method": {"name": "mate_kd", "generator": "job:\u0000"}}, "method.generator"),
        ({"student": {"type": "pretrained", "model": "builtin:minilm-l3\u0000"}}, "student.model"),
        ({"teacher": "builtin:minilm-l6\ud800"}, "teacher"),
    ],
)
def test_control_characters_in_spec_strings_are_422_naming_the_field(
    client: TestClient, settings: Settings, patch: dict[str, Any], field: str
) -> None:
    r = client.post(
        "/v1/jobs",
        content=json.dumps({**FINETUNE, **patch}),  # json.dumps keeps a lone surrogate escaped
        headers={"content-type": "application/json"},
    )
    err = error_of(r, 422)
    assert err["field"] == field
    assert count_jobs(settings) == 0


@pytest.mark.parametrize(
    ("patch", "field", "cap"),
    [
        ({"teacher": "builtin:" + "m" * 3000}, "teacher", "2048"),
        (
            {"dataset": {"source": "builtin:rotten_tomatoes", "text_column": "t" * 300}},
            "dataset.text_column",
            "256",
        ),
        (
            {"dataset": {"source": "builtin:rotten_tomatoes", "text_pair_column": "t" * 257}},
            "dataset.text_pair_column",
            "256",
        ),
        (
            {"method": {"name": "minimax_knn", "corpus": "file://" + "c" * 2100}},
            "method.corpus",
            "2048",
        ),
    ],
)
def test_overlong_strings_are_422_stating_the_cap(
    client: TestClient, settings: Settings, patch: dict[str, Any], field: str, cap: str
) -> None:
    err = error_of(client.post("/v1/jobs", json={**FINETUNE, **patch}), 422)
    assert err["field"] == field
    assert cap in err["message"]
    assert count_jobs(settings) == 0


# --- the list's filters and cursor -------------------------------------------------------------


def test_an_invalid_status_filter_is_422_listing_the_statuses(client: TestClient) -> None:
    for value in ("done", "\u0000", "queued\u0000"):
        err = error_of(client.get("/v1/jobs", params={"status": value}), 422)
        assert err["field"] == "status"
        for status in ("queued", "running", "cancelling", "succeeded", "failed", "cancelled"):
            assert status in err["message"], err
    assert client.get("/v1/jobs", params={"status": "queued"}).status_code == 200


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


@pytest.mark.parametrize(
    "cursor",
    [
        "garbage!",
        "\u0000",
        _b64(b"\xff\xfe\x00"),
        _b64(b"[1, 2]"),
        _b64(b'{"a": 1}'),
        _b64(b'"x"'),
        _b64(b"[]"),
        _b64(b"[null, null]"),
        _b64(b'["2024-01-01T00:00:00+00:00", 5]'),
        _b64(b'["2024-01-01T00:00:00+00:00", "a\\u0000b"]'),
        _b64(b'["2024-01-01T00:00:00+00:00", "not-a-job-id"]'),
        _b64(b'["2024-01-01T00:00:00", "00000000-0000-0000-0000-000000000000"]'),
        _b64(b'["yesterday", "00000000-0000-0000-0000-000000000000"]'),
        _b64(b'[["2024"], "00000000-0000-0000-0000-000000000000"]'),
        _b64(b"1e999999"),
        "A" * 5000,
    ],
)
def test_a_forged_cursor_is_422_naming_cursor(client: TestClient, cursor: str) -> None:
    err = error_of(client.get("/v1/jobs", params={"cursor": cursor}), 422)
    assert err["field"] == "cursor"


def test_a_real_cursor_still_pages(client: TestClient) -> None:
    ids = [submit(client)["id"] for _ in range(3)]
    page1 = client.get("/v1/jobs", params={"limit": 2}).json()
    page2 = client.get("/v1/jobs", params={"limit": 2, "cursor": page1["next_cursor"]}).json()
    assert [j["id"] for j in page1["items"] + page2["items"]] == list(reversed(ids))


# --- body size ---------------------------------------------------------------------------------


def test_a_json_body_over_the_limit_is_413_with_the_limit(
    client: TestClient, settings: Settings
) -> None:
    big = {
        **FINETUNE,
        "dataset": {"source": "builtin:rotten_tomatoes", "text_column": "x" * 70_000},
    }
    err = error_of(client.post("/v1/jobs", json=big), 413)
    assert err["code"] == "too_large"
    assert err["details"] == {"limit_bytes": 64 * 1024}
    assert "65536" in err["message"]
    assert count_jobs(settings) == 0


def test_a_chunked_json_body_is_counted_as_it_arrives(
    client: TestClient, settings: Settings
) -> None:
    sent: list[int] = []

    def chunks() -> Iterator[bytes]:
        yield b'{"teacher": "builtin:minilm-l6", "x": "'
        for _ in range(100):
            sent.append(1)
            yield b"y" * 4096
        yield b'"}'

    r = client.post("/v1/jobs", content=chunks(), headers={"content-type": "application/json"})
    err = error_of(r, 413)
    assert err["code"] == "too_large"
    assert count_jobs(settings) == 0


def test_a_declared_length_over_the_limit_is_413_before_the_body_is_read(
    client: TestClient,
) -> None:
    r = client.post(
        "/v1/jobs",
        content=b"{}",
        headers={"content-type": "application/json", "content-length": str(10**9)},
    )
    assert error_of(r, 413)["code"] == "too_large"


def test_a_body_under_the_limit_is_accepted(client: TestClient) -> None:
    submit(client)


# --- consistent answers ------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["cancelled", "failed", "succeeded"])
def test_cancelling_any_finished_job_is_409(
    client: TestClient, settings: Settings, status: str
) -> None:
    job = submit(client)
    if status == "cancelled":
        assert client.post(f"/v1/jobs/{job['id']}/cancel").status_code == 200
    else:
        finish(settings, job["id"], status)
    err = error_of(client.post(f"/v1/jobs/{job['id']}/cancel"), 409)
    assert err["code"] == "conflict"
    assert status in err["message"]
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == status


def test_an_unknown_method_setting_lists_the_valid_ones(client: TestClient) -> None:
    r = client.post("/v1/jobs", json={**FINETUNE, "method": {"name": "vanilla_kd", "alpah": 0.5}})
    err = error_of(r, 422)
    assert err["field"] == "method.alpah"
    assert "unknown setting 'alpah' for vanilla_kd" in err["message"]
    assert "alpha" in err["message"].split("valid settings:")[1]
    assert "temperature" in err["message"]


@pytest.mark.parametrize(
    ("patch", "field", "valid"),
    [
        ({"training": {"epoch": 1}}, "training.epoch", "epochs"),
        (
            {"dataset": {"source": "builtin:rotten_tomatoes", "label": "y"}},
            "dataset.label",
            "label_column",
        ),
        (
            {
                "student": {
                    "type": "fresh",
                    "num_layers": 2,
                    "hidden_size": 64,
                    "num_heads": 2,
                    "intermediate_size": 128,
                    "heads": 2,
                }
            },
            "student.heads",
            "num_heads",
        ),
        ({"teachr": "x"}, "teachr", "teacher"),
    ],
)
def test_an_unknown_field_lists_the_valid_ones(
    client: TestClient, patch: dict[str, Any], field: str, valid: str
) -> None:
    err = error_of(client.post("/v1/jobs", json={**FINETUNE, **patch}), 422)
    assert err["field"] == field
    assert valid in err["message"].split("valid fields:")[1]


def test_archive_members_and_artifacts_are_world_readable(
    client: TestClient, settings: Settings
) -> None:
    job = submit(client)
    succeed_with_files(settings, job["id"], {"config.json": b"{}", "model.safetensors": b"w"})
    r = client.get(f"/v1/jobs/{job['id']}/archive")
    assert r.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
        modes = {m.name: (m.mode, m.isdir(), m.uid, m.uname) for m in tar.getmembers()}
    assert modes[f"{job['id']}/model.safetensors"] == (0o644, False, 0, "")
    assert modes[f"{job['id']}/config.json"][0] == 0o644


def test_published_artifacts_are_0644(client: TestClient, settings: Settings) -> None:
    """The worker's publish step leaves every file 0644 and folder 0755 whatever mode they
    were written with."""
    from worker.runner import _publish, sessions_for

    job = submit(client)
    finish(settings, job["id"], "running")
    out = settings.artifacts_root / ".partial" / job["id"]
    (out / "sub").mkdir(parents=True)
    (out / "model.safetensors").write_bytes(b"w")
    (out / "model.safetensors").chmod(0o600)
    (out / "sub" / "x").write_bytes(b"x")
    (out / "sub" / "x").chmod(0o600)
    (out / "sub").chmod(0o700)
    _publish(sessions_for(settings.database_url), settings, job["id"], out, {})
    final = settings.artifacts_root.resolve() / job["id"]
    assert (final / "model.safetensors").stat().st_mode & 0o777 == 0o644
    assert (final / "sub").stat().st_mode & 0o777 == 0o755
    assert (final / "sub" / "x").stat().st_mode & 0o777 == 0o644
    assert client.get(f"/v1/jobs/{job['id']}").json()["status"] == "succeeded"


@pytest.mark.parametrize(
    ("patch", "field"),
    [
        ({"training": {"seed": 2**32}}, "training.seed"),
        ({"training": {"seed": -1}}, "training.seed"),
        ({"training": {"seed": 10**30}}, "training.seed"),
        (
            {"dataset": {"source": "builtin:rotten_tomatoes", "split_seed": 2**40}},
            "dataset.split_seed",
        ),
    ],
)
def test_an_out_of_range_seed_is_422(client: TestClient, patch: dict[str, Any], field: str) -> None:
    err = error_of(client.post("/v1/jobs", json={**FINETUNE, **patch}), 422)
    assert err["field"] == field
    assert "4294967295" in err["message"]


def test_the_largest_seed_is_accepted(client: TestClient) -> None:
    submit(client, training={"seed": 2**32 - 1})


# --- models only from regular files under the root -------------------------------------------


def _model_dir(settings: Settings, name: str) -> Path:
    from kd_engine.references import builtin_model_path

    config = json.loads((builtin_model_path("minilm-l6") / "config.json").read_text())
    target = settings.models_root / name
    target.mkdir()
    (target / "config.json").write_text(json.dumps(config))
    return target


def test_a_model_directory_with_a_symlink_out_of_the_root_is_refused(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    from core import refs

    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not yours")
    target = _model_dir(settings, "teacher")
    (target / "model.safetensors").symlink_to(secret)
    err = error_of(client.post("/v1/jobs", json={**FINETUNE, "teacher": "file://teacher"}), 422)
    assert err["field"] == "teacher"
    assert "model.safetensors" in err["message"]
    assert "outside" in err["message"]
    # the worker resolves references with the same function, so it refuses too
    with pytest.raises(ValueError, match="outside"):
        refs.model_location("file://teacher", settings)
    body = {**FINETUNE, "student": {"type": "pretrained", "model": "file://teacher"}}
    assert error_of(client.post("/v1/jobs", json=body), 422)["field"] == "student.model"


def test_a_symlinked_config_or_subdirectory_out_of_the_root_is_refused(
    client: TestClient, settings: Settings, tmp_path: Path
) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "vocab.txt").write_text("x")
    target = _model_dir(settings, "teacher")
    (target / "tok").symlink_to(outside, target_is_directory=True)
    err = error_of(client.post("/v1/jobs", json={**FINETUNE, "teacher": "file://teacher"}), 422)
    assert err["field"] == "teacher"
    assert "tok" in err["message"]


def test_a_model_directory_with_a_fifo_is_refused(client: TestClient, settings: Settings) -> None:
    target = _model_dir(settings, "teacher")
    os.mkfifo(target / "model.safetensors")
    err = error_of(client.post("/v1/jobs", json={**FINETUNE, "teacher": "file://teacher"}), 422)
    assert "regular file" in err["message"]


def test_a_symlink_that_stays_under_the_root_is_allowed(
    client: TestClient, settings: Settings
) -> None:
    target = _model_dir(settings, "teacher")
    (settings.models_root / "shared.txt").write_text("x")
    (target / "vocab.txt").symlink_to(settings.models_root / "shared.txt")
    submit(client, teacher="file://teacher", method={"name": "finetune"})


# --- fit at submit -----------------------------------------------------------------------------


def test_a_job_that_cannot_fit_the_queue_is_422_with_the_estimate(
    client: TestClient, settings: Settings
) -> None:
    huge = {
        **FINETUNE,
        "student": {
            "type": "fresh",
            "num_layers": 48,
            "hidden_size": 4096,
            "num_heads": 32,
            "intermediate_size": 16384,
        },
        "training": {"batch_size": 4096, "epochs": 200},
    }
    err = error_of(client.post("/v1/jobs", json=huge), 422)
    assert err["field"] == "training.batch_size"
    message = err["message"]
    assert "GiB" in message
    assert "parameters" in message
    assert "activations" in message
    assert "limit 16.0 GiB of queue cpu" in message
    assert err["details"]["limit_bytes"] == 16 * 1024**3
    assert err["details"]["estimate_bytes"] > err["details"]["limit_bytes"]
    assert count_jobs(settings) == 0
    # the student alone (batch 1) is still too big: then the student is named
    huge_small_batch = {**huge, "training": {"batch_size": 1}}
    err = error_of(client.post("/v1/jobs", json=huge_small_batch), 422)
    assert err["field"] == "student"


def test_the_memory_budget_is_per_queue(
    client: TestClient, settings: Settings, key_headers: dict[str, str]
) -> None:
    big = {**FINETUNE, "training": {"batch_size": 4096, "max_seq_length": 512}}
    assert error_of(client.post("/v1/jobs", json=big), 422)["field"] == "training.batch_size"
    gpu = settings.model_copy(update={"queue": "gpu", "queue_memory_bytes": {"gpu": 10**13}})
    with TestClient(create_app(gpu), headers=key_headers) as c:
        assert c.post("/v1/jobs", json=big).status_code == 201


# --- delete and retention ----------------------------------------------------------------------


def test_delete_removes_the_row_and_its_artifacts(client: TestClient, settings: Settings) -> None:
    job = submit(client)
    root = succeed_with_files(settings, job["id"], {"config.json": b"{}"})
    r = client.delete(f"/v1/jobs/{job['id']}")
    assert r.status_code == 204, r.text
    assert r.content == b""
    assert not root.exists()
    assert error_of(client.get(f"/v1/jobs/{job['id']}"), 404)
    assert count_jobs(settings) == 0
    assert error_of(client.delete(f"/v1/jobs/{job['id']}"), 404)


@pytest.mark.parametrize("status", ["queued", "running", "cancelling"])
def test_deleting_an_unfinished_job_is_409(
    client: TestClient, settings: Settings, status: str
) -> None:
    job = submit(client)
    if status != "queued":
        finish(settings, job["id"], "running")
    if status == "cancelling":
        client.post(f"/v1/jobs/{job['id']}/cancel")
    err = error_of(client.delete(f"/v1/jobs/{job['id']}"), 409)
    assert status in err["message"]
    assert "cancel" in err["message"]
    assert count_jobs(settings) == 1


def test_deleting_a_model_a_queued_job_uses_is_409_naming_that_job(
    client: TestClient, settings: Settings
) -> None:
    from kd_engine.references import builtin_model_path

    teacher = submit(client)
    root = settings.artifacts_root.resolve() / teacher["id"]
    root.mkdir(parents=True)
    config = json.loads((builtin_model_path("minilm-l6") / "config.json").read_text())
    config.update(
        {"architectures": ["BertForSequenceClassification"], "id2label": {"0": "neg", "1": "pos"}}
    )
    (root / "config.json").write_text(json.dumps(config))
    finish(settings, teacher["id"], "succeeded")
    user = submit(
        client,
        student={"type": "pretrained", "model": f"job:{teacher['id']}"},
        method={"name": "finetune"},
    )
    err = error_of(client.delete(f"/v1/jobs/{teacher['id']}"), 409)
    assert user["id"] in err["message"]
    assert root.exists()
    # once that job has finished, the model can go
    client.post(f"/v1/jobs/{user['id']}/cancel")
    assert client.delete(f"/v1/jobs/{teacher['id']}").status_code == 204
    assert not root.exists()


def _age(settings: Settings, job_id: str, days: float) -> None:
    with Session(create_engine(settings.database_url)) as s:
        old = utcnow() - timedelta(days=days)
        s.execute(
            Job.__table__.update()
            .where(Job.id == job_id)
            .values(finished_at=old, created_at=old, updated_at=old)
        )
        s.commit()


def test_retention_deletes_finished_jobs_older_than_the_period(
    client: TestClient, settings: Settings
) -> None:
    from core.retention import delete_expired

    old = submit(client)
    old_root = succeed_with_files(settings, old["id"], {"config.json": b"{}"})
    _age(settings, old["id"], 40)
    old_failed = submit(client)
    finish(settings, old_failed["id"], "failed")
    _age(settings, old_failed["id"], 31)
    recent = submit(client)
    finish(settings, recent["id"], "succeeded")
    _age(settings, recent["id"], 10)
    stuck = submit(client)  # queued for 60 days: never deleted by retention
    _age(settings, stuck["id"], 60)

    keep_forever = settings.model_copy(update={"retention_days": None})
    with Session(create_engine(settings.database_url)) as s:
        assert delete_expired(s, keep_forever) == []
    assert count_jobs(settings) == 4

    thirty = settings.model_copy(update={"retention_days": 30})
    with Session(create_engine(settings.database_url)) as s:
        deleted = delete_expired(s, thirty)
    assert sorted(deleted) == sorted([old["id"], old_failed["id"]])
    assert not old_root.exists()
    left = {j["id"] for j in client.get("/v1/jobs").json()["items"]}
    assert left == {recent["id"], stuck["id"]}


def test_retention_command_runs_against_the_configured_database(
    client: TestClient, settings: Settings
) -> None:
    old = submit(client)
    finish(settings, old["id"], "cancelled")
    _age(settings, old["id"], 3)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "DISTILLERY_DATABASE_URL": settings.database_url,
        "DISTILLERY_ARTIFACTS_ROOT": str(settings.artifacts_root),
        "DISTILLERY_RETENTION_DAYS": "2",
    }
    out = subprocess.run(
        [sys.executable, "-m", "core.retention"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert old["id"] in out.stdout
    assert count_jobs(settings) == 0
    env.pop("DISTILLERY_RETENTION_DAYS")
    out = subprocess.run(
        [sys.executable, "-m", "core.retention"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0
    assert "DISTILLERY_RETENTION_DAYS" in out.stdout + out.stderr
