"""Storage in a local folder (or a shared filesystem mounted at the same path everywhere)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from api.storage.base import (
    CHUNK_BYTES,
    InvalidKey,
    ObjectNotFound,
    ObjectWriter,
    Storage,
    StoredObject,
    join_key,
    validate_key,
)

FILE_MODE = 0o644  # stored files are readable by every user of the host (and in archives)
DIR_MODE = 0o755
_TMP_PREFIX = ".tmp-"  # temporary files start with '.', which no key can: never listed


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


class _LocalWriter(ObjectWriter):
    """Writes into a temporary file next to the target, renamed over it on commit."""

    def __init__(self, key: str, target: Path, max_bytes: int | None) -> None:
        super().__init__(key, max_bytes)
        self.target = target
        target.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        fd, name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=target.parent)
        self.tmp = Path(name)
        self.file = os.fdopen(fd, "wb")
        self.hash = hashlib.sha256()

    def _write(self, chunk: bytes) -> None:
        self.file.write(chunk)
        self.hash.update(chunk)

    def _commit(self) -> StoredObject:
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.chmod(self.tmp, FILE_MODE)
        os.replace(self.tmp, self.target)
        return StoredObject(self.key, self.written, self.hash.hexdigest())

    def _abort(self) -> None:
        self.file.close()
        self.tmp.unlink(missing_ok=True)


class LocalStorage(Storage):
    """Objects as files under ``root``: key ``a/b`` is the file ``root/a/b``.

    Writes are atomic (a temporary file in the same folder, then ``os.replace``); files get
    mode 0644. A key whose path would resolve outside ``root`` (through a symlink planted in
    the folder) is refused like a malformed key. Nothing is created until the first write.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"LocalStorage({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        path = self.root / validate_key(key)
        resolved = path.resolve()
        if resolved != self.root and not resolved.is_relative_to(self.root):
            raise InvalidKey(f"{key!r} resolves outside the store")
        return path

    def writer(self, key: str, max_bytes: int | None = None) -> ObjectWriter:
        """See :meth:`Storage.writer`."""
        return _LocalWriter(key, self._path(key), max_bytes)

    def open(self, key: str) -> BinaryIO:
        """See :meth:`Storage.open`."""
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(f"no object {key!r}")
        return path.open("rb")

    def size(self, key: str) -> int:
        """See :meth:`Storage.size`."""
        path = self._path(key)
        if not path.is_file():
            raise ObjectNotFound(f"no object {key!r}")
        return path.stat().st_size

    def exists(self, key: str) -> bool:
        """See :meth:`Storage.exists`."""
        return self._path(key).is_file()

    def list_keys(self, prefix: str = "") -> list[str]:
        """See :meth:`Storage.list_keys`. Files that are not valid keys (temporary files, anything
        put there by hand with another name), symlinks and hidden folders are left out."""
        base = self._path(prefix) if prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(self.root)
            for name in filenames:
                file = Path(dirpath) / name
                if file.is_symlink() or not file.is_file():
                    continue
                key = (rel_dir / name).as_posix()
                with contextlib.suppress(InvalidKey):
                    keys.append(validate_key(key))
        return sorted(keys)

    def delete(self, key: str) -> bool:
        """See :meth:`Storage.delete`."""
        path = self._path(key)
        if not path.is_file():
            return False
        path.unlink()
        return True

    def delete_prefix(self, prefix: str) -> int:
        """See :meth:`Storage.delete_prefix`. The folder itself is removed too."""
        if not prefix:
            raise InvalidKey("an empty prefix would delete the whole store")
        path = self._path(prefix)
        if not path.is_dir():
            return 0
        count = len(self.list_keys(prefix))
        shutil.rmtree(path)
        return count

    def put_dir(self, prefix: str, source: Path, keep: Sequence[str] = ()) -> list[StoredObject]:
        """See :meth:`Storage.put_dir`. ``source`` is renamed into place when it lies on the
        same filesystem (the worker stages under the root for this), else copied and removed.
        Published files get mode 0644 and folders 0755. Kept sub-prefixes are moved aside (a
        hidden folder of the root) and back."""
        final = self._path(prefix)
        source = Path(source)
        kept: list[tuple[str, Path]] = []
        aside = None
        for sub in keep:
            held = self._path(join_key(prefix, sub))
            shutil.rmtree(source / sub, ignore_errors=True)
            if held.is_dir():
                if aside is None:
                    self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
                    aside = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
                target = aside / str(len(kept))
                held.replace(target)
                kept.append((sub, target))
        if final.exists():
            shutil.rmtree(final)
        final.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        try:
            source.replace(final)
        except OSError:  # another filesystem
            shutil.copytree(source, final)
            shutil.rmtree(source)
        for dirpath, _, filenames in os.walk(final):
            os.chmod(dirpath, DIR_MODE)
            for name in filenames:
                file = Path(dirpath) / name
                if file.is_file() and not file.is_symlink():
                    os.chmod(file, FILE_MODE)
        for sub, held in kept:
            dest = self._path(join_key(prefix, sub))
            dest.parent.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
            held.replace(dest)
        if aside is not None:
            shutil.rmtree(aside, ignore_errors=True)
        kept_prefixes = tuple(f"{prefix}/{sub}/" for sub in keep)
        return [
            StoredObject(key, (self.root / key).stat().st_size, sha256_file(self.root / key))
            for key in self.list_keys(prefix)
            if not key.startswith(kept_prefixes)
        ]

    def staging_root(self) -> Path:
        """See :meth:`Storage.staging_root`: ``<root>/.partial`` (hidden: never listed)."""
        return self.root / ".partial"

    def local_path(self, key: str) -> Path:
        """See :meth:`Storage.local_path`: the path under the root itself."""
        return self._path(key)
