"""``python -m core.admin``: administer tenants, API keys and quotas in the database of the
settings (``DISTILLERY_DATABASE_URL``, or ``--database-url``). Run ``alembic upgrade head``
first. On a fresh install this is how the first tenant and key are made::

    python -m core.admin create-tenant acme --max-active-jobs 4
    python -m core.admin create-key acme --name alice     # prints the key once
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated

import typer
from rich.console import Console
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core import quotas, tenants
from core.db import Tenant, make_engine, make_sessionmaker
from core.settings import Settings

app = typer.Typer(add_completion=False, help=__doc__, no_args_is_help=True)
err = Console(stderr=True)
DatabaseUrl = Annotated[
    str | None,
    typer.Option(
        "--database-url", help="SQLAlchemy URL (default: DISTILLERY_DATABASE_URL / settings)."
    ),
]


@contextmanager
def _session(database_url: str | None) -> Iterator[Session]:
    engine = make_engine(database_url or Settings().database_url)
    try:
        with make_sessionmaker(engine)() as session:
            yield session
    except SQLAlchemyError as e:
        err.print(f"[red]database error: {type(e).__name__}: {e.args[0] if e.args else e}[/]")
        err.print("is the database reachable and migrated (alembic upgrade head)?")
        raise typer.Exit(2) from None
    finally:
        engine.dispose()


def _fail(message: str) -> typer.Exit:
    err.print(f"[red]{message}[/]")
    return typer.Exit(1)


def _tenant(session: Session, name: str) -> Tenant:
    tenant = tenants.get_tenant_by_name(session, name)
    if tenant is None:
        raise _fail(f"no tenant named {name!r} (list-tenants shows them)")
    return tenant


def _limit(value: int | None) -> str:
    return "default" if value is None else str(value)


def _row(*cells: str) -> None:
    """One tab-separated output line (easy to read and to cut/awk)."""
    typer.echo("\t".join(cells))


def _effective(value: int | None) -> str:
    return "unlimited" if value is None else str(value)


@app.command("create-tenant")
def create_tenant(
    name: Annotated[str, typer.Argument(help="1-64 letters, digits, '.', '_', '-'.")],
    max_active_jobs: Annotated[
        int | None, typer.Option(min=0, help="Queued + running jobs (default: the setting).")
    ] = None,
    max_stored_bytes: Annotated[
        int | None, typer.Option(min=0, help="Stored bytes (default: the setting).")
    ] = None,
    database_url: DatabaseUrl = None,
) -> None:
    """Create a tenant; prints its id."""
    with _session(database_url) as s:
        try:
            tenant = tenants.create_tenant(s, name, max_active_jobs, max_stored_bytes)
        except ValueError as e:
            raise _fail(str(e)) from None
        s.commit()
        typer.echo(tenant.id)


@app.command("create-key")
def create_key(
    tenant: Annotated[str, typer.Argument(help="The tenant's name.")],
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    database_url: DatabaseUrl = None,
) -> None:
    """Create an API key for a tenant. The key is printed once, alone on stdout (details go to
    stderr), e.g. KEY=$(python -m core.admin create-key acme)."""
    with _session(database_url) as s:
        t = _tenant(s, tenant)
        try:
            row, key = tenants.create_key(s, t.id, name)
        except ValueError as e:
            raise _fail(f"--name: {e}") from None
        s.commit()
        err.print(f"key {row.id} ({row.prefix}) for tenant {t.name}; it is shown only now:")
        typer.echo(key)


@app.command("list-tenants")
def list_tenants(database_url: DatabaseUrl = None) -> None:
    """Tenants with their quotas (their own, or 'default', and in brackets the effective
    one), active jobs and stored bytes; tab-separated."""
    settings = Settings()
    with _session(database_url) as s:
        _row("name", "id", "max_active_jobs", "active", "max_stored_bytes", "stored")
        for t in tenants.list_tenants(s):
            eff = quotas.limits(t, settings)
            _row(
                t.name,
                t.id,
                f"{_limit(t.max_active_jobs)} ({_effective(eff.max_active_jobs)})",
                str(quotas.active_jobs(s, t.id)),
                f"{_limit(t.max_stored_bytes)} ({_effective(eff.max_stored_bytes)})",
                str(quotas.stored_bytes(s, t.id)),
            )


@app.command("list-keys")
def list_keys(
    tenant: Annotated[str, typer.Argument(help="The tenant's name.")],
    database_url: DatabaseUrl = None,
) -> None:
    """A tenant's keys (id, prefix, name, created, revoked, last used), tab-separated; never
    the secrets."""
    with _session(database_url) as s:
        t = _tenant(s, tenant)
        _row("id", "prefix", "name", "created", "revoked", "last_used")
        for k in tenants.list_keys(s, t.id):
            _row(
                k.id,
                k.prefix,
                k.name,
                k.created_at.isoformat(timespec="seconds"),
                k.revoked_at.isoformat(timespec="seconds") if k.revoked_at else "",
                k.last_used_at.isoformat(timespec="seconds") if k.last_used_at else "",
            )


@app.command("revoke-key")
def revoke_key(
    key_id: Annotated[str, typer.Argument(help="The key's id (list-keys shows it).")],
    database_url: DatabaseUrl = None,
) -> None:
    """Revoke a key: requests with it answer 401 from now on."""
    with _session(database_url) as s:
        row = tenants.revoke_key(s, key_id)
        if row is None:
            raise _fail(f"no key {key_id!r}")
        s.commit()
        err.print(f"key {row.id} ({row.prefix}) revoked at {row.revoked_at}")


@app.command("set-quota")
def set_quota(
    tenant: Annotated[str, typer.Argument(help="The tenant's name.")],
    max_active_jobs: Annotated[int | None, typer.Option(min=0)] = None,
    max_stored_bytes: Annotated[int | None, typer.Option(min=0)] = None,
    default_active_jobs: Annotated[
        bool, typer.Option(help="Follow the setting DISTILLERY_DEFAULT_MAX_ACTIVE_JOBS again.")
    ] = False,
    default_stored_bytes: Annotated[
        bool, typer.Option(help="Follow the setting DISTILLERY_DEFAULT_MAX_STORED_BYTES again.")
    ] = False,
    database_url: DatabaseUrl = None,
) -> None:
    """Change a tenant's quotas; an option not given keeps its value."""
    with _session(database_url) as s:
        t = _tenant(s, tenant)
        if (default_active_jobs and max_active_jobs is not None) or (
            default_stored_bytes and max_stored_bytes is not None
        ):
            raise _fail("give a quota or its --default-... flag, not both")
        active = t.max_active_jobs if max_active_jobs is None else max_active_jobs
        stored = t.max_stored_bytes if max_stored_bytes is None else max_stored_bytes
        if default_active_jobs:
            active = None
        if default_stored_bytes:
            stored = None
        tenants.set_quota(s, t, active, stored)
        s.commit()
        err.print(
            f"tenant {t.name}: max_active_jobs {_limit(active)}, max_stored_bytes {_limit(stored)}"
        )


if __name__ == "__main__":
    app()
