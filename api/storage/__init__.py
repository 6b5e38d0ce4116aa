"""Where artifacts and uploads are stored: one small interface (:class:`Storage`), a local
folder backend (:class:`LocalStorage`), and the stores this server's settings name.

An S3-compatible backend can be added behind the same interface; only the two factories below
would choose it.
"""

from __future__ import annotations

from api.settings import Settings
from api.storage.base import (
    KEY_RULE,
    InvalidKey,
    ObjectNotFound,
    ObjectWriter,
    Storage,
    StorageError,
    StoredObject,
    TooLarge,
    join_key,
    validate_key,
)
from api.storage.local import FILE_MODE, LocalStorage, sha256_file

__all__ = [
    "FILE_MODE",
    "KEY_RULE",
    "InvalidKey",
    "LocalStorage",
    "ObjectNotFound",
    "ObjectWriter",
    "Storage",
    "StorageError",
    "StoredObject",
    "TooLarge",
    "artifact_storage",
    "join_key",
    "sha256_file",
    "upload_storage",
    "validate_key",
]


def artifact_storage(settings: Settings) -> Storage:
    """The store of job artifacts (``DISTILLERY_ARTIFACTS_ROOT``): key ``<job id>/<name>``."""
    return LocalStorage(settings.artifacts_root)


def upload_storage(settings: Settings) -> Storage:
    """The store of uploaded models and datasets (``DISTILLERY_UPLOADS_ROOT``)."""
    return LocalStorage(settings.uploads_root)
