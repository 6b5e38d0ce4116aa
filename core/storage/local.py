"""Storage in a local folder (or a shared filesystem mounted at the same path everywhere)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import BinaryIO

from core.storage.base import (
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
        """See :meth:`Storage.put_dir`. Each file of ``source`` is renamed over its key's path
        (``os.replace``: a reader sees the old file or the new one, never a part) when it lies
        on the same filesystem (the worker stages under the root for this), else copied to a
        temporary file beside its key and renamed; then the files of an earlier publication
        that the new one lacks are deleted and ``source`` is removed. Nothing under the kept
        sub-prefixes is ever moved, renamed or deleted (a job's ``checkpoints/`` stays where it
        is while its output is published beside it), and the prefix's folder is never removed.
        Published files get mode 0644 and folders 0755.

        Killed part-way, the prefix holds some new files and some earlier ones, the rest stays
        in ``source``; publishing again completes it (callers make the result visible only
        after this returns: the worker commits the artifact rows afterwards)."""
        final = self._path(prefix)
        source = Path(source)
        kept = tuple(join_key(prefix, sub) for sub in keep)

        def is_kept(key: str) -> bool:  # under a kept sub-prefix, or a folder holding one
            return any(key == k or key.startswith(k + "/") or k.startswith(key + "/") for k in kept)

        before = [k for k in self.list_keys(prefix) if not is_kept(k)]
        staged: list[tuple[str, Path]] = []
        for path in sorted(p for p in source.rglob("*") if p.is_file() and not p.is_symlink()):
            try:
                key = join_key(prefix, path.relative_to(source).as_posix())
            except InvalidKey:
                continue
            if not is_kept(key):
                staged.append((key, path))
        stored: list[StoredObject] = []
        for key, path in staged:
            dest = self._path(key)
            self._make_dirs(dest.parent)
            if dest.is_dir():  # an earlier publication had a folder where this is a file
                shutil.rmtree(dest)
            os.chmod(path, FILE_MODE)
            stored.append(StoredObject(key, path.stat().st_size, sha256_file(path)))
            try:
                os.replace(path, dest)
            except OSError as e:
                if e.errno != errno.EXDEV:
                    raise
                self._copy_in(path, dest)
        new = {o.key for o in stored}
        for key in before:
            if key not in new:
                self._path(key).unlink(missing_ok=True)
                self._remove_empty_parents(self._path(key).parent, final)
        shutil.rmtree(source, ignore_errors=True)
        return sorted(stored, key=lambda o: o.key)

    def _make_dirs(self, folder: Path) -> None:
        """Create ``folder`` and its missing parents under the root, each with mode 0755."""
        missing = []
        while not folder.is_dir() and folder != self.root:
            missing.append(folder)
            folder = folder.parent
        self.root.mkdir(parents=True, exist_ok=True, mode=DIR_MODE)
        for d in reversed(missing):
            if d.is_file() or d.is_symlink():  # an earlier publication's file in the way
                d.unlink()
            with contextlib.suppress(FileExistsError):
                d.mkdir(mode=DIR_MODE)
            os.chmod(d, DIR_MODE)

    @staticmethod
    def _copy_in(path: Path, dest: Path) -> None:
        """Copy ``path`` (another filesystem) to a temporary file beside ``dest``, renamed over
        it; ``path`` is left to the caller."""
        fd, name = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=dest.parent)
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out, path.open("rb") as src:
                shutil.copyfileobj(src, out, CHUNK_BYTES)
                out.flush()
                os.fsync(out.fileno())
            os.chmod(tmp, FILE_MODE)
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @staticmethod
    def _remove_empty_parents(folder: Path, stop: Path) -> None:
        """Remove ``folder`` and its parents while they are empty, up to (not including)
        ``stop``."""
        while folder != stop and folder.is_relative_to(stop):
            try:
                folder.rmdir()
            except OSError:  # not empty (or gone)
                return
            folder = folder.parent

    def staging_root(self) -> Path:
        """See :meth:`Storage.staging_root`: ``<root>/.partial`` (hidden: never listed)."""
        return self.root / ".partial"

    def local_path(self, key: str) -> Path:
        """See :meth:`Storage.local_path`: the path under the root itself."""
        return self._path(key)
