"""Measure issue 20's HTTP faults on a real stack (the figures of docs/reliability.md).

Run by hand (PostgreSQL and Redis must answer; the database is migrated to head first)::

    python -m bench.http_faults --database-url postgresql+psycopg://postgres@127.0.0.1:5432/db \\
        --broker-url redis://127.0.0.1:6379/14

It starts the stack of ``devstack.stack.running_stack`` (uvicorn in a process of its own, no
worker) with a 2 MiB upload cap and prints, for a 256 MiB chunked body streamed with httpx
without a key (``POST /v1/jobs`` as multipart, ``POST /v1/files``) and with a key over the upload
cap: the answer, after how long, how much left the client and the server's RSS before and at
its peak; then how long an open event stream lasts after its key is revoked (default 5 s
re-check); then, on an in-process uvicorn whose broker accepts TCP and never answers, the answer
times of 20 concurrent submits (``--deadline-s``, default 10 s). The helpers are shared with
``tests/integration/test_http_faults.py``.
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

MIB = 1 << 20
HUGE = 256 * MIB
"""Bytes a client offers: far beyond every limit."""
BOUNDARY = "x" * 16
MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}
FINETUNE: dict[str, Any] = {
    "teacher": "builtin:minilm-l6",
    "method": {"name": "finetune"},
    "dataset": {"source": "builtin:rotten_tomatoes"},
}


def auth(key: str) -> dict[str, str]:
    """The ``Authorization`` header of ``key``."""
    return {"Authorization": f"Bearer {key}"}


def rss(pid: int) -> int:
    """Resident memory of process ``pid`` (bytes, from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@dataclass
class Sent:
    """What a streamed request body gave the socket (bytes), and the server's peak RSS (bytes)
    while it was sent."""

    bytes: int = 0
    peak_rss: int = 0
    samples: list[int] = field(default_factory=list)


def multipart_head(name: str = "file", filename: str = "big.csv") -> bytes:
    """The start of a multipart upload: a ``purpose`` field, then the head of a file part
    whose content follows."""
    return (
        f'--{BOUNDARY}\r\ncontent-disposition: form-data; name="purpose"\r\n\r\ndataset\r\n'
        f'--{BOUNDARY}\r\ncontent-disposition: form-data; name="{name}"; '
        f'filename="{filename}"\r\ncontent-type: text/csv\r\n\r\n'
    ).encode()


def stream_huge(
    url: str, headers: dict[str, str], pid: int, head: bytes = b"", total: int = HUGE
) -> tuple[httpx.Response, Sent]:
    """POST ``head`` then "0" bytes, chunked (1 MiB chunks), up to ``total`` bytes, while the
    RSS of process ``pid`` is sampled every 20 ms. Returns the answer and what was sent."""
    sent = Sent()
    chunk = b"0" * MIB
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            sent.samples.append(rss(pid))
            time.sleep(0.02)

    def body() -> Iterator[bytes]:
        yield head
        sent.bytes += len(head)
        while sent.bytes < total:
            yield chunk
            sent.bytes += len(chunk)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        r = httpx.post(url, content=body(), headers=headers, timeout=60)
    finally:
        done.set()
        sampler.join()
    sent.peak_rss = max(sent.samples)
    return r, sent


class SilentBroker:
    """A TCP server on 127.0.0.1 that accepts connections and never answers (a hung broker)."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = int(self.sock.getsockname()[1])
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(conn)

    def close(self) -> None:
        """Close every accepted connection and the listener."""
        for c in self.conns:
            c.close()
        self.sock.close()


def concurrent_submits(url: str, key: str, n: int) -> list[tuple[int, float]]:
    """``n`` submits of :data:`FINETUNE` sent at once (a barrier), each with its own
    ``Idempotency-Key``; their (status, seconds to the answer)."""
    barrier = threading.Barrier(n)
    results: list[tuple[int, float]] = []

    def submit(i: int) -> None:
        with httpx.Client(headers=auth(key), timeout=120) as c:
            barrier.wait()
            t0 = time.monotonic()
            r = c.post(url + "/v1/jobs", json=FINETUNE, headers={"Idempotency-Key": f"k{i}"})
            results.append((r.status_code, time.monotonic() - t0))

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return results


def _bodies_and_stream(database_url: str, broker_url: str) -> None:
    from devstack.stack import running_stack

    with running_stack(
        Path(tempfile.mkdtemp()),
        database_url=database_url,
        broker_url=broker_url,
        workers=0,
        extra_env={
            "DISTILLERY_MAX_UPLOAD_BYTES": str(2 * MIB),
            "DISTILLERY_WEBHOOK_DISPATCHER_IN_API": "false",
        },
    ) as st:
        pid = st.processes["api"].pid
        cases = [("/v1/jobs", {}), ("/v1/files", {}), ("/v1/files", auth(st.api_key))]
        for path, extra in cases:
            before, t0 = rss(pid), time.monotonic()
            r, sent = stream_huge(st.base_url + path, {**MULTIPART, **extra}, pid, multipart_head())
            print(
                f"POST {path} {'with' if extra else 'without'} a key: {r.status_code} after "
                f"{time.monotonic() - t0:.2f} s; {sent.bytes / MIB:.0f} of {HUGE / MIB:.0f} MiB "
                f"left the client; server RSS {before / MIB:.0f} -> peak "
                f"{sent.peak_rss / MIB:.0f} MiB"
            )
        admin = httpx.Client(base_url=st.base_url, headers=auth(st.api_key), timeout=30)
        made = admin.post("/v1/keys", json={"name": "stream"}).json()
        job = admin.post("/v1/jobs", json=FINETUNE).json()
        url = f"{st.base_url}/v1/jobs/{job['id']}/events/stream"
        revoked = 0.0
        with httpx.stream("GET", url, headers=auth(made["key"]), timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("event: queued") and not revoked:
                    admin.delete(f"/v1/keys/{made['id']}")
                    revoked = time.monotonic()
        print(f"event stream closed {time.monotonic() - revoked:.2f} s after its key was revoked")
        admin.close()


@contextmanager
def hung_broker_api(database_url: str, deadline_s: float, root: Path) -> Iterator[str]:
    """The app under a real uvicorn (its own threads and connection pool) in this process,
    whose broker accepts TCP and never answers (:class:`SilentBroker`), its folders under
    ``root``; yields its base URL. Stopped (and the broker closed) on exit.

    Raises:
        TimeoutError: uvicorn did not start within 60 s.
    """
    import uvicorn

    from api.main import create_app
    from core.settings import Settings
    from devstack.stack import free_port

    silent = SilentBroker()
    settings = Settings(
        database_url=database_url,
        broker_url=f"redis://127.0.0.1:{silent.port}/0",
        broker_publish_timeout_s=deadline_s,
        artifacts_root=root / "artifacts",
        models_root=root / "models",
        data_root=root / "data",
        uploads_root=root / "uploads",
        cache_dir=root / "cache",
        webhook_dispatcher_in_api=False,
    )
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        start = time.monotonic()
        while not server.started:
            if time.monotonic() - start > 60:
                raise TimeoutError("uvicorn did not start within 60 s")
            time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        silent.close()


def _hung_broker(database_url: str, deadline_s: float, n: int) -> None:
    from devstack.stack import bootstrap_key

    tmp = Path(tempfile.mkdtemp())
    with hung_broker_api(database_url, deadline_s, tmp) as url:
        key = bootstrap_key(database_url, tmp / "api_key", tenant="hung-broker")
        results = concurrent_submits(url, key, n)
    print(
        f"{n} concurrent submits, broker hung, deadline {deadline_s:g} s: statuses "
        f"{sorted({s for s, _ in results})}, answer times (s) "
        f"{sorted(round(t, 1) for _, t in results)}"
    )


def main(argv: list[str] | None = None) -> None:
    """Parse the arguments and print the measurements."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--database-url", required=True)
    p.add_argument("--broker-url", required=True, help="a Redis database the stack may use")
    p.add_argument("--deadline-s", type=float, default=10.0)
    p.add_argument("--submits", type=int, default=20)
    a = p.parse_args(argv)
    _bodies_and_stream(a.database_url, a.broker_url)
    _hung_broker(a.database_url, a.deadline_s, a.submits)


if __name__ == "__main__":
    main()
