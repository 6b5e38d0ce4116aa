"""Uploads in progress and the ones that died: the heartbeat of an upload's row, and the sweeper
of what dead uploads (and older versions) left in the upload store.

An upload's row is committed as ``uploading`` before any byte is stored (:mod:`core.files`).
While the API receives and checks the file, an :class:`UploadHeartbeat` thread writes the
row's ``size_bytes`` (the bytes stored so far: the quota counts them) and ``updated_at`` every
:func:`heartbeat_interval_s`. An API process killed meanwhile leaves the row ``uploading``
with an ``updated_at`` that no longer moves; :func:`sweep` (a pass of the reconciler,
:mod:`worker.reconciler`) deletes such rows once they are ``upload_stale_s`` old, with their
files, and the files of the upload store that have no live row (``uploading`` or ``ready``).
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from types import TracebackType

from sqlalchemy import Connection, Engine, delete, select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from core.db import File, utcnow
from core.refs import is_file_id
from core.settings import Settings
from core.storage import LocalStorage, Storage, StorageError, upload_storage

log = logging.getLogger("distillery.uploads")

LIVE_STATES = ("uploading", "ready")
"""Rows whose files are kept; a ``failed`` upload stores nothing."""


def heartbeat_interval_s(settings: Settings) -> float:
    """Seconds between two heartbeats of an upload: ``min(10, upload_stale_s / 5)``."""
    return min(10.0, settings.upload_stale_s / 5)


class UploadHeartbeat:
    """A thread that, every ``interval_s`` seconds until the block ends, sets the row of upload
    ``file_id`` (while it is ``uploading``) to ``size_bytes = received`` and ``updated_at =
    now``, in its own short transactions on ``engine``. A failed write is logged, never
    raised: the next one may succeed, and a row left without heartbeats for ``upload_stale_s``
    is swept (the request then ends with a 409).

    Attributes:
        received: bytes stored so far; the receiving code sets it.
        beats: heartbeats written.
    """

    def __init__(self, engine: Engine | Connection, file_id: str, interval_s: float) -> None:
        self.engine = engine
        self.file_id = file_id
        self.interval_s = interval_s
        self.received = 0
        self.beats = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name=f"upload-heartbeat-{file_id}", daemon=True
        )

    def beat(self) -> None:
        """Write one heartbeat now (logged on a database error)."""
        try:
            with Session(self.engine) as s:
                s.execute(
                    update(File)
                    .where(File.id == self.file_id, File.status == "uploading")
                    .values(size_bytes=self.received, updated_at=utcnow())
                )
                s.commit()
            self.beats += 1
        except SQLAlchemyError as e:
            log.warning("upload %s: heartbeat not written (%s)", self.file_id, e)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.beat()

    def __enter__(self) -> UploadHeartbeat:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class SweepReport:
    """What a sweep removed (upload ids): ``stale`` rows with their files, and ``orphans``,
    stored files without a live row."""

    stale: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)


def stored_upload_ids(store: Storage) -> set[str]:
    """The upload ids (``file-<32 hex>``) that have anything in ``store``: the first segment of
    its keys, and on local storage also every such folder (one may hold only the hidden
    temporary file of a write that never finished)."""
    ids = {key.split("/", 1)[0] for key in store.list_keys()}
    if isinstance(store, LocalStorage) and store.root.is_dir():
        ids |= {p.name for p in store.root.iterdir() if p.is_dir() and not p.is_symlink()}
    return {i for i in ids if is_file_id(i)}


def _remove(store: Storage, file_id: str) -> bool:
    try:
        store.delete_prefix(file_id)
    except (OSError, StorageError):
        log.exception("upload %s: could not remove its files", file_id)
        return False
    return True


def sweep(settings: Settings, sessions: sessionmaker[Session]) -> SweepReport:
    """Delete the ``uploading`` rows not updated for ``settings.upload_stale_s`` seconds and
    their files, then the files of the upload store that have no live row (no row, or a
    ``failed`` one). The store is listed before the rows are read: an upload's row is
    committed before its first byte, so a live upload's files always find their row.

    Each row is deleted by a conditional DELETE (still ``uploading``, still stale), so an
    upload that became ``ready`` or beat again meanwhile is kept. A file that cannot be removed
    is logged and tried again at the next sweep.

    Raises:
        SQLAlchemyError: the database failed (the reconciler reports it; nothing half-done
            is lost: a row is deleted before its files, and files without a row are orphans
            the next sweep removes).
        StorageError: the store could not be listed.
    """
    report = SweepReport()
    store = upload_storage(settings)
    stored = stored_upload_ids(store)
    limit = utcnow() - timedelta(seconds=settings.upload_stale_s)
    with sessions() as s:
        stale = list(
            s.scalars(select(File.id).where(File.status == "uploading", File.updated_at < limit))
        )
        for file_id in stale:
            gone = s.execute(
                delete(File)
                .where(File.id == file_id, File.status == "uploading", File.updated_at < limit)
                .execution_options(synchronize_session=False)
            )
            s.commit()
            if gone.rowcount == 1:  # type: ignore[attr-defined]
                _remove(store, file_id)
                report.stale.append(file_id)
                log.warning(
                    "upload %s: no sign of life for %g s (its API process died); row and "
                    "files removed",
                    file_id,
                    settings.upload_stale_s,
                )
        candidates = sorted(stored - set(report.stale))
        live = set(
            s.scalars(select(File.id).where(File.id.in_(candidates), File.status.in_(LIVE_STATES)))
            if candidates
            else []
        )
    for file_id in candidates:
        if file_id not in live and _remove(store, file_id):
            report.orphans.append(file_id)
            log.warning("upload %s: stored files without a row removed", file_id)
    return report
