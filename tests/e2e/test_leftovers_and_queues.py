"""Issue 20, faults 5 and 6, on a real stack (uvicorn, one Celery worker on the ``cpu`` queue,
PostgreSQL, Redis), with short liveness settings (a reconciler pass every second, a lost message
re-sent after 3 s, an upload with no sign of life for 5 s is dead):

* an API process SIGKILLed while it checks an upload leaves a row in ``uploading`` (listed,
  counted) that the worker's reconciler sweeps away with its files, with files on disk that
  have no row; a ready upload is kept;
* a job submitted through an API on ``DISTILLERY_QUEUE=gpu`` is never run by the ``cpu``
  worker: its reconciler finds the message in the ``gpu`` queue, and re-sends a lost one there.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from sqlalchemy import select

from core.db import File, Job, JobEvent, make_engine, make_sessionmaker
from devstack.client import ApiError, Client
from devstack.stack import ROOT, Stack, free_port, running_stack
from tests.checks import NO_EXTRAS

pytestmark = pytest.mark.e2e

RECONCILE_INTERVAL_S = 1.0
REQUEUE_GRACE_S = 3.0
UPLOAD_STALE_S = 5.0
ENV = {
    "DISTILLERY_RECONCILE_INTERVAL_S": str(RECONCILE_INTERVAL_S),
    "DISTILLERY_REQUEUE_GRACE_S": str(REQUEUE_GRACE_S),
    "DISTILLERY_BROKER_PUBLISH_TIMEOUT_S": "2",
    "DISTILLERY_UPLOAD_STALE_S": str(UPLOAD_STALE_S),
    "DISTILLERY_DATASET_CHECK_ROWS": "5000000",  # the check reads the whole file
}


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, pg_url: str, e2e_broker_url: str
) -> Iterator[Stack]:
    with running_stack(
        tmp_path_factory.mktemp("leftovers"),
        database_url=pg_url,
        broker_url=e2e_broker_url,
        extra_env=ENV,
    ) as s:
        yield s


def wait_for(what: str, check: Any, timeout_s: float, poll_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(poll_s)


def worker_ready(stack: Stack) -> None:
    """Wait until the worker's reconciler thread runs (the worker imports torch first)."""
    log = stack.log_dir / "worker.log"
    wait_for(
        "the worker's reconciler",
        lambda: log.is_file() and "reconciler started" in log.read_text(errors="replace"),
        240,
        0.5,
    )


@pytest.fixture
def another_api(stack: Stack, request: pytest.FixtureRequest) -> Iterator[Any]:
    """Start another uvicorn on the stack's database, broker and folders, with env overrides;
    yields a function ``start(**env) -> (process, base_url)``; kills what it started."""
    started: list[subprocess.Popen[bytes]] = []

    def start(**env: str) -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        log = (stack.log_dir / f"api-{request.node.name}-{len(started)}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "api.main:app", "--port", str(port)],
            cwd=ROOT,
            env={**stack.env, **env},
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append(proc)
        url = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert proc.poll() is None, "the extra API exited"
            try:
                return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for("the extra API", healthy, 120, 0.3)
        return proc, url

    yield start
    for proc in started:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def db_rows(stack: Stack, model: Any, *where: Any) -> list[Any]:
    engine = make_engine(stack.env["DISTILLERY_DATABASE_URL"])
    try:
        with make_sessionmaker(engine)() as s:
            return list(s.scalars(select(model).where(*where)))
    finally:
        engine.dispose()


def big_csv(path: Path, rows: int) -> Path:
    with path.open("w") as f:
        f.write("text,label\n")
        for i in range(rows):
            f.write(f"review number {i} was {'bad' if i % 2 else 'good'},{i % 2}\n")
    return path


def test_an_upload_killed_mid_check_is_listed_then_swept_with_its_files(
    stack: Stack, another_api: Any, tmp_path: Path
) -> None:
    client = Client(stack.base_url, stack.api_key)
    kept = client.upload(big_csv(tmp_path / "small.csv", 40), "dataset")
    assert kept["status"] == "ready"
    uploads = Path(stack.env["DISTILLERY_UPLOADS_ROOT"])
    # What an older version (bytes before the row) or a crash after a delete left behind.
    orphan, partial = (uploads / f"file-{uuid.uuid4().hex}" for _ in range(2))
    orphan.mkdir()
    (orphan / "data.csv").write_text("text,label\nx,1\n")
    partial.mkdir()
    (partial / ".tmp-abc123").write_bytes(b"half a file")

    victim, url = another_api()
    big = big_csv(tmp_path / "big.csv", 400_000)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            Client(url, stack.api_key, timeout_s=300).upload(big, "dataset")
        except (httpx.HTTPError, ApiError) as e:
            errors.append(e)

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    # Kill the API once the bytes are stored and it is checking them.
    landed = wait_for(
        "the upload's bytes",
        lambda: [
            p
            for p in uploads.glob("file-*/data.csv")
            if p.parent.name not in (kept["id"], orphan.name)
        ],
        120,
        0.01,
    )
    file_id = landed[0].parent.name
    deadline = time.monotonic() + 3  # the row records the bytes stored (not before the fix)
    while time.monotonic() < deadline and not db_rows(
        stack, File, File.id == file_id, File.size_bytes > 0
    ):
        time.sleep(0.01)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.wait(10)
    killed_at = time.time()
    sender.join(30)

    rows = db_rows(stack, File, File.id == file_id)
    assert [r.status for r in rows] == ["uploading"], "no row for the bytes already stored"
    listed = {f["id"]: f for f in client.files()}
    assert listed[file_id]["status"] == "uploading"
    assert listed[file_id]["size_bytes"] == big.stat().st_size  # counted in the quota

    # Nobody calls anything: the worker's reconciler sweeps the dead upload and the orphans.
    worker_ready(stack)
    wait_for(
        "the sweep",
        lambda: not db_rows(stack, File, File.id == file_id) and not landed[0].parent.exists(),
        120,
        0.2,
    )
    swept_s = time.time() - killed_at
    wait_for("the orphans' sweep", lambda: not orphan.exists() and not partial.exists(), 30)
    # (earlier e2e modules of the session may have left uploads of their own in this tenant)
    listed_after = {f["id"] for f in client.files()}
    assert kept["id"] in listed_after and file_id not in listed_after
    assert (uploads / kept["id"] / "data.csv").is_file()
    assert UPLOAD_STALE_S - 2 <= swept_s <= UPLOAD_STALE_S + 60
    print(f"killed upload: row and files swept {swept_s:.1f} s after the SIGKILL")


def tiny_job() -> dict[str, Any]:
    return {
        "teacher": "builtin:minilm-l6",
        "method": {"name": "finetune"},
        "dataset": {
            "source": "builtin:rotten_tomatoes",
            "max_train_examples": 32,
            "max_eval_examples": 16,
        },
        "training": {"epochs": 1, "batch_size": 16, "max_seq_length": 32},
        "export": NO_EXTRAS,
    }


def test_a_gpu_job_is_not_run_by_a_cpu_worker_and_a_lost_message_goes_back_to_gpu(
    stack: Stack, another_api: Any
) -> None:
    worker_ready(stack)
    _, url = another_api(DISTILLERY_QUEUE="gpu")
    gpu = Client(url, stack.api_key)
    job = gpu.submit(tiny_job())
    submitted = time.monotonic()
    assert job["status"] == "queued"
    broker = redis.Redis.from_url(stack.env["DISTILLERY_BROKER_URL"])

    def held(queue: str) -> list[str]:
        return [json.loads(m)["headers"]["id"] for m in broker.lrange(queue, 0, -1)]

    # Several reconciler passes after the grace: the cpu worker must leave it alone.
    while time.monotonic() - submitted < REQUEUE_GRACE_S + 6 * RECONCILE_INTERVAL_S:
        cur = gpu.job(job["id"])
        assert (cur["status"], cur["attempt"]) == ("queued", 0), cur
        time.sleep(0.3)
    assert held("gpu") == [job["id"]] and held("cpu") == []

    # The message is lost: re-sent to the job's own queue.
    broker.delete("gpu")
    lost_at = time.monotonic()
    wait_for("the re-send", lambda: held("gpu") == [job["id"]], 60)
    resent_s = time.monotonic() - lost_at
    assert held("cpu") == []
    time.sleep(2 * RECONCILE_INTERVAL_S)
    assert gpu.job(job["id"])["status"] == "queued"
    assert held("gpu") == [job["id"]]  # sent once
    started = db_rows(stack, JobEvent, JobEvent.job_id == job["id"], JobEvent.type == "started")
    assert started == []
    assert gpu.job(job["id"])["queue"] == "gpu"
    assert [j.queue for j in db_rows(stack, Job, Job.id == job["id"])] == ["gpu"]
    assert gpu.cancel(job["id"])["status"] == "cancelled"
    print(f"lost gpu message: re-sent to gpu {resent_s:.1f} s after it was deleted")
