"""The lifecycle's table on the real PostgreSQL, through the code that changes a job's status:
:func:`core.repository.transition` makes every listed change and refuses every other one
(nothing written), and a finished job cannot go back to running through the worker's claim,
the API's pause/resume/cancel or the reconciler."""

from __future__ import annotations

import itertools
import uuid
from collections.abc import Iterator
from datetime import timedelta

import pytest
from sqlalchemy import create_engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from core import repository, service, tenants
from core.db import Job, utcnow
from core.errors import Conflict
from core.job_status import TRANSITIONS, IllegalTransition, JobStatus
from core.settings import Settings
from worker import runner
from worker.reconciler import reconcile_once

S = JobStatus


@pytest.fixture
def sm(settings: Settings) -> Iterator[sessionmaker[Session]]:
    engine = create_engine(settings.database_url)
    yield sessionmaker(engine, expire_on_commit=False)
    engine.dispose()


def _job(sm: sessionmaker[Session], status: JobStatus) -> tuple[str, str]:
    """A new job of tenant ``test`` put in ``status`` (set directly: the test's starting
    point); its id and tenant id."""
    job_id = str(uuid.uuid4())
    with sm() as s:
        tenant = tenants.ensure_tenant(s, "test")
        repository.create_job(s, job_id, "finetune", {}, tenant_id=tenant.id)
        s.execute(update(Job).where(Job.id == job_id).values(status=status))
        s.commit()
    return job_id, tenant.id


def _status(sm: sessionmaker[Session], job_id: str) -> str | None:
    with sm() as s:
        return s.scalar(select(Job.status).where(Job.id == job_id))


def test_every_listed_transition_changes_the_row_and_no_other_does(
    sm: sessionmaker[Session],
) -> None:
    for source, target in itertools.product(JobStatus, JobStatus):
        job_id, _ = _job(sm, source)
        with sm() as s:
            if target in TRANSITIONS[source]:
                assert repository.transition(s, job_id, (source,), target), (source, target)
                s.commit()
                assert _status(sm, job_id) == target
            else:
                with pytest.raises(IllegalTransition):
                    repository.transition(s, job_id, (source,), target)
                s.rollback()
                assert _status(sm, job_id) == source, (source, target)


def test_a_legal_transition_from_another_status_changes_nothing(
    sm: sessionmaker[Session],
) -> None:
    job_id, _ = _job(sm, S.SUCCEEDED)
    with sm() as s:  # queued -> running is legal, but the job is not queued: the race is lost
        assert not repository.transition(s, job_id, (S.QUEUED,), S.RUNNING)
        assert not repository.claim(s, job_id, "w1")
        s.commit()
    assert _status(sm, job_id) == S.SUCCEEDED


def test_a_job_is_created_only_queued_or_waiting(sm: sessionmaker[Session]) -> None:
    with sm() as s:
        tenant = tenants.ensure_tenant(s, "test")
        with pytest.raises(ValueError, match="starts queued or waiting"):
            repository.create_job(
                s, str(uuid.uuid4()), "finetune", {}, tenant_id=tenant.id, status=S.RUNNING
            )
        waiting = repository.create_job(
            s, str(uuid.uuid4()), "finetune", {}, tenant_id=tenant.id, status=S.WAITING
        )
        s.commit()
    assert _status(sm, waiting.id) == S.WAITING


@pytest.mark.parametrize("finished", [S.SUCCEEDED, S.FAILED, S.CANCELLED])
def test_a_finished_job_never_runs_again(
    settings: Settings, sm: sessionmaker[Session], finished: JobStatus
) -> None:
    job_id, tenant_id = _job(sm, finished)
    old = utcnow() - timedelta(hours=1)
    with sm() as s:  # stale, as if its worker had died: the reconciler must leave it alone
        s.execute(update(Job).where(Job.id == job_id).values(heartbeat_at=old, updated_at=old))
        s.commit()

    # the task delivered again (a broker redelivery): the worker's claim refuses it
    assert runner.execute(job_id, settings) == "skipped"
    # the API: resume and pause answer 409, cancel 409 naming the finished status
    with sm() as s:
        with pytest.raises(Conflict, match="only a paused job can be resumed"):
            service.resume(s, None, settings, job_id, tenant_id=tenant_id)  # type: ignore[arg-type]
        with pytest.raises(Conflict, match="only a queued or running job can be paused"):
            service.pause(s, job_id, tenant_id=tenant_id)
        with pytest.raises(Conflict, match="nothing to cancel"):
            service.cancel(s, job_id, tenant_id=tenant_id)
    report = reconcile_once(settings.model_copy(update={"heartbeat_timeout_s": 1.0}))
    assert job_id not in report.retried + report.failed + report.cancelled + report.paused

    assert _status(sm, job_id) == finished
    # and asking for it in code is a bug the table names
    with sm() as s, pytest.raises(IllegalTransition, match=f"from {finished} to running"):
        repository.transition(s, job_id, (finished,), S.RUNNING)
