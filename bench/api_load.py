"""Status-poll latency under load: the real API next to a bare FastAPI endpoint (issue 11).

    .venv/bin/python -m bench.api_load \\
        --database-url postgresql+psycopg://postgres@127.0.0.1:5432/bench \\
        --broker-url redis://127.0.0.1:6379/8

Run by hand, never in CI. The database is migrated to head (alembic), a tenant, an API key and
one job (``POST /v1/jobs``; it stays queued, no worker runs) are made, then two servers run as
separate processes, each a single uvicorn worker on this machine:

- ``api``: the real app (:mod:`api.main`), ``GET /v1/jobs/{id}`` with the key: authentication,
  a PostgreSQL read, the response model;
- ``bare``: :data:`bare`, a FastAPI app whose ``GET /v1/jobs/{id}`` returns a constant body of
  the same shape (no database, no authentication): the framework's own floor.

``--clients`` concurrent httpx async clients (one connection each) then poll each server in
turn, ``--requests`` requests in all after ``--warmup``; the table gives requests/s and the
latency percentiles of each, measured in the same run.
"""

from __future__ import annotations

import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from fastapi import FastAPI

ROOT = Path(__file__).resolve().parent.parent
JOB = {
    "teacher": "builtin:minilm-l6",
    "method": {"name": "finetune"},
    "dataset": {"source": "builtin:rotten_tomatoes"},
}
bare = FastAPI()
BODY: dict[str, Any] = {}


@bare.get("/v1/jobs/{job_id}")
def bare_job(job_id: str) -> dict[str, Any]:
    """The body the real API returned for the job, constant."""
    return {**BODY, "id": job_id}


app = typer.Typer(add_completion=False)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve(target: str, env: dict[str, str]) -> tuple[subprocess.Popen[bytes], str]:
    port = _port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", target, "--port", str(port), "--log-level", "warning"],
        cwd=ROOT,
        env=env,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            httpx.get(url + "/docs", timeout=1)
            return proc, url
        except httpx.HTTPError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"{target} did not start") from None
            time.sleep(0.2)


async def _load(
    url: str, path: str, headers: dict[str, str], clients: int, requests: int, warmup: int
) -> dict[str, float]:
    """``requests`` GETs of ``path`` by ``clients`` concurrent clients; latencies in ms."""
    latencies: list[float] = []

    async def client(n: int, record: bool) -> None:
        async with httpx.AsyncClient(
            base_url=url, headers=headers, limits=httpx.Limits(max_connections=1)
        ) as http:
            for _ in range(n):
                t0 = time.perf_counter()
                r = await http.get(path)
                dt = time.perf_counter() - t0
                r.raise_for_status()
                if record:
                    latencies.append(1000 * dt)

    await asyncio.gather(*(client(max(1, warmup // clients), False) for _ in range(clients)))
    start = time.perf_counter()
    await asyncio.gather(*(client(requests // clients, True) for _ in range(clients)))
    wall = time.perf_counter() - start
    q = statistics.quantiles(latencies, n=100)
    return {
        "requests": len(latencies),
        "rps": len(latencies) / wall,
        "p50": q[49],
        "p90": q[89],
        "p99": q[98],
        "max": max(latencies),
    }


@app.command()
def main(
    database_url: Annotated[str, typer.Option(help="PostgreSQL URL (migrated to head).")],
    broker_url: Annotated[str, typer.Option(help="Redis URL the API sends the job to.")],
    clients: Annotated[int, typer.Option(help="Concurrent clients.")] = 50,
    requests: Annotated[int, typer.Option(help="Measured requests per server.")] = 5000,
    warmup: Annotated[int, typer.Option(help="Warm-up requests per server.")] = 500,
) -> None:
    """Measure both servers and print a Markdown table."""
    subprocess.run(
        [sys.executable, "-m", "alembic", "-x", f"url={database_url}", "upgrade", "head"],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from core import tenants

    engine = create_engine(database_url)
    with Session(engine) as db:
        _, key = tenants.create_key(db, tenants.ensure_tenant(db, "bench-load").id, "api_load")
        db.commit()
    engine.dispose()
    env = {
        **os.environ,
        "DISTILLERY_DATABASE_URL": database_url,
        "DISTILLERY_BROKER_URL": broker_url,
        "PYTHONPATH": str(ROOT),
    }
    headers = {"Authorization": f"Bearer {key}"}
    rows: dict[str, dict[str, float]] = {}
    api, api_url = _serve("api.main:app", env)
    try:
        r = httpx.post(api_url + "/v1/jobs", json=JOB, headers=headers, timeout=30)
        r.raise_for_status()
        job_id = r.json()["id"]
        body = httpx.get(f"{api_url}/v1/jobs/{job_id}", headers=headers).json()
        rows["api (uvicorn, PostgreSQL, auth)"] = asyncio.run(
            _load(api_url, f"/v1/jobs/{job_id}", headers, clients, requests, warmup)
        )
    finally:
        api.terminate()
        api.wait()
    env["BENCH_API_LOAD_BODY"] = httpx.Response(200, json=body).text
    server, bare_url = _serve("bench.api_load:bare", env)
    try:
        rows["bare FastAPI (constant body)"] = asyncio.run(
            _load(bare_url, f"/v1/jobs/{job_id}", headers, clients, requests, warmup)
        )
    finally:
        server.terminate()
        server.wait()
    print(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {clients} clients")
    print("| server | requests | req/s | p50 ms | p90 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|---|")
    for name, m in rows.items():
        print(
            f"| {name} | {m['requests']:.0f} | {m['rps']:.0f} | {m['p50']:.1f} | "
            f"{m['p90']:.1f} | {m['p99']:.1f} | {m['max']:.1f} |"
        )


if os.environ.get("BENCH_API_LOAD_BODY"):
    import json

    BODY.update(json.loads(os.environ["BENCH_API_LOAD_BODY"]))

if __name__ == "__main__":
    app()
