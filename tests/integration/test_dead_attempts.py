"""What a dead attempt leaves, on the real PostgreSQL and Redis: the reconciler's ``retried``
event names the step it had reached (its newest checkpoint when it was lost after training),
and the sweep removes the staging folders of attempts that are no longer alive (real folders),
never a live attempt's."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from core import checkpoints, repository, tenants
from core.db import Job, JobEvent, utcnow
from core.settings import Settings
from core.storage import artifact_storage
from worker import staging
from worker.reconciler import reconcile_once


@pytest.fixture
def sm(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = create_engine(settings.database_url)
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


def new_job(sm: sessionmaker[Session], status: str = "queued", attempt: int = 0) -> str:
    job_id = str(uuid.uuid4())
    with sm() as s:
        tenant = tenants.ensure_tenant(s, "test")
        repository.create_job(s, job_id, "finetune", {}, tenant_id=tenant.id)
        s.flush()
        s.execute(update(Job).where(Job.id == job_id).values(status=status, attempt=attempt))
        s.commit()
    return job_id


def test_a_worker_lost_after_training_is_reported_at_its_newest_checkpoint(
    settings: Settings, sm: sessionmaker[Session]
) -> None:
    lost = new_job(sm, "running", 1)
    old = utcnow() - timedelta(seconds=60)
    with sm() as s:
        for step in (8, 12):
            checkpoints.add(
                s,
                lost,
                name=f"step-{step:08d}",
                step=step,
                total_steps=12,
                hop=1,
                stage="finetune",
                reason="interval" if step == 8 else "stage_end",
                dev={},
                files=[("state.pt", 10, "0" * 64)],
                attempt=1,
            )
        # lost while publishing: its progress is the last stage's (step 0)
        s.execute(
            update(Job)
            .where(Job.id == lost)
            .values(progress={"stage": "export", "step": 0}, heartbeat_at=old, updated_at=old)
        )
        s.commit()
    quick = settings.model_copy(update={"heartbeat_timeout_s": 5.0})

    report = reconcile_once(quick)

    assert report.retried == [lost], report
    with sm() as s:
        event = s.scalars(
            select(JobEvent).where(JobEvent.job_id == lost, JobEvent.type == "retried")
        ).one()
    assert event.message == (
        "worker lost at step 12 (newest checkpoint step-00000012 at step 12); attempt 2 of 3"
    )
    assert event.data["step"] == 12
    assert event.data["checkpoint"] == "step-00000012"


def make_dirs(root: Path, *names: str, size: int = 1000) -> None:
    for name in names:
        (root / name).mkdir(parents=True)
        (root / name / "model.safetensors").write_bytes(b"w" * size)


def test_the_sweep_removes_dead_attempts_staging_and_keeps_live_ones(
    settings: Settings, sm: sessionmaker[Session]
) -> None:
    running = new_job(sm, "running", 2)
    pausing = new_job(sm, "pausing", 1)
    requeued = new_job(sm, "queued", 1)  # attempt 1 lost, waiting for attempt 2
    succeeded = new_job(sm, "succeeded", 1)
    paused = new_job(sm, "paused", 1)
    deleted = str(uuid.uuid4())  # no row
    root = artifact_storage(settings).staging_root()
    live = [f"{running}-2", f"{running}-2-checkpoints", f"{running}-2-resume", f"{pausing}-1"]
    dead = [
        f"{running}-1",  # an earlier attempt of a running job
        f"{running}-1-checkpoints",
        f"{requeued}-1",
        f"{requeued}-1-checkpoints",
        f"{succeeded}-1",
        f"{paused}-1-resume",
        f"{deleted}-3",
    ]
    make_dirs(root, *live, *dead)
    (root / "tmpab12cd").write_bytes(b"an s3 upload's spool file")  # not an attempt's: kept
    make_dirs(root, "notes")
    # an older put_dir's checkpoints moved aside at the store's root, untouched for 2 hours,
    # and one being written now
    store_root = settings.artifacts_root.resolve()
    make_dirs(store_root / ".tmp-abc/0", "step-00000060", size=5000)
    make_dirs(store_root / ".tmp-new/0", "step-00000008")
    two_hours_ago = time.time() - 7200
    for dirpath, dirnames, filenames in os.walk(store_root / ".tmp-abc"):
        for name in [".", *dirnames, *filenames]:
            os.utime(Path(dirpath) / name, (two_hours_ago, two_hours_ago))
    job_files = store_root / running / "checkpoints" / "step-00000008"
    make_dirs(job_files.parent, job_files.name)

    report = reconcile_once(settings)  # the pass runs worker.staging.sweep

    assert not report.errors, report
    assert sorted(report.swept) == sorted([*dead, ".tmp-abc"])
    left = sorted(p.name for p in root.iterdir())
    assert left == sorted([*live, "tmpab12cd", "notes"])
    assert sorted(p.name for p in store_root.glob(".tmp-*")) == [".tmp-new"]
    assert (job_files / "model.safetensors").is_file()  # the store itself is never swept
    # a second sweep finds nothing; its bytes were counted the first time
    again = staging.sweep(settings, sm)
    assert again.removed == [] and again.freed_bytes == 0
    make_dirs(root, f"{succeeded}-1")
    assert staging.sweep(settings, sm).freed_bytes == 1000
