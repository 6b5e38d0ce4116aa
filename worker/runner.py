"""Running one job: claim the row, run the KD engine with progress and cancel hooks, publish
the artifacts, finalise the row. Every outcome leaves the job in a final state with a reason."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import shutil
import socket
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sqlalchemy.orm import Session, sessionmaker

from api import refs, repository
from api.db import make_engine, make_sessionmaker, utcnow
from api.settings import Settings
from kd_engine.export import make_readable
from kd_engine.run import run_job
from kd_engine.spec import JobSpec, PretrainedStudent
from kd_engine.trainer import Cancelled, Progress, TrainHooks

log = logging.getLogger("distillery.worker")


@lru_cache(maxsize=4)
def sessions_for(database_url: str) -> sessionmaker[Session]:
    """One connection pool per database URL for this worker process."""
    return make_sessionmaker(make_engine(database_url))


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _finish(sm: sessionmaker[Session], job_id: str, status: str, **values: Any) -> None:
    with sm() as s:
        repository.transition(
            s, job_id, ("running", "cancelling"), status, finished_at=utcnow(), **values
        )
        s.commit()


def _publish(
    sm: sessionmaker[Session], settings: Settings, job_id: str, tmp: Path, metrics: dict[str, Any]
) -> None:
    """Move the finished output into place (files 0644, folders 0755), record its files, mark
    the job succeeded."""
    final = refs.job_dir(settings, job_id)
    make_readable(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.replace(final)
    files = [
        (p.name, p.stat().st_size, sha256_of(p)) for p in sorted(final.iterdir()) if p.is_file()
    ]
    with sm() as s:
        repository.replace_artifacts(s, job_id, files)
        stages = metrics.get("stages") or []
        steps = sum(int(st.get("steps", 0)) for st in stages)
        done = {
            "stage": "done",
            "epoch": sum(int(st.get("epochs", 0)) for st in stages),
            "step": steps,
            "total_steps": steps,
            "losses": {},
            "stage_index": len(stages),
            "num_stages": len(stages),
            "hop": len(metrics.get("hops") or []),
            "num_hops": len(metrics.get("hops") or []),
        }
        repository.transition(
            s,
            job_id,
            ("running", "cancelling"),
            "succeeded",
            finished_at=utcnow(),
            metrics=metrics,
            progress=done,
        )
        s.commit()


def _user_reason(exc: BaseException) -> str:
    name = type(exc).__name__
    if "OutOfMemory" in name:
        return (
            "out of memory on the worker: lower training.batch_size or "
            "training.max_seq_length, or use a smaller teacher"
        )
    if isinstance(exc, ValidationError):
        return f"the stored job spec is invalid: {exc.errors()[0].get('msg')}"
    return f"internal error ({name}: {exc}); the worker log has the details"


def execute(job_id: str, settings: Settings) -> str:
    """Run job ``job_id`` if it can be claimed; return the final status, or ``skipped`` when
    another delivery already claimed it (or it was cancelled while queued)."""
    sm = sessions_for(settings.database_url)
    reaped = reap_stale(settings)
    if reaped:
        log.warning("failed %d job(s) whose worker was lost: %s", len(reaped), reaped)
    with sm() as s:
        if not repository.claim(s, job_id, socket.gethostname()):
            s.rollback()
            log.info("job %s: not claimable (already taken, finished or cancelled)", job_id)
            return "skipped"
        s.commit()
        job = repository.get_job(s, job_id)
        if job is None:  # deleted between the claim and this read
            return "skipped"
        spec_data, attempt = job.spec, job.attempt
    tmp = settings.artifacts_root.resolve() / ".partial" / f"{job_id}-{attempt}"
    shutil.rmtree(tmp, ignore_errors=True)
    epochs: list[dict[str, Any]] = []
    status = {"value": "running"}

    def on_progress(p: Progress) -> None:
        with sm() as s:
            status["value"] = (
                repository.heartbeat(
                    s,
                    job_id,
                    dataclasses.asdict(p),
                    metrics={"epochs": list(epochs)},
                )
                or "missing"
            )
            s.commit()

    def on_log(record: dict[str, object]) -> None:
        if record.get("event") == "epoch":
            epochs.append({k: v for k, v in record.items() if k != "event"})

    hooks = TrainHooks(
        on_progress=on_progress,
        should_stop=lambda: status["value"] != "running",
        log=on_log,
        every=settings.progress_every_steps,
    )
    try:
        spec = JobSpec.model_validate(spec_data)
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
        result = run_job(
            spec,
            teacher,
            lambda ref: refs.dataset_file(ref, settings),
            tmp,
            hooks,
            student,
            generator,
        )
        _publish(sm, settings, job_id, tmp, result.metrics)
        log.info("job %s: succeeded", job_id)
        return "succeeded"
    except Cancelled:
        _finish(sm, job_id, "cancelled")
        log.info("job %s: cancelled", job_id)
        return "cancelled"
    except ValueError as e:
        reason = _user_reason(e) if isinstance(e, ValidationError) else str(e)
        log.warning("job %s: failed: %s", job_id, reason)
        _finish(sm, job_id, "failed", error=reason)
        return "failed"
    except Exception as e:
        log.exception("job %s: failed", job_id)
        _finish(sm, job_id, "failed", error=_user_reason(e))
        return "failed"
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def reap_stale(settings: Settings) -> list[str]:
    """Fail running jobs whose worker stopped sending heartbeats; return their ids."""
    with sessions_for(settings.database_url)() as s:
        ids = repository.fail_stale(s, settings.heartbeat_timeout_s)
        s.commit()
    return ids
