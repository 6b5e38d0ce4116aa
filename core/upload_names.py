"""Name uploads by their filename beside their id: ``file-<32 hex>`` means nothing to a
person, ``file-3f2a… (reviews.csv)`` does. Used in error messages (submit, a failed job's
reason) and on the dashboard's pages."""

from __future__ import annotations

import re
from collections.abc import Iterable

from sqlalchemy import select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core.db import File
from kd_engine.errors import SpecError

FILE_REF = re.compile(r"file-[0-9a-f]{32}")
"""An upload's id anywhere in a text."""


def filenames(session: Session, ids: Iterable[str], tenant_id: str | None = None) -> dict[str, str]:
    """``{id: filename}`` of the uploads among ``ids`` (of ``tenant_id`` when given; ids that
    are not uploads, or are gone, are left out)."""
    wanted = {i for i in ids if FILE_REF.fullmatch(i)}
    if not wanted:
        return {}
    q = select(File.id, File.filename).where(File.id.in_(wanted))
    if tenant_id is not None:
        q = q.where(File.tenant_id == tenant_id)
    return {row.id: row.filename for row in session.execute(q)}


def label(ref: str, names: dict[str, str]) -> str:
    """``ref`` with its filename in parentheses when it is a known upload, else ``ref``."""
    name = names.get(ref)
    return f"{ref} ({name})" if name else ref


def name_uploads(session: Session, text: str, tenant_id: str | None = None) -> str:
    """``text`` with `` (filename)`` after each upload id in it (after its closing quote when
    quoted: ``'file-3f2a...' (reviews.csv)``); an id already followed by its filename, or not
    an upload (of ``tenant_id``), is left alone."""
    names = filenames(session, FILE_REF.findall(text), tenant_id)
    if not names:
        return text

    def repl(m: re.Match[str]) -> str:
        name = names.get(m.group(2))
        if name is None or m.string.startswith(f" ({name})", m.end()):
            return m.group(0)
        return f"{m.group(0)} ({name})"

    return _QUOTED_REF.sub(repl, text)


_QUOTED_REF = re.compile(r"(['\"]?)(" + FILE_REF.pattern + r")\1")


def name_uploads_in_error(session: Session, error: Exception, tenant_id: str) -> None:
    """Put the filenames of the uploads a :class:`~core.errors.DomainError`'s message (a
    :class:`~kd_engine.errors.SpecError`'s reason) names beside their ids (in place); the
    session is rolled back first (the request failed), and the message is left as it was if
    the lookup fails."""
    attr = "reason" if isinstance(error, SpecError) else "message"
    message = getattr(error, attr, None)
    if not isinstance(message, str) or not FILE_REF.search(message):
        return
    try:
        session.rollback()
        setattr(error, attr, name_uploads(session, message, tenant_id))
    except SQLAlchemyError:
        session.rollback()
