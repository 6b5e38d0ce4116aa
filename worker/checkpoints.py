"""The worker's side of checkpoints: store each one the KD loop writes in the artifact store
(and the ``job_checkpoints`` table, with a ``checkpoint`` event), keep the newest
``checkpoints_keep``, fetch the newest loadable one to resume from, and settle a paused job.

Checkpoints are staged under the artifact store's staging folder (for the local backend
``<artifacts root>/.partial/``, the same filesystem, so publishing one is a rename; for s3 the
local storage cache, uploaded from there) and live in the store under
``<job id>/checkpoints/<name>/``.
"""

from __future__ import annotations

import functools
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from core import checkpoints, events, repository
from core.job_status import JobStatus
from core.settings import Settings
from core.storage import ObjectNotFound, StorageError, artifact_storage, sha256_file
from kd_engine.checkpoint import CheckpointPolicy, SavedCheckpoint, read_checkpoint_info
from kd_engine.contracts import CheckpointSaved, PausedAt, Resumed
from worker.db_retry import Retrier

log = logging.getLogger("distillery.worker")


def policy(settings: Settings, directory: Path) -> CheckpointPolicy:
    """The checkpoint policy of this worker's settings, writing into ``directory``."""
    return CheckpointPolicy(
        directory=directory,
        every_steps=settings.checkpoint_every_steps,
        every_seconds=settings.checkpoint_every_s,
        at_stage_end=True,
    )


def store(
    sm: sessionmaker[Session], settings: Settings, job_id: str, attempt: int, saved: SavedCheckpoint
) -> None:
    """Publish the local checkpoint ``saved`` (consumed: its local folder is gone after) under
    ``<job id>/checkpoints/<name>/``, record its row and a ``checkpoint`` event in one
    transaction, then delete the checkpoints beyond the newest ``checkpoints_keep`` (rows and
    files).

    The database transaction is retried through transient errors
    (:class:`worker.db_retry.Retrier`); the files are not sent again.

    Raises:
        StorageError, OSError: the store refused it (the caller decides whether that is fatal).
        DatabaseUnavailable: the database stayed away past the retry deadline.
    """
    store_ = artifact_storage(settings)
    prefix = checkpoints.checkpoint_key(job_id, saved.name)
    stored = store_.put_dir(prefix, saved.path)
    files = [(o.key.removeprefix(prefix + "/"), o.size, o.sha256) for o in stored]
    old = Retrier.for_settings(settings)(
        "checkpoint", lambda: _record_stored(sm, settings, job_id, attempt, saved, files)
    )
    shutil.rmtree(saved.path, ignore_errors=True)
    for name in old:
        store_.delete_prefix(checkpoints.checkpoint_key(job_id, name))


def _record_stored(
    sm: sessionmaker[Session],
    settings: Settings,
    job_id: str,
    attempt: int,
    saved: SavedCheckpoint,
    files: list[tuple[str, int, str]],
) -> list[str]:
    """One transaction: the checkpoint's row, its event, and the rows beyond the newest
    ``checkpoints_keep`` removed; returns the names removed (their files are the caller's)."""
    with sm() as s:
        row = checkpoints.add(
            s,
            job_id,
            name=saved.name,
            step=saved.step,
            total_steps=saved.total_steps,
            hop=saved.hop,
            stage=saved.stage,
            reason=saved.reason,
            dev=dict(saved.dev),
            files=files,
            attempt=attempt,
        )
        hop = f" (hop {saved.hop}/{saved.num_hops})" if saved.num_hops > 1 else ""
        events.record(
            s,
            job_id,
            "checkpoint",
            f"checkpoint {saved.name} saved at step {saved.step} of {saved.total_steps}{hop} "
            f"({saved.reason})",
            data=CheckpointSaved(
                name=saved.name,
                step=saved.step,
                total_steps=saved.total_steps,
                hop=saved.hop,
                num_hops=saved.num_hops,
                stage=saved.stage,
                reason=saved.reason,
                size_bytes=row.size_bytes,
            ).model_dump(),
        )
        old = checkpoints.beyond_keep(s, job_id, settings.checkpoints_keep)
        checkpoints.remove(s, job_id, old)
        s.commit()
    return list(old)


STUDENT_DIR = "student/"
"""The folder of a checkpoint that holds its student (a transformers directory)."""


def keep_students(sm: sessionmaker[Session], settings: Settings, job_id: str) -> int:
    """Once the job succeeded, strip each kept checkpoint to its ``student/`` folder: the
    training state, optimiser, RNG states and output copies only a resume needs are deleted,
    the row stays listed with its new size and its student stays downloadable (``/archive``).
    Returns the bytes freed. A file the store cannot delete is left (and logged)."""
    store_ = artifact_storage(settings)
    freed = 0
    with sm() as s:
        for row in checkpoints.list_checkpoints(s, job_id):
            prefix = checkpoints.checkpoint_key(job_id, row.name)
            kept = [f for f in row.files if str(f[0]).startswith(STUDENT_DIR)]
            for path, size, _ in (f for f in row.files if f not in kept):
                try:
                    store_.delete(f"{prefix}/{path}")
                    freed += int(size)
                except (StorageError, OSError):
                    log.exception("job %s: could not remove %s/%s", job_id, prefix, path)
            row.files = kept
            row.size_bytes = sum(int(f[1]) for f in kept)
        s.commit()
    return freed


@dataclass(frozen=True)
class Resume:
    """A checkpoint fetched to resume from: its local copy and what it says."""

    directory: Path
    info: SavedCheckpoint


def _verify(directory: Path, files: list[list[object]]) -> None:
    """Raise ValueError unless every recorded file is there with its size and sha256."""
    for rel, size, digest in files:
        path = directory / str(rel)
        if not path.is_file():
            raise ValueError(f"{rel} is missing")
        if path.stat().st_size != size or sha256_file(path) != digest:
            raise ValueError(f"{rel} does not match the stored checksum")


def fetch_latest(
    sm: sessionmaker[Session], settings: Settings, job_id: str, dest: Path
) -> Resume | None:
    """Copy the newest loadable checkpoint of the job into ``dest`` (emptied first) and return
    it; None when the job has none that loads. A checkpoint that is missing, truncated, altered
    or without a readable manifest is skipped for the one before it, with a ``warning`` event
    naming it (and one more when none is left: the job starts afresh). Its database work is
    retried through transient errors (:class:`worker.db_retry.Retrier`).

    Raises:
        DatabaseUnavailable: the database stayed away past the retry deadline.
    """
    store_ = artifact_storage(settings)
    db = Retrier.for_settings(settings)

    def listed() -> list[tuple[str, list[list[object]]]]:
        with sm() as s:
            return [(r.name, r.files) for r in checkpoints.list_checkpoints(s, job_id)]

    rows = db("checkpoint list", listed)
    skipped = []
    for name, files in reversed(rows):
        shutil.rmtree(dest, ignore_errors=True)
        try:
            source = store_.local_path(checkpoints.checkpoint_key(job_id, name))
            if not source.is_dir():
                raise ObjectNotFound(f"checkpoint {name} is missing from the store")
            shutil.copytree(source, dest)
            _verify(dest, files)
            info = read_checkpoint_info(dest)
        except (ValueError, KeyError, TypeError, OSError, StorageError) as e:
            skipped.append(name)
            message = f"checkpoint {name} cannot be loaded ({e}); trying an older one"
            db("event", functools.partial(warn, sm, job_id, message))
            continue
        return Resume(dest, info)
    shutil.rmtree(dest, ignore_errors=True)
    if skipped:
        message = f"no checkpoint could be loaded ({', '.join(skipped)}); training starts afresh"
        db("event", lambda: warn(sm, job_id, message))
    return None


def warn(sm: sessionmaker[Session], job_id: str, message: str) -> None:
    """Log ``message`` and record it as a ``warning`` event of the job."""
    log.warning("job %s: %s", job_id, message)
    with sm() as s:
        events.record(s, job_id, "warning", message, level="warning")
        s.commit()


def record_resumed(
    sm: sessionmaker[Session], job_id: str, attempt: int, info: SavedCheckpoint
) -> None:
    """A ``resumed`` event: which checkpoint, at which step."""
    hop = f" (hop {info.hop}/{info.num_hops})" if info.num_hops > 1 else ""
    with sm() as s:
        events.record(
            s,
            job_id,
            "resumed",
            f"resumed from checkpoint {info.name} at step {info.step} of {info.total_steps}{hop}",
            data=Resumed(
                checkpoint=info.name,
                step=info.step,
                total_steps=info.total_steps,
                hop=info.hop,
                num_hops=info.num_hops,
                stage=info.stage,
                attempt=attempt,
            ).model_dump(),
        )
        s.commit()


def settle_paused(sm: sessionmaker[Session], job_id: str, saved: SavedCheckpoint) -> str:
    """After the loop paused: pausing -> paused (the job holds no worker), with a ``paused``
    event; return the status. A cancel that arrived meanwhile leaves it cancelling (the caller
    then finishes it as cancelled)."""
    with sm() as s:
        if repository.transition(s, job_id, (JobStatus.PAUSING,), JobStatus.PAUSED, worker=None):
            events.record(
                s,
                job_id,
                "paused",
                f"paused at step {saved.step} of {saved.total_steps} (checkpoint {saved.name}); "
                "the worker is free",
                data=PausedAt(
                    checkpoint=saved.name, step=saved.step, total_steps=saved.total_steps
                ).model_dump(),
            )
            s.commit()
            return JobStatus.PAUSED
        s.rollback()
        job = repository.get_job(s, job_id)
        return job.status if job is not None else "missing"
