"""A job attempt's local staging folders, and the sweep of those a dead attempt left behind.

Attempt ``n`` of job ``j`` stages under the artifact store's staging root
(:meth:`core.storage.Storage.staging_root`: ``<artifacts root>/.partial`` for the local
backend, ``<storage cache>/.partial`` for s3):

* ``<j>-<n>``: the job's output, published into the store when the job succeeds;
* ``<j>-<n>-checkpoints``: each checkpoint as the KD loop writes it, before it is stored;
* ``<j>-<n>-resume``: the checkpoint fetched to resume from.

The runner removes them when the attempt ends. A worker killed mid-attempt cannot, so
:func:`sweep` (run by every reconciler pass and when a worker starts) removes the folders of
attempts that are no longer alive: the job is gone, finished, queued or paused again, or on a
later attempt. A live attempt's folders (its job running, pausing or cancelling on that very
attempt) are never touched. For the local backend it also removes the hidden ``.tmp-*``
folders at the root of the store that an older ``put_dir`` used to move a job's checkpoints
aside into, once nothing has changed in them for :data:`TMP_GRACE_S` seconds.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from core.db import Job
from core.job_status import LIVE
from core.settings import Settings
from core.storage import LocalStorage, artifact_storage

log = logging.getLogger("distillery.worker")

LIVE_STATUSES = LIVE
"""Statuses in which a job's current attempt is alive (a worker holds it)."""

TMP_GRACE_S = 3600.0
"""A ``.tmp-*`` folder at the root of a local store unchanged for this long (seconds) is swept."""

_NAME = re.compile(
    r"^(?P<job>[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
    r"-(?P<attempt>[0-9]{1,9})(?:-(?:checkpoints|resume))?$"
)
_TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class AttemptDirs:
    """The staging folders of one attempt of a job (none created here)."""

    output: Path
    checkpoints: Path
    resume: Path

    @classmethod
    def of(cls, staging_root: Path, job_id: str, attempt: int) -> AttemptDirs:
        """The folders of attempt ``attempt`` of job ``job_id`` under ``staging_root``."""
        output = staging_root / f"{job_id}-{attempt}"
        return cls(
            output=output,
            checkpoints=output.with_name(f"{output.name}-checkpoints"),
            resume=output.with_name(f"{output.name}-resume"),
        )

    def remove(self) -> None:
        """Remove the three folders (those that exist)."""
        for folder in (self.output, self.checkpoints, self.resume):
            shutil.rmtree(folder, ignore_errors=True)


def attempt_of(name: str) -> tuple[str, int] | None:
    """``(job id, attempt)`` of a staging folder's name (``<job id>-<n>[-checkpoints|-resume]``),
    or None for any other name (an s3 upload's spool file, something put there by hand)."""
    m = _NAME.match(name)
    return (m["job"], int(m["attempt"])) if m else None


@dataclass
class SweepReport:
    """What a sweep removed: paths (relative to the staging root, or ``<root>/.tmp-*``) and
    the bytes they held."""

    removed: list[str] = field(default_factory=list)
    freed_bytes: int = 0


def _size_and_newest(path: Path) -> tuple[int, float]:
    """Bytes of the regular files under ``path`` (or of the file) and the newest mtime (Unix
    seconds) of it and everything under it."""
    try:
        st = path.stat(follow_symlinks=False)
    except OSError:
        return 0, 0.0
    if not path.is_dir() or path.is_symlink():
        return st.st_size, st.st_mtime
    size, newest = 0, st.st_mtime
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            try:
                sub = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            newest = max(newest, sub.st_mtime)
            if name in filenames:
                size += sub.st_size
    return size, newest


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def sweep(
    settings: Settings, sessions: sessionmaker[Session], now: float | None = None
) -> SweepReport:
    """Remove the staging folders of attempts that are no longer alive (see the module
    docstring) and, for a local store, the ``.tmp-*`` folders at its root unchanged for
    :data:`TMP_GRACE_S` seconds before ``now`` (a Unix time; default: the current time).

    The folders are listed before the jobs are read, and an attempt's folders are only
    created after its claim is committed, so a folder listed for an attempt that the jobs
    table shows alive is kept, and one it does not show alive can never become so.

    Raises:
        sqlalchemy.exc.SQLAlchemyError: the database cannot be read (nothing was removed).
    """
    store = artifact_storage(settings)
    report = SweepReport()
    staging = store.staging_root()
    entries: dict[Path, tuple[str, int]] = {}
    if staging.is_dir():
        for path in staging.iterdir():
            parsed = attempt_of(path.name)
            if parsed is not None:
                entries[path] = parsed
    if entries:
        ids = sorted({job_id for job_id, _ in entries.values()})
        with sessions() as s:
            rows = s.execute(select(Job.id, Job.status, Job.attempt).where(Job.id.in_(ids)))
            alive = {(i, a) for i, status, a in rows if status in LIVE_STATUSES}
        for path, key in sorted(entries.items()):
            if key in alive:
                continue
            size, _ = _size_and_newest(path)
            _remove(path)
            report.removed.append(path.name)
            report.freed_bytes += size
    if isinstance(store, LocalStorage) and store.root.is_dir():
        limit = (time.time() if now is None else now) - TMP_GRACE_S
        for path in sorted(store.root.glob(f"{_TMP_PREFIX}*")):
            if not path.is_dir() or path.is_symlink():
                continue
            size, newest = _size_and_newest(path)
            if newest < limit:
                _remove(path)
                report.removed.append(path.name)
                report.freed_bytes += size
    if report.removed:
        log.warning(
            "swept the staging of dead attempts: %s (%d bytes)",
            ", ".join(report.removed),
            report.freed_bytes,
        )
    return report
