"""Uploaded files (``/v1/files``): receive a dataset or a model archive into the upload store,
check it, record it for the caller's tenant; list, read and delete a tenant's files; check a
job's ``file-<id>`` references at submit.

An upload gets its row first, ``uploading`` and committed, so that no byte is ever stored
without a row; then it is streamed into storage in chunks (never whole in memory) under its id
while a heartbeat (:class:`core.upload_liveness.UploadHeartbeat`) records the bytes received,
and checked: a dataset with :func:`kd_engine.data.inspect.inspect_dataset`, a model archive
with :func:`core.uploads.models.unpack_model` (the archive is deleted once unpacked). A file
that passes its checks and fits the tenant's stored-bytes quota becomes ``ready``; one its
checks refuse becomes ``failed`` with the reason and its bytes are deleted; on any other
refusal (quota, a replayed ``Idempotency-Key``, an error) the row and the bytes are deleted.
A process that dies meanwhile leaves an ``uploading`` row that stops beating: the reconciler's
sweep (:func:`core.upload_liveness.sweep`) removes it with its files.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import BinaryIO, Literal

from sqlalchemy import delete as sa_delete
from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from core import idempotency, quotas, refs
from core.db import File, IdempotencyKey, Job, utcnow
from core.errors import Conflict, NotFound
from core.job_status import FINISHED
from core.settings import Settings
from core.storage import StorageError, StoredObject, TooLarge, join_key, upload_storage
from core.upload_liveness import UploadHeartbeat, heartbeat_interval_s
from core.uploads.errors import InvalidUpload, UploadTooLarge
from core.uploads.models import model_limits, unpack_model
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
        SpecError: naming ``field``.
    """
    if not value:
        return None
    try:
        return check_text(value, max_chars=MAX_COLUMN_CHARS)
    except ValueError as e:
        raise SpecError(field, str(e)) from None


def _receive(
    source: BinaryIO, key: str, settings: Settings, beat: UploadHeartbeat | None = None
) -> StoredObject:
    """Copy ``source`` into the upload store under ``key`` in chunks, at most
    ``settings.max_upload_bytes``; ``beat.received`` follows the bytes written.

    Raises:
        UploadTooLarge: over the cap (nothing is kept).
    """
    store = upload_storage(settings)
    try:
        with store.writer(key, max_bytes=settings.max_upload_bytes) as w:
            while chunk := source.read(CHUNK_BYTES):
                w.write(chunk)
                if beat is not None:
                    beat.received = w.written
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


def _start(session: Session, file_id: str, tenant_id: str, purpose: Purpose, filename: str) -> None:
    """Commit the upload's row, ``uploading`` with nothing stored yet."""
    now = utcnow()
    session.add(
        File(
            id=file_id,
            tenant_id=tenant_id,
            kind=purpose,
            filename=filename,
            size_bytes=0,
            sha256="",
            status="uploading",
            report={},
            created_at=now,
            updated_at=now,
        )
    )
    session.commit()


def _end(session: Session, settings: Settings, file_id: str, reason: str | None) -> None:
    """After a refusal: delete the upload's files, then mark its row ``failed`` with
    ``reason`` (a file its checks refused), or delete the row (``reason`` None). Files go first:
    a process that dies in between leaves an ``uploading`` row, which the sweep removes. A
    database error here is logged (the refusal the caller raises matters more)."""
    session.rollback()
    _remove(settings, file_id)
    where = (File.id == file_id, File.status == "uploading")
    try:
        if reason is None:
            session.execute(
                sa_delete(File).where(*where).execution_options(synchronize_session=False)
            )
        else:
            session.execute(
                update(File)
                .where(*where)
                .values(status="failed", error=reason, size_bytes=0, updated_at=utcnow())
                .execution_options(synchronize_session=False)
            )
        session.commit()
    except SQLAlchemyError:
        session.rollback()
        log.exception("upload %s: its row could not be ended (the sweep will)", file_id)


def _refusal(e: InvalidUpload | UploadTooLarge) -> str:
    return e.message if e.field in (None, "file") else f"{e.field}: {e.message}"


def _ready(
    session: Session,
    settings: Settings,
    file_id: str,
    tenant_id: str,
    size: int,
    sha256: str,
    report: dict[str, object],
) -> str:
    """Make the upload's row ``ready`` (inside :func:`core.idempotency.create_once`'s
    transaction, the tenant locked): its own bytes so far are left out of the quota check,
    which then counts its final ``size``.

    Raises:
        Conflict: the row is gone or no longer ``uploading`` (deleted by its owner, or swept
            after ``upload_stale_s`` without a heartbeat).
        QuotaExceeded: the tenant's stored bytes would pass its limit.
    """
    row = session.get(File, file_id, with_for_update=True, populate_existing=True)
    if row is None or row.status != "uploading":
        raise Conflict(
            f"upload {file_id} was deleted while it was being checked (by a DELETE, or as "
            f"abandoned after {settings.upload_stale_s:g} s without progress); upload it again"
        )
    row.size_bytes = 0
    session.flush()
    quotas.check_stored_bytes(session, tenant_id, settings, incoming_bytes=size)
    row.size_bytes = size
    row.sha256 = sha256
    row.report = report
    row.status = "ready"
    row.updated_at = utcnow()
    return file_id


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
    """Store, check and record an upload of ``tenant_id`` (the module docstring gives its
    states). Returns the ``ready`` file row and whether it is an earlier upload replayed for
    the same ``idempotency_key`` (this one's row and data are then deleted).

    Raises:
        InvalidUpload: a bad name or suffix (no row is made), a dataset or archive its checks
            refuse (422, naming the line, column or member; the row is kept ``failed`` with
            that reason); SpecError: a bad column field, or the key used with another file
            (422).
        UploadTooLarge: over ``settings.max_upload_bytes`` or an archive's caps (413; the row
            is kept ``failed``).
        QuotaExceeded: the tenant's stored bytes would pass its limit (429).
        Conflict: the row was deleted while the file was being checked (409).
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
    _start(session, file_id, tenant_id, purpose, filename)
    beat = UploadHeartbeat(session.get_bind(), file_id, heartbeat_interval_s(settings))
    try:
        with beat:
            stored = _receive(source, key, settings, beat)
            beat.beat()  # the whole size counts from now on, while the file is checked
            body_sha = request_sha256(stored, purpose, filename, columns)
            if idempotency_key is not None:
                earlier = idempotency.find(
                    session, tenant_id, ROUTE, idempotency_key, body_sha, settings.idempotency_ttl_s
                )
                if earlier is not None:
                    _end(session, settings, file_id, None)
                    return get(session, earlier, tenant_id=tenant_id), True
            session.rollback()  # no transaction held open while the file is checked
            if purpose == "dataset":
                size = stored.size
                report = _check_dataset(file_id, stored, filename, columns, settings)
            else:
                size, report = _unpack(file_id, stored, settings)
        outcome = idempotency.create_once(
            session,
            tenant_id=tenant_id,
            route=ROUTE,
            key=idempotency_key,
            request_sha256=body_sha,
            ttl_s=settings.idempotency_ttl_s,
            create=lambda: _ready(
                session, settings, file_id, tenant_id, size, stored.sha256, report
            ),
        )
    except (InvalidUpload, UploadTooLarge) as e:
        _end(session, settings, file_id, _refusal(e))
        raise
    except BaseException:
        _end(session, settings, file_id, None)
        raise
    if outcome.replayed:
        _end(session, settings, file_id, None)
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
    """A job's ``file-<id>`` reference in ``field``: a ``ready`` upload of ``tenant_id`` of
    ``kind``.

    Raises:
        SpecError: naming ``field``: no such upload (or another tenant's: the same answer),
            one still uploading, a failed one, or one of the other kind.
    """
    row = session.get(File, ref) if refs.is_file_id(ref) else None
    if row is None or row.tenant_id != tenant_id:
        raise SpecError(field, f"{ref!r}: no such uploaded file (GET /v1/files lists yours)")
    if row.status == "uploading":
        raise SpecError(
            field,
            f"{ref!r} is still uploading (being received or checked); submit once "
            f"GET /v1/files/{ref} says ready",
        )
    if row.status != "ready":
        raise SpecError(
            field, f"{ref!r} is an upload its checks refused ({row.error}); upload a fixed file"
        )
    if row.kind != kind:
        raise SpecError(
            field, f"{ref!r} ({row.filename}) is an uploaded {row.kind}; this field needs a {kind}"
        )
