"""Database errors: which ones are transient (the database dropped the connection, is
restarting, refuses connections for a while, or the pool is exhausted), and what of an error a
user may read (its type and the driver's first line: never the SQL statement, its parameters
or a DETAIL line that may quote row values).

Used by the API (503 with ``Retry-After`` for a transient error: :mod:`api.errors`) and the
worker (retries with backoff: :mod:`worker.db_retry`; a job's stored error:
:mod:`worker.runner`).
"""

from __future__ import annotations

import re
import sqlite3

from sqlalchemy import exc as sa_exc

MAX_MESSAGE_CHARS = 300
"""Longest driver message kept in a public description."""

_SQL_PARTS = re.compile(r"\s*(\[SQL:|\[parameters:|\[generated in |\(Background on this error)")
_SQLITE_TRANSIENT = ("locked", "busy", "unable to open")


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is a database error that retrying the whole transaction later may cure.

    True for a connection the driver lost (``connection_invalidated``: terminated by the
    server, a restart, a network cut), PostgreSQL's operational errors (the server shutting
    down or starting up, refusing connections, a deadlock or serialization failure, a
    statement cancelled), interface errors (a closed connection), a pool checkout timeout, and
    SQLite's "database is locked". False for everything else (a programming error, a
    constraint violation, bad data, and SQLite's other operational errors such as a missing
    table).
    """
    if isinstance(exc, sa_exc.TimeoutError):  # the pool had no connection in time
        return True
    if not isinstance(exc, sa_exc.DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    if isinstance(exc.orig, sqlite3.Error):
        message = str(exc.orig).lower()
        return isinstance(exc.orig, sqlite3.OperationalError) and any(
            m in message for m in _SQLITE_TRANSIENT
        )
    return isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError)


def scrub(text: str) -> str:
    """``text`` cut before any SQL statement, parameters or SQLAlchemy background link that an
    error's ``str()`` appends (``[SQL: ...]``, ``[parameters: ...]``)."""
    match = _SQL_PARTS.search(text)
    return (text[: match.start()] if match else text).strip()


def public_message(exc: BaseException) -> str:
    """``"<ErrorType>: <message>"`` for a user or an error body: for a SQLAlchemy error the
    driver's error type and the first line of its message (at most
    :data:`MAX_MESSAGE_CHARS`), without the SQL, the parameters or a DETAIL line; for any
    other exception its type and its message with SQL parts cut (:func:`scrub`)."""
    if isinstance(exc, sa_exc.StatementError) and exc.orig is not None:
        inner: BaseException = exc.orig
        lines = scrub(str(inner)).splitlines()
        message = lines[0].strip() if lines else ""
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[:MAX_MESSAGE_CHARS] + "..."
        return f"{type(inner).__name__}: {message}" if message else type(inner).__name__
    message = scrub(str(exc))
    if isinstance(exc, sa_exc.SQLAlchemyError):  # e.g. a pool timeout: its first line
        message = message.splitlines()[0] if message else ""
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
