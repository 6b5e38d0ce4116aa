"""Uploaded files (``/v1/files``): receive a dataset or a model archive into the upload store,
check it, record it for the caller's tenant; list, read and delete a tenant's files; check a
job's ``file-<id>`` references at submit.

An upload is streamed into storage in chunks (never whole in memory) under a new id, then
checked: a dataset with :func:`kd_engine.data.inspect.inspect_dataset`, a model archive with
:func:`api.uploads.models.unpack_model` (the archive is deleted once unpacked). Only a file that
passed its checks and fits the tenant's stored-bytes quota gets a row; on any refusal nothing
is kept.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO, Literal

from sqlalchemy import delete as sa_delete
from sqlalchemy import select
from sqlalchemy.orm import Session

from api import idempotency, quotas, refs
from api.db import FINISHED, File, IdempotencyKey, Job, utcnow
from api.errors import Conflict, InvalidSpec, NotFound
from api.settings import Settings
from api.storage import StorageError, StoredObject, TooLarge, join_key, upload_storage
from api.uploads.errors import InvalidUpload, UploadTooLarge
from api.uploads.models import model_limits, unpack_model
from kd_engine.data.inspect import DatasetFields, inspect_dataset
from kd_engine.errors import SpecError
from kd_engine.spec_fields import check_text

log = logging.getLogger("distillery.api")

Purpose = Literal["dataset", "model"]
ROUTE = "POST /v1/files"
CHUNK_BYTES = 1 << 20
MAX_FILENAME_CHARS = 255
MAX_COLUMN_CHARS = 256
MODEL_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".zip")
FORM_FIELDS = DatasetFields(
    source="file",
    text_column="text_column",
    text_pair_column="text_pair_column",
    label_column="label_column",
)


@dataclass(frozen=True)
class DatasetColumns:
    """The columns a dataset upload is checked with (``label`` None: an unlabelled file)."""

    text: str = "text"
    label: str | None = "label"
    text_pair: str | None = None


def _new_id() -> str:
    return "file-" + uuid.uuid4().hex


def clean_filename(raw: str | None) -> str:
    """The upload's file name without any folder part, checked.

    Raises:
        InvalidUpload: missing, longer than 255 characters or with a control character
            (naming ``file``).
    """
    name = PurePosixPath((raw or "").replace("\\", "/")).name
    if not name:
        raise InvalidUpload("the upload has no file name (send it as the `file` form field)")
    try:
        return check_text(name, max_chars=MAX_FILENAME_CHARS)
    except ValueError as e:
        raise InvalidUpload(f"file name: {e}") from None


def _suffix(filename: str, purpose: Purpose) -> str:
    lower = filename.lower()
    allowed = refs.DATASET_SUFFIXES if purpose == "dataset" else MODEL_SUFFIXES
    for suffix in sorted(allowed, key=len, reverse=True):
        if lower.endswith(suffix):
            return suffix
    kind = "a dataset" if purpose == "dataset" else "a model archive"
    raise InvalidUpload(
        f"{filename!r}: {kind} upload must be named *{', *'.join(allowed)} (the suffix gives "
        "its format)"
    )


def clean_column(value: str | None, field: str) -> str | None:
    """A column form field: None when absent or empty, else checked (256 characters, no
    control character).

    Raises:
        InvalidSpec: naming ``field``.
    """
    if not value:
        return None
    try:
        return check_text(value, max_chars=MAX_COLUMN_CHARS)
    except ValueError as e:
        raise InvalidSpec(str(e), field) from None


def _receive(source: BinaryIO, key: str, settings: Settings) -> StoredObject:
    """Copy ``source`` into the upload store under ``key`` in chunks, at most
    ``settings.max_upload_bytes``.

    Raises:
        UploadTooLarge: over the cap (nothing is kept).
    """
    store = upload_storage(settings)
    try:
        with store.writer(key, max_bytes=settings.max_upload_bytes) as w:
            while chunk := source.read(CHUNK_BYTES):
                w.write(chunk)
            return w.commit()
    except TooLarge:
        raise UploadTooLarge(
            f"the upload is larger than the limit of {settings.max_upload_bytes} bytes "
            f"({settings.max_upload_bytes / 1024**2:.2f} MiB)",
            settings.max_upload_bytes,
        ) from None


def _check_dataset(
    file_id: str, stored: StoredObject, filename: str, columns: DatasetColumns, settings: Settings
) -> dict[str, object]:
    path = upload_storage(settings).local_path(stored.key)
    try:
        report = inspect_dataset(
            path,
            columns.text,
            columns.label,
            text_pair_column=columns.text_pair,
            task="auto",
            name=filename,
            fields=FORM_FIELDS,
            max_rows=settings.dataset_check_rows,
        )
    except SpecError as e:
        raise InvalidUpload(e.reason, e.field) from None
    return report.model_dump(mode="json")


def _unpack(
    file_id: str, stored: StoredObject, settings: Settings
) -> tuple[int, dict[str, object]]:
    store = upload_storage(settings)
    try:
        report = unpack_model(
            store.local_path(stored.key),
            store,
            refs.upload_model_prefix(file_id),
            model_limits(settings),
        )
    finally:
        store.delete(stored.key)
    return report.total_bytes, report.model_dump(mode="json")


def request_sha256(
    stored: StoredObject, purpose: Purpose, filename: str, columns: DatasetColumns
) -> str:
    """What an ``Idempotency-Key`` compares: the file's sha256, its name and the form fields."""
    return idempotency.body_sha256(
        {
            "sha256": stored.sha256,
            "purpose": purpose,
            "filename": filename,
            "columns": [columns.text, columns.label, columns.text_pair]
            if purpose == "dataset"
            else None,
        }
    )


def _remove(settings: Settings, file_id: str) -> None:
    try:
        upload_storage(settings).delete_prefix(file_id)
    except (OSError, StorageError):
        log.exception("upload %s: could not remove its files", file_id)


def create(
    session: Session,
    settings: Settings,
    source: BinaryIO,
    raw_filename: str | None,
    purpose: Purpose,
    columns: DatasetColumns,
    *,
    tenant_id: str,
    idempotency_key: str | None = None,
) -> tuple[File, bool]:
    """Store, check and record an upload of ``tenant_id``. Returns the file row and whether it
    is an earlier upload replayed for the same ``idempotency_key`` (this one's data is then
    deleted).

    Raises:
        InvalidUpload: a bad name or suffix, a dataset or archive its checks refuse (422,
            naming the line, column or member); InvalidSpec: a bad column field, or the key
            used with another file (422).
        UploadTooLarge: over ``settings.max_upload_bytes`` or an archive's caps (413).
        QuotaExceeded: the tenant's stored bytes would pass its limit (429).
    """
    filename = clean_filename(raw_filename)
    suffix = _suffix(filename, purpose)
    quotas.check_stored_bytes(session, tenant_id, settings)  # any room at all, before reading
    session.rollback()
    file_id = _new_id()
    if purpose == "dataset":
        key = refs.upload_dataset_key(file_id, suffix)
    else:
        key = join_key(file_id, "archive")  # read by content; deleted once unpacked
    try:
        stored = _receive(source, key, settings)
        body_sha = request_sha256(stored, purpose, filename, columns)
        if idempotency_key is not None:
            earlier = idempotency.find(
                session, tenant_id, ROUTE, idempotency_key, body_sha, settings.idempotency_ttl_s
            )
            if earlier is not None:
                _remove(settings, file_id)
                return get(session, earlier, tenant_id=tenant_id), True
        if purpose == "dataset":
            size, report = stored.size, _check_dataset(file_id, stored, filename, columns, settings)
        else:
            size, report = _unpack(file_id, stored, settings)

        def add() -> str:
            quotas.check_stored_bytes(session, tenant_id, settings, incoming_bytes=size)
            session.add(
                File(
                    id=file_id,
                    tenant_id=tenant_id,
                    kind=purpose,
                    filename=filename,
                    size_bytes=size,
                    sha256=stored.sha256,
                    status="ready",
                    report=report,
                    created_at=utcnow(),
                )
            )
            return file_id

        outcome = idempotency.create_once(
            session,
            tenant_id=tenant_id,
            route=ROUTE,
            key=idempotency_key,
            request_sha256=body_sha,
            ttl_s=settings.idempotency_ttl_s,
            create=add,
        )
    except BaseException:
        _remove(settings, file_id)
        raise
    if outcome.replayed:
        _remove(settings, file_id)
    return get(session, outcome.resource_id, tenant_id=tenant_id), outcome.replayed


def get(session: Session, file_id: str, *, tenant_id: str) -> File:
    """The upload ``file_id`` of ``tenant_id``.

    Raises:
        NotFound: no such file, or another tenant's (the same answer).
    """
    row = session.get(File, file_id) if refs.is_file_id(file_id) else None
    if row is None or row.tenant_id != tenant_id:
        raise NotFound(f"no file {file_id!r}")
    return row


def list_files(session: Session, *, tenant_id: str, purpose: Purpose | None = None) -> list[File]:
    """The tenant's uploads, newest first (optionally of one ``purpose``)."""
    q = select(File).where(File.tenant_id == tenant_id)
    if purpose is not None:
        q = q.where(File.kind == purpose)
    return list(session.scalars(q.order_by(File.created_at.desc(), File.id.desc())))


def jobs_using_file(session: Session, file_id: str, tenant_id: str) -> list[str]:
    """Ids of the tenant's unfinished jobs (queued, running, cancelling) whose spec names
    ``file_id`` anywhere, oldest first."""
    q = (
        select(Job.id, Job.spec)
        .where(Job.tenant_id == tenant_id, Job.status.not_in(FINISHED))
        .order_by(Job.created_at)
    )
    return [row.id for row in session.execute(q) if _mentions(row.spec, file_id)]


def _mentions(value: object, ref: str) -> bool:
    if isinstance(value, str):
        return value == ref
    if isinstance(value, dict):
        return any(_mentions(v, ref) for v in value.values())
    if isinstance(value, list):
        return any(_mentions(v, ref) for v in value)
    return False


def delete(session: Session, settings: Settings, file_id: str, *, tenant_id: str) -> None:
    """Delete an upload of ``tenant_id``: its row, its idempotency keys and its stored data.

    Raises:
        NotFound: no such file (or another tenant's).
        Conflict: an unfinished job of the tenant names it (the message names the jobs).
    """
    row = get(session, file_id, tenant_id=tenant_id)
    users = jobs_using_file(session, file_id, tenant_id)
    if users:
        raise Conflict(
            f"file {file_id} is used by unfinished job(s) {', '.join(users)}; delete it once "
            "they have finished (or cancel them)",
            None,
            {"jobs": users},
        )
    session.delete(row)
    session.execute(  # a replay of its Idempotency-Key would name a file that is gone
        sa_delete(IdempotencyKey)
        .where(IdempotencyKey.resource_id == file_id)
        .execution_options(synchronize_session=False)
    )
    session.commit()
    _remove(settings, file_id)


def check_reference(session: Session, ref: str, field: str, kind: Purpose, tenant_id: str) -> None:
    """A job's ``file-<id>`` reference in ``field``: an upload of ``tenant_id`` of ``kind``.

    Raises:
        InvalidSpec: naming ``field``: no such upload (or another tenant's: the same answer),
            or one of the other kind.
    """
    row = session.get(File, ref) if refs.is_file_id(ref) else None
    if row is None or row.tenant_id != tenant_id:
        raise InvalidSpec(f"{ref!r}: no such uploaded file (GET /v1/files lists yours)", field)
    if row.kind != kind:
        raise InvalidSpec(
            f"{ref!r} ({row.filename}) is an uploaded {row.kind}; this field needs a {kind}",
            field,
        )
