"""Running one job: claim the row, run the KD engine with progress and cancel hooks, publish
the artifacts, finalise the row. Every outcome leaves the job in a final state with a reason."""

from __future__ import annotations

import dataclasses
import logging
import socket
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery import Celery
from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from core import checkpoints, dependencies, events, logs, refs, repository
from core.db import make_engine, make_sessionmaker, utcnow
from core.db_errors import is_transient, public_message, scrub
from core.job_status import LIVE, JobStatus, sources_of
from core.queue import make_celery
from core.settings import Settings
from core.storage import StorageError, artifact_storage
from core.upload_names import name_uploads
from kd_engine.checkpoint import Paused, SavedCheckpoint
from kd_engine.contracts import JobMetrics, Progress, Succeeded
from kd_engine.ranks import worker_gpus
from kd_engine.run import run_job
from kd_engine.spec import PretrainedStudent, stored_spec
from kd_engine.torchrun import run_job_distributed
from kd_engine.trainer import Cancelled, TrainHooks
from worker import checkpoints as saved_checkpoints
from worker.db_retry import DatabaseUnavailable, Retrier
from worker.heartbeat import Heartbeat
from worker.staging import AttemptDirs
from worker.teacher_caches import ArtifactCacheStore
from worker.tracking import JobTracker

log = logging.getLogger("distillery.worker")


@lru_cache(maxsize=4)
def sessions_for(database_url: str) -> sessionmaker[Session]:
    """One connection pool per database URL for this worker process."""
    return make_sessionmaker(make_engine(database_url))


def _finish(
    sm: sessionmaker[Session],
    job_id: str,
    status: JobStatus,
    message: str,
    attempt: int | None = None,
    **values: Any,
) -> None:
    """Set the job's final ``status`` (from any status a worker holds it in) with its event,
    if it is still on ``attempt``."""
    with sm() as s:
        if status == JobStatus.FAILED:  # an upload named by its filename beside its id
            message = name_uploads(s, message)
            values = {**values, "error": message} if "error" in values else values
        if repository.transition(
            s,
            job_id,
            sources_of(status, LIVE),
            status,
            on_attempt=attempt,
            finished_at=utcnow(),
            **values,
        ):
            level = "error" if status == JobStatus.FAILED else "info"
            events.record(s, job_id, status, message, level=level)
        s.commit()


def _publish(
    sm: sessionmaker[Session],
    settings: Settings,
    job_id: str,
    tmp: Path,
    metrics: dict[str, Any],
    attempt: int | None = None,
    db: Retrier | None = None,
) -> bool:
    """Publish the finished output to the artifact store (replacing an earlier attempt's),
    record its top-level files, mark the job succeeded; with ``attempt``, only while the job
    is still on that attempt. Returns whether it was published. Its database work goes
    through ``db`` (default: the settings' retrier).

    Raises:
        DatabaseUnavailable: the database stayed away past the retry deadline.
    """
    db = db or Retrier.for_settings(settings)
    if attempt is not None:

        def still_owned() -> bool:
            with sm() as s:
                return repository.owns(s, job_id, attempt)

        if not db("ownership check", still_owned):
            return False
    stored = artifact_storage(settings).put_dir(
        refs.job_key(job_id), tmp, keep=(checkpoints.CHECKPOINTS_DIR,)
    )
    files = [
        (name, o.size, o.sha256)
        for o in stored
        if "/" not in (name := o.key.removeprefix(f"{job_id}/"))
    ]
    return db("publish", lambda: _record_published(sm, job_id, files, metrics, attempt))


def _record_published(
    sm: sessionmaker[Session],
    job_id: str,
    files: list[tuple[str, int, str]],
    metrics: dict[str, Any],
    attempt: int | None,
) -> bool:
    """One transaction: the artifacts' rows, ``succeeded`` and its event (if still owned)."""
    with sm() as s:
        repository.replace_artifacts(s, job_id, files)
        typed = JobMetrics.model_validate(metrics)
        steps = sum(st.steps or 0 for st in typed.stages)
        done = Progress(
            "done",
            epoch=sum(st.epochs or 0 for st in typed.stages),
            step=steps,
            total_steps=steps,
            stage_index=len(typed.stages),
            num_stages=len(typed.stages),
            hop=len(typed.hops),
            num_hops=len(typed.hops),
        )
        published = repository.transition(
            s,
            job_id,
            LIVE,
            JobStatus.SUCCEEDED,
            on_attempt=attempt,
            finished_at=utcnow(),
            metrics=metrics,
            progress=dataclasses.asdict(done),
        )
        if not published:  # cancelled meanwhile, or another attempt owns it: keep its rows
            s.rollback()
            return False
        events.record(
            s,
            job_id,
            "succeeded",
            f"the {'fine-tuned teacher' if typed.trained == 'teacher' else 'student'} "
            "is ready to download",
            data=Succeeded(test=typed.test or {}, artifacts=[f[0] for f in files]).model_dump(),
        )
        s.commit()
    return True


_LOGGED_EVENTS = ("stage", "epoch", "warning")
"""Training-log records that also become job events."""


def _log_event(sm: sessionmaker[Session], job_id: str, record: dict[str, object]) -> None:
    """Record a training-log record (a stage beginning, an epoch's dev metrics, a warning) as
    a job event."""
    kind = str(record["event"])
    data = {k: v for k, v in record.items() if k != "event"}
    if kind == "stage":
        message = f"stage {record.get('stage')}"
        if record.get("message"):
            message += f": {record['message']}"
    elif kind == "epoch":
        dev = _fmt_metrics(record.get("dev"))
        message = f"epoch {record.get('epoch')} ({record.get('stage')}): dev {dev}"
    else:
        message = str(record.get("message", ""))
    with sm() as s:
        events.record(
            s, job_id, kind, message, level="warning" if kind == "warning" else "info", data=data
        )
        s.commit()


def _fmt_metrics(metrics: object) -> str:
    """``accuracy 0.8125, macro_f1 0.8093``: metrics with 4 significant digits."""
    if not isinstance(metrics, dict):
        return str(metrics)
    return ", ".join(
        f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
    )


def _user_reason(exc: BaseException) -> str:
    """The reason a failed job shows: never SQL, parameters or a stack trace
    (:func:`core.db_errors.public_message`)."""
    name = type(exc).__name__
    if "OutOfMemory" in name:
        return (
            "out of memory on the worker: lower training.batch_size or "
            "training.max_seq_length, or use a smaller teacher"
        )
    if isinstance(exc, ValidationError):
        return f"the stored job spec is invalid: {exc.errors()[0].get('msg')}"
    return f"internal error ({public_message(exc)}); the worker log has the details"


def _recoveries_event(
    sm: sessionmaker[Session], db: Retrier, job_id: str, step: int | None
) -> None:
    """A ``warning`` event for the database work that needed retries since the last one
    (nothing when none did): how many units of work, tries, the longest outage, the first
    error."""
    done = db.take_recoveries()
    if not done:
        return
    longest = max(r.seconds for r in done)
    tries = sum(r.attempts for r in done)
    at = f" at step {step}" if step is not None else ""
    message = (
        f"the database was unavailable for up to {longest:.1f} s{at} ({done[0].error}); "
        f"{len(done)} database operation(s) succeeded after {tries} tries in all, and the job "
        "went on"
    )
    data = {
        "database_retries": {
            "operations": [r.what for r in done],
            "tries": tries,
            "longest_s": round(longest, 3),
            "first_error": done[0].error,
            "step": step,
        }
    }

    def record() -> None:
        with sm() as s:
            events.record(s, job_id, "warning", message, level="warning", data=data)
            s.commit()

    log.warning("job %s: %s", job_id, message)
    db("event", record)


def execute(job_id: str, settings: Settings) -> str:
    """Run job ``job_id`` if it can be claimed; return the final status, or ``skipped`` when
    another delivery already claimed it (or it was cancelled while queued). Every log record
    of the run names the job (``job_id``: :mod:`core.logs`)."""
    with logs.bound_job(job_id):
        try:
            return _execute(job_id, settings)
        except DatabaseUnavailable as e:  # before the claim or the training began
            log.warning("job %s: stopped without a verdict: %s", job_id, e)
            return "interrupted"


def _claim(sm: sessionmaker[Session], job_id: str) -> tuple[dict[str, Any], int, str] | None:
    """One transaction: queued -> running (attempt + 1) with its ``started`` event; the job's
    spec, attempt and tenant, or None when it cannot be claimed."""
    with sm() as s:
        if not repository.claim(s, job_id, socket.gethostname()):
            s.rollback()
            return None
        job = repository.get_job(s, job_id)
        if job is None:  # deleted between the claim and this read
            s.rollback()
            return None
        claimed = (job.spec, job.attempt, job.tenant_id)
        events.record(
            s,
            job_id,
            "started",
            f"attempt {job.attempt} started on {socket.gethostname()}",
            data={"attempt": job.attempt, "worker": socket.gethostname()},
        )
        s.commit()
    return claimed


def _execute(job_id: str, settings: Settings) -> str:
    sm = sessions_for(settings.database_url)
    # Every database transaction below is retried through transient errors up to a deadline
    # (worker.db_retry); past it, DatabaseUnavailable stops the attempt without a verdict.
    db = Retrier.for_settings(settings)
    # Before the claim: a store that cannot be reached (s3) leaves the job queued.
    staging = artifact_storage(settings).staging_root()
    claimed = db("claim", lambda: _claim(sm, job_id))
    if claimed is None:
        log.info("job %s: not claimable (already taken, finished or cancelled)", job_id)
        return "skipped"
    spec_data, attempt, tenant_id = claimed
    dirs = AttemptDirs.of(staging, job_id, attempt)  # swept by worker.staging if we die
    dirs.remove()
    tmp, ckpt_dir = dirs.output, dirs.checkpoints
    # The heartbeat starts before the checkpoint download: a large one is not a lost worker.
    beat = Heartbeat(sm, job_id, attempt, settings.heartbeat_interval_s)
    beat.start()
    resume = None
    try:
        resume = saved_checkpoints.fetch_latest(sm, settings, job_id, dirs.resume)
        if resume is not None:
            info = resume.info
            db("event", lambda: saved_checkpoints.record_resumed(sm, job_id, attempt, info))
    except BaseException:  # the heartbeat must not keep a job alive that nobody runs
        beat.stop()
        dirs.remove()  # the resume copy included
        raise

    def warn(message: str) -> None:
        db("event", lambda: saved_checkpoints.warn(sm, job_id, message))

    tracker = JobTracker(settings, job_id, tenant_id, attempt, spec_data, warn)
    tracker.start()
    outcome: str = JobStatus.FAILED
    epochs: list[dict[str, Any]] = []
    status: dict[str, str] = {"value": JobStatus.RUNNING}

    def write_progress(p: Progress) -> str:
        with sm() as s:
            current = repository.heartbeat(
                s,
                job_id,
                dataclasses.asdict(p),
                metrics={"epochs": list(epochs)},
                attempt=attempt,
            )
            s.commit()
        return current or "missing"

    def on_progress(p: Progress) -> None:
        status["value"] = db("progress", lambda: write_progress(p))
        _recoveries_event(sm, db, job_id, p.step)

    def on_log(record: dict[str, object]) -> None:
        kind = record.get("event")
        if kind == "epoch":
            epochs.append({k: v for k, v in record.items() if k != "event"})
        if kind in _LOGGED_EVENTS:
            db("event", lambda: _log_event(sm, job_id, record))
        tracker.on_log(record)

    stored_names: set[str] = set()

    def on_checkpoint(saved: SavedCheckpoint) -> None:
        if beat.lost:  # another attempt owns the job now: its checkpoints are not ours to add
            return
        try:
            saved_checkpoints.store(sm, settings, job_id, attempt, saved)
            stored_names.add(saved.name)
        except (StorageError, OSError) as e:  # training goes on; a resume uses an older one
            log.exception("job %s: checkpoint %s not stored", job_id, saved.name)
            warn(f"checkpoint {saved.name} not stored: {e}")

    hooks = TrainHooks(
        on_progress=on_progress,
        should_stop=lambda: (
            status["value"] not in (JobStatus.RUNNING, JobStatus.PAUSING) or beat.lost
        ),
        log=on_log,
        every=settings.progress_every_steps,
        on_checkpoint=on_checkpoint,
        should_pause=lambda: status["value"] == JobStatus.PAUSING,
    )
    try:
        spec = stored_spec(spec_data)  # the typed spec, parsed once for the whole attempt
        teacher = refs.model_location(spec.teacher, settings)
        student = (
            refs.model_location(spec.student.model, settings)
            if isinstance(spec.student, PretrainedStudent)
            else None
        )
        generator_ref = getattr(spec.method, "generator", None)
        generator = (
            refs.model_location(generator_ref, settings) if generator_ref is not None else None
        )
        gpus = worker_gpus()
        if gpus > 1:  # one job on several GPUs: torchrun's data-parallel ranks
            result = run_job_distributed(
                spec,
                teacher,
                lambda ref: refs.dataset_file(ref, settings),
                tmp,
                gpus,
                hooks,
                student,
                generator,
                checkpoints=saved_checkpoints.policy(settings, ckpt_dir),
                resume_from=resume.directory if resume is not None else None,
            )
        else:
            result = run_job(
                spec,
                teacher,
                lambda ref: refs.dataset_file(ref, settings),
                tmp,
                hooks,
                student,
                generator,
                checkpoints=saved_checkpoints.policy(settings, ckpt_dir),
                resume_from=resume.directory if resume is not None else None,
                teacher_cache_store=ArtifactCacheStore(settings, tenant_id),
            )
        if beat.lost:  # stalled past the heartbeat timeout: another attempt owns the job now
            log.warning("job %s: attempt %d lost its claim; not published", job_id, attempt)
            outcome = "lost"
            return "lost"
        tracker.finished(result.metrics, tmp)  # before publishing consumes tmp
        _recoveries_event(sm, db, job_id, None)
        if not _publish(sm, settings, job_id, tmp, result.metrics, attempt, db):
            log.warning("job %s: attempt %d no longer owns the job; not published", job_id, attempt)
            outcome = "lost"
            return "lost"
        db("checkpoint clean-up", lambda: saved_checkpoints.keep_students(sm, settings, job_id))
        log.info("job %s: succeeded", job_id)
        outcome = JobStatus.SUCCEEDED
        return JobStatus.SUCCEEDED
    except Paused as p:
        if p.checkpoint.name not in stored_names and p.checkpoint.path.is_dir():
            on_checkpoint(p.checkpoint)
        paused_at = p.checkpoint
        final = db("pause", lambda: saved_checkpoints.settle_paused(sm, job_id, paused_at))
        if final == JobStatus.CANCELLING:
            db(
                "finish",
                lambda: _finish(
                    sm, job_id, JobStatus.CANCELLED, "cancelled by request while pausing", attempt
                ),
            )
            final = JobStatus.CANCELLED
        log.info("job %s: %s", job_id, final)
        outcome = final
        return final
    except Cancelled:
        if beat.lost:  # re-queued by the reconciler after a stall: another attempt owns it
            log.warning("job %s: attempt %d lost its claim; stopped", job_id, attempt)
            outcome = "lost"
            return "lost"
        db(
            "finish",
            lambda: _finish(
                sm,
                job_id,
                JobStatus.CANCELLED,
                "cancelled by request; the worker stopped",
                attempt,
            ),
        )
        log.info("job %s: cancelled", job_id)
        outcome = JobStatus.CANCELLED
        return JobStatus.CANCELLED
    except DatabaseUnavailable as e:
        # No verdict: the job stays running, its heartbeat (stopped below) goes stale and the
        # reconciler re-queues it; the next attempt resumes from the newest checkpoint.
        log.warning("job %s: attempt %d stopped without a verdict: %s", job_id, attempt, e)
        outcome = "interrupted"
        return "interrupted"
    except ValueError as e:
        reason = _user_reason(e) if isinstance(e, ValidationError) else scrub(str(e))
        log.warning("job %s: failed: %s", job_id, reason)
        db("finish", lambda: _finish(sm, job_id, JobStatus.FAILED, reason, attempt, error=reason))
        return JobStatus.FAILED
    except Exception as e:
        if is_transient(e):  # a database error that escaped the retries is never a verdict
            log.warning(
                "job %s: attempt %d stopped without a verdict", job_id, attempt, exc_info=True
            )
            outcome = "interrupted"
            return "interrupted"
        log.exception("job %s: failed", job_id)
        reason = _user_reason(e)
        db("finish", lambda: _finish(sm, job_id, JobStatus.FAILED, reason, attempt, error=reason))
        return JobStatus.FAILED
    finally:
        beat.stop()  # first: nothing below may keep a stopped attempt's job looking alive
        tracker.end(outcome)
        dirs.remove()  # output, checkpoints and the resume copy
        release_dependents(settings, job_id)


_CELERY_APPS: dict[str, Celery] = {}


def release_dependents(settings: Settings, job_id: str) -> list[str]:
    """Once job ``job_id`` has reached a final state, move the jobs waiting for it on
    (:func:`core.dependencies.release_after`: queued and enqueued when it succeeded, failed
    naming it otherwise). Returns their ids; an error is logged, not raised (the reconciler's
    pass releases them later)."""
    app = _CELERY_APPS.get(settings.broker_url)
    if app is None:
        app = _CELERY_APPS.setdefault(settings.broker_url, make_celery(settings))
    try:
        with sessions_for(settings.database_url)() as s:
            return dependencies.release_after(s, settings, app, job_id)
    except Exception:
        log.exception("job %s: could not release the jobs waiting for it", job_id)
        return []
