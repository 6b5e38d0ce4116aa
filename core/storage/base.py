"""The storage interface the API and the worker use for job artifacts and uploads.

Objects are named by *keys*: relative, ``/``-separated paths such as ``<job id>/model.safetensors``.
A *prefix* is a key used as a folder: the objects under prefix ``p`` are the keys that begin
with ``p/`` (never those that merely begin with the same characters). Keys are validated by
:func:`validate_key` before any backend sees them, so no key can name anything outside the
store.

A backend implements the abstract methods of :class:`Storage`; :meth:`Storage.put` is built on
:meth:`Storage.writer`. Nothing here assumes a filesystem except :meth:`Storage.local_path`,
which a remote backend would implement by downloading into a local cache.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO

MAX_KEY_LENGTH = 1024  # characters
CHUNK_BYTES = 1 << 20  # read size when a stream is copied (1 MiB)
_SEGMENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,254}$")
KEY_RULE = (
    "a relative path of '/'-separated names of letters, digits, '.', '_' and '-' "
    "(a name does not start with '.' or '-', at most 255 characters each)"
)


class StorageError(Exception):
    """Base class of the errors a storage backend raises."""


class InvalidKey(StorageError, ValueError):
    """A key (or prefix) that is empty, absolute, holds ``..``, NUL or characters outside
    :data:`KEY_RULE`, or would resolve outside the store."""


class ObjectNotFound(StorageError, FileNotFoundError):
    """No object under that key."""


class TooLarge(StorageError):
    """A write went past its size cap; the partial object has been removed.

    Attributes:
        key: the key being written.
        limit: the cap, in bytes.
    """

    def __init__(self, key: str, limit: int) -> None:
        super().__init__(f"{key!r} is larger than the limit of {limit} bytes")
        self.key = key
        self.limit = limit


@dataclass(frozen=True)
class StoredObject:
    """An object as written: its key, size in bytes and hex sha256 of its content."""

    key: str
    size: int
    sha256: str


def validate_key(key: str) -> str:
    """Return ``key`` if it is a valid key, else raise.

    Raises:
        InvalidKey: not a str, empty, longer than :data:`MAX_KEY_LENGTH`, absolute, with a
            NUL, a backslash, an empty, ``.`` or ``..`` segment, or characters outside
            :data:`KEY_RULE`.
    """
    if not isinstance(key, str) or not key:
        raise InvalidKey("a key must be a non-empty string")
    if len(key) > MAX_KEY_LENGTH:
        raise InvalidKey(f"a key is at most {MAX_KEY_LENGTH} characters (got {len(key)})")
    if "\x00" in key:
        raise InvalidKey(f"{key!r}: a key cannot contain a NUL character")
    if key.startswith("/") or "\\" in key or re.match(r"^[A-Za-z]:", key):
        raise InvalidKey(f"{key!r}: a key must be a relative path with '/' separators")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidKey(f"{key!r}: empty, '.' and '..' path segments are not allowed")
        if not _SEGMENT.match(segment):
            raise InvalidKey(f"{key!r}: {KEY_RULE}")
    return key


def join_key(*parts: str) -> str:
    """``parts`` joined with ``/`` and validated.

    Raises:
        InvalidKey: the result is not a valid key.
    """
    return validate_key("/".join(parts))


class ObjectWriter(ABC):
    """A write in progress: :meth:`write` chunks, then :meth:`commit`. Used as a context
    manager, leaving the block without a commit (or with an exception) aborts the write, and
    nothing is left under the key (an earlier object under it is kept until the commit)."""

    def __init__(self, key: str, max_bytes: int | None) -> None:
        self.key = key
        self.max_bytes = max_bytes
        self.written = 0  # bytes so far
        self.done = False

    @abstractmethod
    def _write(self, chunk: bytes) -> None: ...

    @abstractmethod
    def _commit(self) -> StoredObject: ...

    @abstractmethod
    def _abort(self) -> None: ...

    def write(self, chunk: bytes) -> None:
        """Append ``chunk``.

        Raises:
            TooLarge: the object would exceed ``max_bytes``; the write is aborted first (the
                partial object is removed and nothing beyond the cap was written).
            StorageError: the writer was already committed or aborted.
        """
        if self.done:
            raise StorageError(f"the write of {self.key!r} has already ended")
        if self.max_bytes is not None and self.written + len(chunk) > self.max_bytes:
            self.abort()
            raise TooLarge(self.key, self.max_bytes)
        self._write(chunk)
        self.written += len(chunk)

    def commit(self) -> StoredObject:
        """Make the object visible under its key (atomically replacing an earlier one).

        Raises:
            StorageError: the writer was already committed or aborted.
        """
        if self.done:
            raise StorageError(f"the write of {self.key!r} has already ended")
        try:
            obj = self._commit()
        except BaseException:
            self.abort()
            raise
        self.done = True
        return obj

    def abort(self) -> None:
        """Discard what was written (idempotent)."""
        if not self.done:
            self.done = True
            self._abort()

    def __enter__(self) -> ObjectWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.abort()


def _chunks(data: BinaryIO | Iterable[bytes]) -> Iterable[bytes]:
    read = getattr(data, "read", None)
    if read is None:
        yield from data
        return
    while chunk := read(CHUNK_BYTES):
        yield chunk


class Storage(ABC):
    """Objects under validated keys. Every method validates its key or prefix first
    (:class:`InvalidKey`)."""

    @abstractmethod
    def writer(self, key: str, max_bytes: int | None = None) -> ObjectWriter:
        """A writer for ``key`` (see :class:`ObjectWriter`); ``max_bytes`` caps its size.

        Raises:
            InvalidKey: a bad key.
        """

    def put(
        self, key: str, data: BinaryIO | Iterable[bytes], max_bytes: int | None = None
    ) -> StoredObject:
        """Stream ``data`` (a binary file object, read in 1 MiB chunks, or an iterable of
        ``bytes``) into ``key``; the sha256 is computed while streaming.

        Returns:
            The object's key, size in bytes and hex sha256.

        Raises:
            InvalidKey: a bad key.
            TooLarge: more than ``max_bytes`` bytes; nothing is left under ``key`` (an earlier
                object under it is kept).
        """
        with self.writer(key, max_bytes) as w:
            for chunk in _chunks(data):
                w.write(chunk)
            return w.commit()

    @abstractmethod
    def open(self, key: str) -> BinaryIO:
        """The object's content as a binary file object (the caller closes it).

        Raises:
            InvalidKey: a bad key.
            ObjectNotFound: no object under ``key``.
        """

    def read_bytes(self, key: str) -> bytes:
        """The whole object in memory (for small objects such as a config.json).

        Raises:
            InvalidKey: a bad key.
            ObjectNotFound: no object under ``key``.
        """
        with self.open(key) as f:
            return f.read()

    @abstractmethod
    def size(self, key: str) -> int:
        """The object's size in bytes.

        Raises:
            InvalidKey: a bad key.
            ObjectNotFound: no object under ``key``.
        """

    @abstractmethod
    def exists(self, key: str) -> bool:
        """True when an object is stored under ``key`` (a prefix alone is not an object).

        Raises:
            InvalidKey: a bad key.
        """

    @abstractmethod
    def list_keys(self, prefix: str = "") -> list[str]:
        """Every key under ``prefix`` (all keys for ``""``), recursively, sorted.

        Raises:
            InvalidKey: a bad prefix.
        """

    @abstractmethod
    def delete(self, key: str) -> bool:
        """Remove the object under ``key``; True if there was one.

        Raises:
            InvalidKey: a bad key.
        """

    @abstractmethod
    def delete_prefix(self, prefix: str) -> int:
        """Remove every object under ``prefix``; the number of objects removed.

        Raises:
            InvalidKey: a bad prefix (``""`` is refused: it would empty the store).
        """

    @abstractmethod
    def put_dir(self, prefix: str, source: Path, keep: Sequence[str] = ()) -> list[StoredObject]:
        """Publish the regular files of the local directory ``source`` (recursively) under
        ``prefix``, replacing whatever was under it except the sub-prefixes ``keep`` (names
        relative to ``prefix``, such as ``checkpoints``: what is under them is never moved,
        renamed or deleted, even by a publication killed part-way, and ``source``'s own files
        there are dropped); ``source`` is consumed (moved or removed). Each object is replaced
        atomically; the whole publication is not (killed part-way, the prefix holds a mix and
        publishing again completes it), so callers make it visible afterwards (the worker
        commits the artifact rows once this returns). Files whose relative paths are not valid
        keys are not published.

        Returns:
            The published objects (key, size in bytes, sha256), sorted by key (not those kept).

        Raises:
            InvalidKey: a bad prefix.
        """

    @abstractmethod
    def staging_root(self) -> Path:
        """A local folder where a caller prepares a directory for :meth:`put_dir` (the worker's
        job output and checkpoints). The local backend's is inside its root (same filesystem,
        so publishing is a rename); a remote backend's is in its local cache. Created by the
        caller as needed.
        """

    @abstractmethod
    def local_path(self, key: str) -> Path:
        """A local filesystem path holding the object under ``key``, or, for a prefix, a
        directory holding the objects under it (as files at their relative keys): what
        transformers and the worker need. The local backend returns its own path (which may
        not exist); a remote backend downloads into a local cache. Read-only for callers.

        Raises:
            InvalidKey: a bad key.
        """
