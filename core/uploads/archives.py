"""Reading an uploaded tar or zip archive safely: its members listed (at most a cap of them)
and checked before anything is extracted, then each regular file streamed out with a byte
budget. Python's tarfile and zipfile do the reading; this module only checks.

Refused (:class:`ArchiveRejected`, naming the member): absolute paths, ``..``, backslashes,
NUL, symlinks and hardlinks, devices, fifos and other special members, encrypted zip members,
a member twice, a file where another member needs a folder. Too many members or too many
bytes (declared, or counted while extracting, since declared sizes can lie) is
:class:`ArchiveTooLarge`.
"""

from __future__ import annotations

import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Literal

from core.storage import Storage, StoredObject, TooLarge, join_key

_HIDDEN = re.compile(r"^(\.|__MACOSX$)")  # .git, .gitattributes, ._x (AppleDouble), __MACOSX
_READ_ERRORS = (tarfile.TarError, zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError)
CHUNK_BYTES = 1 << 20


class ArchiveRejected(Exception):
    """The archive cannot be accepted; ``member`` names the offending entry (None when it is
    the archive as a whole)."""

    def __init__(self, reason: str, member: str | None = None) -> None:
        super().__init__(f"archive member {member!r}: {reason}" if member else reason)
        self.reason = reason
        self.member = member


class ArchiveTooLarge(Exception):
    """More members, or more unpacked bytes, than allowed.

    Attributes:
        what: ``"members"`` or ``"bytes"``.
        limit: the cap (a count of members, or bytes).
    """

    def __init__(self, what: Literal["members", "bytes"], limit: int, detail: str) -> None:
        super().__init__(detail)
        self.what = what
        self.limit = limit


@dataclass(frozen=True)
class ArchiveLimits:
    """Caps for one archive: entries (files and folders) and total unpacked bytes."""

    max_members: int
    max_unpacked_bytes: int


@dataclass
class Member:
    """A regular file of the archive, with its path relative to the archive's top (after a
    single top folder was stripped, see :func:`strip_single_top_dir`)."""

    name: str  # as written in the archive
    path: str  # relative path it is stored under
    size: int  # declared size, bytes
    handle: tarfile.TarInfo | zipfile.ZipInfo = field(repr=False)


@dataclass
class Listing:
    """What an archive holds, once every member was checked."""

    files: list[Member]
    skipped: list[str]  # hidden members left out (.git, .gitattributes, __MACOSX, ._x)
    stripped_top_dir: str | None = None

    def get(self, path: str) -> Member | None:
        """The file stored under ``path``, if any."""
        return next((m for m in self.files if m.path == path), None)


def _relative_parts(name: str) -> list[str]:
    """The path segments of a member name, '' and '.' dropped.

    Raises:
        ArchiveRejected: NUL, a backslash, an absolute path or a '..' segment.
    """
    if "\x00" in name:
        raise ArchiveRejected("a NUL character in the name", name)
    if "\\" in name:
        raise ArchiveRejected("a backslash in the name (paths must use '/')", name)
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ArchiveRejected("an absolute path", name)
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ArchiveRejected("a '..' path that leaves the archive's folder", name)
    return parts


def _tar_kind(info: tarfile.TarInfo) -> str:
    if info.isreg():
        return "file"
    if info.isdir():
        return "dir"
    if info.issym():
        return "a symbolic link"
    if info.islnk():
        return "a hard link"
    if info.ischr() or info.isblk():
        return "a device"
    if info.isfifo():
        return "a fifo"
    return "a special member"


def _zip_kind(info: zipfile.ZipInfo) -> str:
    if info.is_dir():
        return "dir"
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a fifo"
    if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
        return "a special member"
    if info.flag_bits & 0x1:
        return "an encrypted member"
    return "file"


def _zip_directory_fits(path: Path, limits: ArchiveLimits) -> None:
    """Refuse, before zipfile reads the central directory into memory, a zip whose end record
    announces more entries than allowed (or a central directory too big for that many).

    Raises:
        ArchiveTooLarge: too many entries.
        ArchiveRejected: no end record.
    """
    end_rec_data = zipfile._EndRecData  # type: ignore[attr-defined]  # stable private helper
    with path.open("rb") as f:
        rec = end_rec_data(f)
    if rec is None:
        raise ArchiveRejected("not a readable zip archive (no end of central directory)")
    entries, cd_bytes = int(rec[zipfile._ECD_ENTRIES_TOTAL]), int(rec[zipfile._ECD_SIZE])  # type: ignore[attr-defined]
    # 46 bytes of fixed header plus a name and extra fields per entry; 4 KiB each is generous.
    if entries > limits.max_members or cd_bytes > limits.max_members * 4096:
        raise ArchiveTooLarge(
            "members",
            limits.max_members,
            f"the archive has more than {limits.max_members} members",
        )


class Archive:
    """An open tar (plain, gz, bz2, xz) or zip archive; use :func:`open_archive`."""

    def __init__(self, tar: tarfile.TarFile | None, zf: zipfile.ZipFile | None) -> None:
        self.tar = tar
        self.zip = zf

    def _entries(self, limits: ArchiveLimits) -> Iterator[tuple[str, str, int, object]]:
        """(name, kind, declared size, handle) of every member, refusing past the cap."""
        count = 0

        def counted() -> None:
            nonlocal count
            count += 1
            if count > limits.max_members:
                raise ArchiveTooLarge(
                    "members",
                    limits.max_members,
                    f"the archive has more than {limits.max_members} members",
                )

        if self.zip is not None:
            for zi in self.zip.infolist():
                counted()
                yield zi.filename, _zip_kind(zi), zi.file_size, zi
            return
        assert self.tar is not None
        while True:
            try:
                info = self.tar.next()
            except _READ_ERRORS as e:
                raise ArchiveRejected(f"not a readable tar archive ({e})") from None
            if info is None:
                return
            counted()
            yield info.name, _tar_kind(info), info.size, info

    def check_members(self, limits: ArchiveLimits) -> Listing:
        """Check every member and list the regular files to extract.

        Raises:
            ArchiveRejected: a member that is refused (see the module docstring).
            ArchiveTooLarge: more members than ``limits.max_members``, or members (hidden
                ones included) declaring more than ``limits.max_unpacked_bytes`` in all; raised
                as soon as the count or the sum is over, before the rest is read.
        """
        files: list[Member] = []
        dirs: set[str] = set()
        skipped: list[str] = []
        seen: set[str] = set()
        declared = 0  # every member's, hidden ones too: reading past them costs as much
        for name, kind, size, handle in self._entries(limits):
            parts = _relative_parts(name)
            if kind not in ("file", "dir"):
                raise ArchiveRejected(f"{kind}; only regular files and folders are accepted", name)
            declared += size
            if declared > limits.max_unpacked_bytes:  # before a tar is read past this member
                raise ArchiveTooLarge(
                    "bytes",
                    limits.max_unpacked_bytes,
                    f"the archive's members declare more than {limits.max_unpacked_bytes} "
                    "bytes unpacked",
                )
            if self.tar is not None and hasattr(tarfile, "data_filter"):
                try:  # Python's own extraction filter, as a second opinion
                    assert isinstance(handle, tarfile.TarInfo)
                    tarfile.data_filter(handle, "/nonexistent-destination")
                except tarfile.FilterError as e:
                    raise ArchiveRejected(str(e), name) from None
            if any(_HIDDEN.match(p) for p in parts):
                skipped.append(name)
                continue
            path = "/".join(parts)
            if kind == "dir":
                if path:
                    dirs.add(path)
                continue
            if not path:
                raise ArchiveRejected("a file without a name", name)
            if path in seen:
                raise ArchiveRejected("appears twice in the archive", name)
            seen.add(path)
            assert isinstance(handle, tarfile.TarInfo | zipfile.ZipInfo)
            files.append(Member(name=name, path=path, size=size, handle=handle))
        for m in files:
            parent = m.path.rpartition("/")[0]
            while parent:
                if parent in seen:
                    raise ArchiveRejected("a file that is also used as a folder", parent)
                parent = parent.rpartition("/")[0]
        return Listing(files=files, skipped=skipped)

    def open_member(self, member: Member) -> IO[bytes]:
        """The member's content as a binary stream (close it; it is a context manager).

        Raises:
            ArchiveRejected: the member cannot be opened (a corrupt archive).
        """
        try:
            if self.zip is not None:
                assert isinstance(member.handle, zipfile.ZipInfo)
                return self.zip.open(member.handle)
            assert self.tar is not None and isinstance(member.handle, tarfile.TarInfo)
            tf = self.tar.extractfile(member.handle)
        except _READ_ERRORS as e:
            raise ArchiveRejected(f"cannot be read ({e})", member.name) from None
        if tf is None:
            raise ArchiveRejected("cannot be read as a file", member.name)
        return tf

    def read_small(self, member: Member, max_bytes: int) -> bytes:
        """The whole member, at most ``max_bytes`` (for config.json and the like).

        Raises:
            ArchiveRejected: larger than ``max_bytes``, or unreadable.
        """
        if member.size > max_bytes:
            raise ArchiveRejected(f"larger than {max_bytes} bytes", member.name)
        with self.open_member(member) as f:
            try:
                data = f.read(max_bytes + 1)
            except _READ_ERRORS as e:
                raise ArchiveRejected(f"cannot be read ({e})", member.name) from None
        if len(data) > max_bytes:
            raise ArchiveRejected(f"larger than {max_bytes} bytes", member.name)
        return data

    def extract(
        self, listing: Listing, store: Storage, prefix: str, max_bytes: int
    ) -> list[StoredObject]:
        """Stream every listed file into ``store`` under ``prefix/<path>``, counting bytes as
        they come: at most ``max_bytes`` are written in all, whatever the members declare.
        On any error what was written under ``prefix`` is deleted.

        Raises:
            ArchiveTooLarge: more than ``max_bytes`` unpacked.
            ArchiveRejected: an unreadable member.
            InvalidKey: a path that is not a valid storage key (check them first).
        """
        written: list[StoredObject] = []
        total = 0
        try:
            for m in listing.files:
                key = join_key(prefix, m.path)
                with self.open_member(m) as f, store.writer(key, max_bytes - total) as w:
                    while True:
                        try:
                            chunk = f.read(CHUNK_BYTES)
                        except _READ_ERRORS as e:
                            raise ArchiveRejected(f"cannot be read ({e})", m.name) from None
                        if not chunk:
                            break
                        try:
                            w.write(chunk)
                        except TooLarge:
                            raise ArchiveTooLarge(
                                "bytes",
                                max_bytes,
                                f"the archive unpacks to more than {max_bytes} bytes",
                            ) from None
                    obj = w.commit()
                total += obj.size
                written.append(obj)
        except BaseException:
            store.delete_prefix(prefix)
            raise
        return written

    def close(self) -> None:
        """Close the underlying file."""
        if self.zip is not None:
            self.zip.close()
        if self.tar is not None:
            self.tar.close()


def strip_single_top_dir(listing: Listing, marker: str) -> None:
    """When ``marker`` (e.g. ``config.json``) is not at the top but every file lies in one
    top folder, drop that folder from the paths (``mymodel/config.json`` -> ``config.json``)."""
    if listing.get(marker) is not None or not listing.files:
        return
    tops = {m.path.split("/", 1)[0] for m in listing.files}
    if len(tops) != 1 or any("/" not in m.path for m in listing.files):
        return
    top = tops.pop()
    for m in listing.files:
        m.path = m.path.split("/", 1)[1]
    listing.stripped_top_dir = top


@contextmanager
def open_archive(path: Path, limits: ArchiveLimits) -> Iterator[Archive]:
    """Open ``path`` as a zip or a tar (plain, gz, bz2 or xz), by content, not by name.

    Raises:
        ArchiveRejected: neither a readable zip nor a readable tar.
        ArchiveTooLarge: a zip whose end record announces more than ``limits.max_members``.
    """
    archive: Archive
    try:
        if zipfile.is_zipfile(path):
            _zip_directory_fits(path, limits)
            archive = Archive(None, zipfile.ZipFile(path))
        else:
            archive = Archive(tarfile.open(path, mode="r:*"), None)  # noqa: SIM115 (closed below)
    except (ArchiveRejected, ArchiveTooLarge):
        raise
    except _READ_ERRORS as e:
        raise ArchiveRejected(f"not a tar or zip archive ({e})") from None
    try:
        yield archive
    finally:
        archive.close()
