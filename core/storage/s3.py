"""Storage in an S3-compatible bucket (AWS S3, MinIO, Ceph RGW, moto's server), on boto3.

Key ``a/b`` of a store is the object ``<prefix>a/b`` of the bucket. A write is spooled into a
local temporary file while its sha256 and size are counted (so a cap is enforced before
anything reaches the bucket), then sent with boto3's managed transfer (multipart above
``multipart_threshold`` bytes, parts sent in parallel); an S3 PUT is atomic, so readers see the
old object or the new one, never a part. The sha256 is kept in the object's metadata
(``x-amz-meta-sha256``). Reads stream the object's body.

:meth:`S3Storage.local_path` is what the worker and the model checks need: a local copy of an
object or of every object under a prefix, in a cache folder, refreshed by ETag (a changed or
removed object is fetched again or dropped).

Errors: a missing object is :class:`ObjectNotFound`; a missing bucket, refused credentials or
an unreachable endpoint is a :class:`StorageError` naming the setting to fix.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, BinaryIO

from boto3.exceptions import Boto3Error
from boto3.s3.transfer import TransferConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    PartialCredentialsError,
)

from core.storage.base import (
    CHUNK_BYTES,
    InvalidKey,
    ObjectNotFound,
    ObjectWriter,
    Storage,
    StorageError,
    StoredObject,
    join_key,
    validate_key,
)
from core.storage.local import sha256_file

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client  # pragma: no cover
else:
    S3Client = Any

SHA256_META = "sha256"
"""The user-metadata field holding an object's hex sha256."""
_META_DIR = ".etags"  # in the cache: <key>'s ETag at .etags/<key> (no key starts with '.')
_PARTIAL_DIR = ".partial"
_MISSING_CODES = {"404", "NoSuchKey", "NotFound"}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AccessDenied",
    "ExpiredToken",
    "InvalidToken",
    "UnrecognizedClientException",
    "403",
    "Forbidden",
}


def _code(e: ClientError) -> str:
    return str(e.response.get("Error", {}).get("Code", ""))


class S3Storage(Storage):
    """Objects under ``prefix`` in ``bucket``, through the boto3 S3 ``client``.

    Args:
        client: a boto3 S3 client (its endpoint, region and credentials are the caller's).
        bucket: the bucket's name (``DISTILLERY_S3_BUCKET``).
        prefix: a key prefix inside the bucket, such as ``distillery/artifacts`` (``""``: the
            bucket's root); validated like a key.
        cache_dir: local folder for :meth:`local_path` copies and staged directories.
        multipart_threshold: objects of at least this many bytes are sent in parts
            (``multipart_chunksize`` each).
    """

    def __init__(
        self,
        client: S3Client,
        bucket: str,
        prefix: str,
        cache_dir: Path,
        *,
        multipart_threshold: int = 64 * 1024**2,
        multipart_chunksize: int = 16 * 1024**2,
    ) -> None:
        self.client = client
        self.bucket = bucket
        prefix = prefix.strip("/")
        self.prefix = validate_key(prefix) + "/" if prefix else ""
        self.cache = Path(cache_dir).resolve()
        self.transfer = TransferConfig(
            multipart_threshold=multipart_threshold,
            multipart_chunksize=multipart_chunksize,
            max_concurrency=4,
        )
        self._cache_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"S3Storage(s3://{self.bucket}/{self.prefix})"

    # -- errors -------------------------------------------------------------------------------

    def _error(self, e: Exception, what: str) -> StorageError:
        """The :class:`StorageError` for a boto3/botocore error during ``what``."""
        where = f"s3://{self.bucket}/{self.prefix}"
        if isinstance(e, ClientError):
            code = _code(e)
            if code == "NoSuchBucket":
                return StorageError(
                    f"{what}: the S3 bucket {self.bucket!r} does not exist (DISTILLERY_S3_BUCKET; "
                    "create it, or check DISTILLERY_S3_ENDPOINT_URL / DISTILLERY_S3_REGION)"
                )
            if code in _CREDENTIAL_CODES:
                return StorageError(
                    f"{what}: S3 refused the request on {where} ({code}): check the credentials "
                    "(DISTILLERY_S3_ACCESS_KEY_ID / DISTILLERY_S3_SECRET_ACCESS_KEY, or the "
                    "boto3 chain: AWS_ACCESS_KEY_ID, AWS_PROFILE, the instance role) and that "
                    "they may use the bucket (docs/production.md lists the IAM actions)"
                )
            return StorageError(f"{what}: S3 error {code or '?'} on {where}: {e}")
        if isinstance(e, NoCredentialsError | PartialCredentialsError):
            return StorageError(
                f"{what}: no S3 credentials found (set DISTILLERY_S3_ACCESS_KEY_ID and "
                "DISTILLERY_S3_SECRET_ACCESS_KEY, or AWS_ACCESS_KEY_ID / AWS_PROFILE / an "
                "instance role)"
            )
        if isinstance(e, Boto3Error):  # boto3's transfers wrap the ClientError in its message
            text = str(e)
            if "NoSuchBucket" in text:
                return StorageError(
                    f"{what}: the S3 bucket {self.bucket!r} does not exist (DISTILLERY_S3_BUCKET)"
                )
            if any(code in text for code in _CREDENTIAL_CODES if not code.isdigit()):
                return StorageError(
                    f"{what}: S3 refused the credentials on {where} ({text}); check "
                    "DISTILLERY_S3_ACCESS_KEY_ID / DISTILLERY_S3_SECRET_ACCESS_KEY or the boto3 "
                    "credential chain"
                )
            return StorageError(f"{what}: S3 error on {where}: {text}")
        if isinstance(e, EndpointConnectionError):
            return StorageError(
                f"{what}: the S3 endpoint cannot be reached ({e}); check "
                "DISTILLERY_S3_ENDPOINT_URL / DISTILLERY_S3_REGION"
            )
        return StorageError(f"{what}: S3 error on {where}: {e}")

    @contextlib.contextmanager
    def _calling(self, what: str) -> Iterator[None]:
        try:
            yield
        except (ClientError, BotoCoreError, Boto3Error) as e:
            raise self._error(e, what) from None

    def check(self) -> None:
        """Check that the bucket exists and the credentials may reach it (one HEAD request).

        Raises:
            StorageError: a missing bucket, refused or absent credentials, an unreachable
                endpoint; the message names the setting to fix.
        """
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as e:
            if _code(e) in _MISSING_CODES | {"NoSuchBucket"}:
                e.response["Error"]["Code"] = "NoSuchBucket"
            raise self._error(e, "S3 storage check") from None
        except (BotoCoreError, Boto3Error) as e:
            raise self._error(e, "S3 storage check") from None

    # -- keys ---------------------------------------------------------------------------------

    def _obj(self, key: str) -> str:
        return self.prefix + validate_key(key)

    def _iter_objects(self, prefix: str) -> Iterator[dict[str, Any]]:
        """Every object under the store prefix + ``prefix`` (raw listing entries)."""
        with self._calling(f"listing {prefix or '(all)'!r}"):
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix + prefix):
                yield from page.get("Contents", [])

    def _listed(self, prefix: str) -> dict[str, dict[str, Any]]:
        """Valid keys under the key prefix ``prefix`` ("": all) -> their listing entry."""
        start = validate_key(prefix) + "/" if prefix else ""
        found: dict[str, dict[str, Any]] = {}
        for entry in self._iter_objects(start):
            key = str(entry["Key"]).removeprefix(self.prefix)
            with contextlib.suppress(InvalidKey):
                found[validate_key(key)] = entry
        return found

    def _head(self, key: str) -> dict[str, Any] | None:
        try:
            return dict(self.client.head_object(Bucket=self.bucket, Key=self._obj(key)))
        except ClientError as e:
            if _code(e) in _MISSING_CODES:
                return None
            raise self._error(e, f"reading {key!r}") from None
        except BotoCoreError as e:
            raise self._error(e, f"reading {key!r}") from None

    # -- the interface ------------------------------------------------------------------------

    def writer(self, key: str, max_bytes: int | None = None) -> ObjectWriter:
        """See :meth:`Storage.writer`. The data is spooled to a local temporary file and sent on
        commit."""
        return _S3Writer(self, self._obj(key), key, max_bytes)

    def open(self, key: str) -> BinaryIO:
        """See :meth:`Storage.open`: the object's body, streamed (read in chunks)."""
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self._obj(key))["Body"]
        except ClientError as e:
            if _code(e) in _MISSING_CODES:
                raise ObjectNotFound(f"no object {key!r}") from None
            raise self._error(e, f"reading {key!r}") from None
        except BotoCoreError as e:
            raise self._error(e, f"reading {key!r}") from None
        return io.BufferedReader(_BodyReader(body), CHUNK_BYTES)

    def size(self, key: str) -> int:
        """See :meth:`Storage.size`."""
        head = self._head(key)
        if head is None:
            raise ObjectNotFound(f"no object {key!r}")
        return int(head["ContentLength"])

    def exists(self, key: str) -> bool:
        """See :meth:`Storage.exists`."""
        return self._head(key) is not None

    def list_keys(self, prefix: str = "") -> list[str]:
        """See :meth:`Storage.list_keys`. Objects whose names are not valid keys are left out."""
        return sorted(self._listed(prefix))

    def delete(self, key: str) -> bool:
        """See :meth:`Storage.delete`."""
        if self._head(key) is None:
            return False
        with self._calling(f"deleting {key!r}"):
            self.client.delete_object(Bucket=self.bucket, Key=self._obj(key))
        return True

    def _delete_many(self, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": self.prefix + k} for k in keys[i : i + 1000]]
            with self._calling("deleting objects"):
                answer = self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}
                )
            errors = answer.get("Errors") or []
            if errors:
                first = errors[0]
                raise StorageError(
                    f"S3 did not delete {len(errors)} object(s), first {first.get('Key')!r}: "
                    f"{first.get('Code')} {first.get('Message')}"
                )

    def delete_prefix(self, prefix: str) -> int:
        """See :meth:`Storage.delete_prefix`. The local cached copy under it goes too."""
        if not prefix:
            raise InvalidKey("an empty prefix would delete the whole store")
        keys = list(self._listed(prefix))
        self._delete_many(keys)
        self._drop_cached(validate_key(prefix))
        return len(keys)

    def put_dir(self, prefix: str, source: Path, keep: Sequence[str] = ()) -> list[StoredObject]:
        """See :meth:`Storage.put_dir`: every file is sent (then the objects of an earlier
        publication that the new one lacks are deleted, except under ``keep``), and ``source``
        is removed."""
        validate_key(prefix)
        source = Path(source)
        kept = tuple(f"{join_key(prefix, sub)}/" for sub in keep)
        before = [k for k in self._listed(prefix) if not k.startswith(kept)]
        stored: list[StoredObject] = []
        for path in sorted(p for p in source.rglob("*") if p.is_file() and not p.is_symlink()):
            rel = path.relative_to(source).as_posix()
            try:
                key = join_key(prefix, rel)
            except InvalidKey:
                continue
            if key.startswith(kept):
                continue
            stored.append(self._upload_file(key, path))
        new = {o.key for o in stored}
        self._delete_many([k for k in before if k not in new])
        shutil.rmtree(source, ignore_errors=True)
        return stored

    def _upload_file(self, key: str, path: Path) -> StoredObject:
        digest = sha256_file(path)
        with self._calling(f"writing {key!r}"):
            self.client.upload_file(
                str(path),
                self.bucket,
                self._obj(key),
                ExtraArgs={"Metadata": {SHA256_META: digest}},
                Config=self.transfer,
            )
        return StoredObject(key, path.stat().st_size, digest)

    def sha256(self, key: str) -> str:
        """The hex sha256 recorded when the object was written (read and computed when an
        object written by another tool has none).

        Raises:
            ObjectNotFound: no object under ``key``.
        """
        head = self._head(key)
        if head is None:
            raise ObjectNotFound(f"no object {key!r}")
        recorded = (head.get("Metadata") or {}).get(SHA256_META)
        if recorded:
            return str(recorded)
        h = hashlib.sha256()
        with self.open(key) as f:
            while chunk := f.read(CHUNK_BYTES):
                h.update(chunk)
        return h.hexdigest()

    # -- local copies -------------------------------------------------------------------------

    def staging_root(self) -> Path:
        """See :meth:`Storage.staging_root`: a folder of the local cache."""
        return self.cache / _PARTIAL_DIR

    def _cached(self, key: str) -> Path:
        return self.cache / key

    def _etag_file(self, key: str) -> Path:
        return self.cache / _META_DIR / key

    def _drop_cached(self, key: str) -> None:
        with self._cache_lock:
            for path in (self._cached(key), self._etag_file(key)):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def _refresh(self, key: str, etag: str) -> None:
        """Make the cached copy of ``key`` the object with ``etag`` (downloaded if needed)."""
        target, tag_file = self._cached(key), self._etag_file(key)
        if target.is_file() and tag_file.is_file() and tag_file.read_text() == etag:
            return
        if target.is_dir():
            shutil.rmtree(target)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=target.parent)
        os.close(fd)
        try:
            with self._calling(f"downloading {key!r}"):
                self.client.download_file(self.bucket, self._obj(key), tmp, Config=self.transfer)
            os.replace(tmp, target)
        finally:
            Path(tmp).unlink(missing_ok=True)
        tag_file.parent.mkdir(parents=True, exist_ok=True)
        tag_file.write_text(etag)

    def local_path(self, key: str) -> Path:
        """See :meth:`Storage.local_path`. An object is downloaded into the cache (again only
        when its ETag changed); a prefix is synchronised (every object under it fetched, cached
        files no longer in the bucket removed). For neither, the (absent) cache path.

        Raises:
            InvalidKey: a bad key.
            StorageError: the bucket cannot be read.
        """
        validate_key(key)
        head = self._head(key)
        if head is not None:
            self._refresh(key, str(head.get("ETag", "")))
            return self._cached(key)
        listed = self._listed(key)
        if not listed:
            self._drop_cached(key)
            return self._cached(key)
        folder = self._cached(key)
        if folder.is_file():
            folder.unlink()
        for sub, entry in listed.items():
            self._refresh(sub, str(entry.get("ETag", "")))
        if folder.is_dir():
            for path in [p for p in folder.rglob("*") if p.is_file()]:
                rel = path.relative_to(self.cache).as_posix()
                if rel not in listed and not path.name.startswith("."):  # not a download's tmp
                    path.unlink(missing_ok=True)
        return folder


class _BodyReader(io.RawIOBase):
    """A raw reader over a botocore streaming body (for :class:`io.BufferedReader`)."""

    def __init__(self, body: Any) -> None:
        self.body = body

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self.body.read(len(buffer))
        n = len(data)
        buffer[:n] = data
        return n

    def close(self) -> None:
        if not self.closed:
            self.body.close()
        super().close()


class _S3Writer(ObjectWriter):
    """Spools into a local temporary file (hashing as it goes), sent to the bucket on commit."""

    def __init__(self, store: S3Storage, object_key: str, key: str, max_bytes: int | None) -> None:
        super().__init__(key, max_bytes)
        self.store = store
        self.object_key = object_key
        spool = store.staging_root()
        spool.mkdir(parents=True, exist_ok=True)
        self.file: IO[bytes] = tempfile.TemporaryFile(dir=spool)  # noqa: SIM115 (closed on commit/abort)
        self.hash = hashlib.sha256()

    def _write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.hash.update(chunk)

    def _commit(self) -> StoredObject:
        digest = self.hash.hexdigest()
        self.file.flush()
        self.file.seek(0)
        with self.store._calling(f"writing {self.key!r}"):
            self.store.client.upload_fileobj(
                self.file,
                self.store.bucket,
                self.object_key,
                ExtraArgs={"Metadata": {SHA256_META: digest}},
                Config=self.store.transfer,
            )
        self.file.close()
        return StoredObject(self.key, self.written, digest)

    def _abort(self) -> None:
        self.file.close()
