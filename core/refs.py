"""Where model and dataset references point on this server (no database access).

``job:<id>`` is the artifact directory of that job; ``file-<32 hex>`` is an upload (the
reference is its id), resolved by id alone (the API checked at submit that it is the caller's
and of the right kind); ``file://`` paths must lie under the configured models or data root;
``builtin:`` names come from wheels; ``hf://`` only when the operator enables hub access.
"""

from __future__ import annotations

import re
from pathlib import Path

from core.settings import Settings
from core.storage import artifact_storage, join_key, upload_storage
from kd_engine.references import (
    builtin_model_path,
    check_model_files,
    hub_id,
    local_path_under,
    scheme_of,
)

FILE_ID = re.compile(r"^file-[0-9a-f]{32}$")
DATASET_SUFFIXES = (".csv", ".jsonl", ".ndjson", ".parquet")
"""The formats a dataset upload may have (by its file name's suffix)."""
MODEL_DIR = "model"
"""The folder under an upload's prefix that holds an uploaded model's files."""


def is_file_id(value: str) -> bool:
    """Whether ``value`` has the form of an upload's id (``file-`` and 32 hex digits)."""
    return bool(FILE_ID.match(value))


def upload_dataset_key(file_id: str, suffix: str) -> str:
    """The storage key of an uploaded dataset: ``<id>/data<suffix>``.

    Raises:
        ValueError: ``file_id`` is not an upload id or ``suffix`` not a dataset suffix.
    """
    if not is_file_id(file_id) or suffix not in DATASET_SUFFIXES:
        raise ValueError(f"{file_id!r}: not an upload id (or {suffix!r} not a dataset suffix)")
    return join_key(file_id, "data" + suffix)


def upload_model_prefix(file_id: str) -> str:
    """The storage prefix of an uploaded model's files: ``<id>/model``.

    Raises:
        ValueError: ``file_id`` is not an upload id.
    """
    if not is_file_id(file_id):
        raise ValueError(f"{file_id!r} is not an upload id")
    return join_key(file_id, MODEL_DIR)


def _upload_model_dir(ref: str, settings: Settings) -> Path:
    if not is_file_id(ref):
        raise ValueError(f"{ref!r} is not an upload id (file- and 32 hex digits)")
    path = upload_storage(settings).local_path(upload_model_prefix(ref))
    if not (path / "config.json").is_file():
        raise ValueError(f"{ref!r} is not an uploaded model (no such upload, or a dataset)")
    check_model_files(path, path, ref)  # nothing of an upload may lead out of its own folder
    return path


def _upload_dataset_file(ref: str, settings: Settings) -> Path:
    if not is_file_id(ref):
        raise ValueError(f"{ref!r} is not an upload id (file- and 32 hex digits)")
    store = upload_storage(settings)
    for suffix in DATASET_SUFFIXES:
        key = upload_dataset_key(ref, suffix)
        if store.exists(key):
            return store.local_path(key)
    raise ValueError(f"{ref!r} is not an uploaded dataset (no such upload, or a model)")


JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


def is_job_id(value: str) -> bool:
    """Whether ``value`` has the form of a job id (a lower-case UUID)."""
    return bool(JOB_ID.match(value))


def job_key(job_id: str) -> str:
    """The prefix of a job's artifacts in the artifact store (its id).

    Raises:
        ValueError: ``job_id`` is not a job id (so it cannot escape the artifacts root).
    """
    if not JOB_ID.match(job_id):
        raise ValueError(f"{job_id!r} is not a job id")
    return job_id


def job_dir(settings: Settings, job_id: str) -> Path:
    """The artifact directory of a job (a local directory: the artifact store's
    :meth:`~core.storage.Storage.local_path` of the job's prefix, which may not exist).

    Raises:
        ValueError: ``job_id`` is not a job id (so it cannot escape the artifacts root).
    """
    return artifact_storage(settings).local_path(job_key(job_id))


def model_location(ref: str, settings: Settings) -> Path | str:
    """A local directory (or, for hf://, a hub id) for a model reference.

    A ``file://`` directory is read only when every entry is a regular file (or folder) that
    resolves under the models root (:func:`kd_engine.references.check_model_files`); the API
    checks this at submit and the worker again before it loads the model.

    Raises:
        ValueError: unknown scheme or name, a path outside the models root, a missing directory,
            a link out of the root or a file that is not a regular file.
    """
    scheme = scheme_of(ref)
    if scheme == "builtin:":
        return builtin_model_path(ref.removeprefix("builtin:"), settings.cache_dir.resolve())
    if scheme == "file://":
        path = local_path_under(ref, settings.models_root)
        if not (path / "config.json").is_file():
            raise ValueError(f"{ref!r} holds no config.json: not a transformers checkpoint")
        check_model_files(path, settings.models_root, ref)
        return path
    if scheme == "file-":
        return _upload_model_dir(ref, settings)
    if scheme == "job:":
        path = job_dir(settings, ref.removeprefix("job:"))
        if not (path / "config.json").is_file():
            raise ValueError(f"{ref!r} has no stored model (did the job succeed?)")
        return path
    return hub_id(ref, settings.allow_hub)


def dataset_file(ref: str, settings: Settings) -> Path:
    """A local file for a non-builtin dataset reference (``file://`` under the data root, or
    an uploaded dataset ``file-<id>``, found by its id alone).

    Raises:
        ValueError: not file:// or an upload, outside the data root, missing, or not a file.
    """
    scheme = scheme_of(ref)
    if scheme == "file-":
        return _upload_dataset_file(ref, settings)
    if scheme != "file://":
        raise ValueError(
            f"{ref!r}: datasets are builtin:<name> or file://<path>, or an upload's id file-<id>"
        )
    path = local_path_under(ref, settings.data_root)
    if not path.is_file():
        raise ValueError(f"{ref!r} is not a file")
    return path
