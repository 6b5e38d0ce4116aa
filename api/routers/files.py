"""/v1/files: upload a dataset or a model archive, list, read and delete the tenant's files."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Form, Path, Query, Response, UploadFile
from pydantic import AfterValidator

from api.auth import CallerDep
from api.deps import SessionDep, SettingsDep
from api.params import printable
from api.routers.jobs import IdempotencyKeyHeader
from api.schemas import FileList, FileOut
from core import files, idempotency

router = APIRouter(prefix="/v1/files", tags=["files"])
FileId = Annotated[
    str,
    Path(description="The file's id (file- and 32 hex digits).", max_length=64),
    AfterValidator(printable),
]
Purpose = Literal["dataset", "model"]


@router.post("", status_code=201, response_model=FileOut)
def upload_file(
    file: UploadFile,
    purpose: Annotated[Purpose, Form(description="dataset or model")],
    session: SessionDep,
    settings: SettingsDep,
    caller: CallerDep,
    response: Response,
    text_column: Annotated[
        str, Form(max_length=256, description="A dataset's text column.")
    ] = "text",
    label_column: Annotated[
        str, Form(max_length=256, description="A dataset's label column.")
    ] = "label",
    unlabelled: Annotated[
        bool,
        Form(description="true for a dataset without labels (a corpus for method.corpus)."),
    ] = False,
    text_pair_column: Annotated[
        str, Form(max_length=256, description="A dataset's second text column, if any.")
    ] = "",
    idempotency_key: IdempotencyKeyHeader = None,
) -> FileOut:
    """Upload a dataset (``.csv``, ``.jsonl``/``.ndjson``, ``.parquet``, UTF-8, a BOM is
    stripped) or a model (a ``.tar``, ``.tar.gz``/``.tgz`` or ``.zip`` of a transformers
    directory with safetensors weights) as ``multipart/form-data``. It is checked at once:
    201 with what was found (``report``); 422 naming the line, column or archive member of a
    bad file; 413 over ``DISTILLERY_MAX_UPLOAD_BYTES`` or an archive's caps; 429 when the
    tenant's stored bytes would pass its quota. No byte is kept on a refusal; a file its
    checks refused (422, 413) stays listed as ``failed`` with the reason until deleted. While
    it is received and checked the file is listed as ``uploading``. A repeat with the same
    ``Idempotency-Key`` and file answers the first file with ``Idempotent-Replayed: true``."""
    key = idempotency.check_key(idempotency_key)
    columns = files.DatasetColumns(
        text=files.clean_column(text_column, "text_column") or "text",
        label=None if unlabelled else files.clean_column(label_column, "label_column") or "label",
        text_pair=files.clean_column(text_pair_column, "text_pair_column"),
    )
    row, replayed = files.create(
        session,
        settings,
        file.file,
        file.filename,
        purpose,
        columns,
        tenant_id=caller.tenant_id,
        idempotency_key=key,
    )
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return FileOut.of(row)


@router.get("", response_model=FileList)
def list_files(
    session: SessionDep,
    caller: CallerDep,
    purpose: Annotated[Purpose | None, Query(description="Only files of this purpose.")] = None,
) -> FileList:
    """The tenant's files, newest first."""
    rows = files.list_files(session, tenant_id=caller.tenant_id, purpose=purpose)
    return FileList(items=[FileOut.of(f) for f in rows])


@router.get("/{file_id}", response_model=FileOut)
def get_file(file_id: FileId, session: SessionDep, caller: CallerDep) -> FileOut:
    """A file's metadata and the report of its checks."""
    return FileOut.of(files.get(session, file_id, tenant_id=caller.tenant_id))


@router.delete("/{file_id}", status_code=204, response_class=Response)
def delete_file(
    file_id: FileId, session: SessionDep, settings: SettingsDep, caller: CallerDep
) -> Response:
    """Delete a file and its stored data (204). 409 while a queued, running or cancelling
    job names it (the message names the job)."""
    files.delete(session, settings, file_id, tenant_id=caller.tenant_id)
    return Response(status_code=204)
