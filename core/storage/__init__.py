"""Where artifacts and uploads are stored: one small interface (:class:`Storage`), a local
folder backend (:class:`LocalStorage`), an S3-compatible one (:class:`core.storage.s3.S3Storage`,
imported only when chosen), and the stores this server's settings name
(``DISTILLERY_STORAGE_BACKEND``).
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from core.settings import Settings
from core.storage.base import (
    CHUNK_BYTES,
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
from core.storage.local import FILE_MODE, LocalStorage, sha256_file

if TYPE_CHECKING:
    from core.storage.s3 import S3Storage

__all__ = [
    "CHUNK_BYTES",
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
    "check_storage",
    "join_key",
    "sha256_file",
    "upload_storage",
    "validate_key",
]


_S3_STORES: dict[tuple[Any, ...], S3Storage] = {}
_S3_LOCK = threading.Lock()


def s3_client(settings: Settings) -> Any:
    """A boto3 S3 client for the settings' endpoint, region and (optional) credentials; without
    explicit credentials boto3's chain applies (environment, profile, instance role)."""
    import boto3
    from botocore.config import Config

    secret = settings.s3_secret_access_key
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url or None,
        region_name=settings.s3_region or None,
        aws_access_key_id=settings.s3_access_key_id or None,
        aws_secret_access_key=(secret.get_secret_value() if secret is not None else None) or None,
        config=Config(retries={"max_attempts": 5, "mode": "standard"}),
    )


def _s3_store(settings: Settings, name: str) -> S3Storage:
    """The S3 store ``<s3_prefix>/<name>`` of the settings, one per process and setting (its
    bucket is checked once, when it is first made)."""
    from core.storage.s3 import S3Storage

    secret = settings.s3_secret_access_key
    ident = (
        name,
        settings.s3_bucket,
        settings.s3_prefix,
        settings.s3_endpoint_url,
        settings.s3_region,
        settings.s3_access_key_id,
        secret.get_secret_value() if secret is not None else None,
        str(settings.storage_cache_dir.resolve()),
        settings.s3_multipart_threshold_bytes,
        settings.s3_multipart_chunk_bytes,
    )
    with _S3_LOCK:
        store = _S3_STORES.get(ident)
        if store is None:
            prefix = "/".join(p for p in (settings.s3_prefix.strip("/"), name) if p)
            store = S3Storage(
                s3_client(settings),
                str(settings.s3_bucket),
                prefix,
                settings.storage_cache_dir / name,
                multipart_threshold=settings.s3_multipart_threshold_bytes,
                multipart_chunksize=settings.s3_multipart_chunk_bytes,
            )
            store.check()
            _S3_STORES[ident] = store
        return store


def artifact_storage(settings: Settings) -> Storage:
    """The store of job artifacts, checkpoints and teacher caches: ``DISTILLERY_ARTIFACTS_ROOT``,
    or ``<s3_prefix>/artifacts`` in the bucket; key ``<job id>/<name>``.

    Raises:
        StorageError: (s3) the bucket is missing or the credentials are refused (the message
            names the setting).
    """
    if settings.storage_backend == "s3":
        return _s3_store(settings, "artifacts")
    return LocalStorage(settings.artifacts_root)


def upload_storage(settings: Settings) -> Storage:
    """The store of uploaded models and datasets: ``DISTILLERY_UPLOADS_ROOT``, or
    ``<s3_prefix>/uploads`` in the bucket.

    Raises:
        StorageError: (s3) as :func:`artifact_storage`.
    """
    if settings.storage_backend == "s3":
        return _s3_store(settings, "uploads")
    return LocalStorage(settings.uploads_root)


def check_storage(settings: Settings) -> None:
    """Make both stores once (for s3: check the bucket and the credentials), at startup.

    Raises:
        StorageError: the message names the setting to fix.
    """
    artifact_storage(settings)
    upload_storage(settings)
