"""Job dependencies: a job naming ``job:<id>`` of an unfinished job (its teacher, its
pretrained student's ``student.model`` or ``method.generator``) waits for it.

At submit (:func:`check_references`) every ``job:`` reference must be a job of the same tenant
that has succeeded or is still :data:`core.job_status.PENDING_DEPENDENCY` (waiting, queued, running,
pausing, paused); the new job is then stored ``waiting``, with one ``job_dependencies`` row per
unfinished job, and not sent to the broker. :func:`release_waiting` moves waiting jobs on:

* every dependency succeeded: the checks that need its model (the teacher's labels against the
  dataset, the method's fit, the memory budget: :func:`core.validation.validate_references`) run
  now; the job goes ``waiting -> queued`` (a ``queued`` event "dependency <id> succeeded") and
  is enqueued, or ``waiting -> failed`` naming the field and the reason;
* a dependency failed, was cancelled or deleted: ``waiting -> failed`` naming it and its status.

It is called by the worker after a job reaches a final state, by the API after a cancel and
after a submit that stored a waiting job, and by the periodic reconciler (a pass over every
waiting job). Cycles cannot arise: a dependency exists before the job that names it.
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session

from core import events, repository, validation
from core.db import Job as JobRow
from core.db import JobDependency, utcnow
from core.job_status import PENDING_DEPENDENCY, JobStatus
from core.queue import BrokerUnavailable, enqueue
from core.settings import Settings
from kd_engine.errors import SpecError
from kd_engine.spec import JobSpec, PretrainedStudent, stored_spec

log = logging.getLogger("distillery.api")


def job_references(spec: JobSpec) -> list[tuple[str, str]]:
    """The ``job:<id>`` model references of ``spec`` as (field, job id) pairs: ``teacher``,
    ``student.model`` (a pretrained student) and ``method.generator``, in that order."""
    refs: list[tuple[str, object]] = [("teacher", spec.teacher)]
    if isinstance(spec.student, PretrainedStudent):
        refs.append(("student.model", spec.student.model))
    refs.append(("method.generator", getattr(spec.method, "generator", None)))
    return [
        (field, ref.removeprefix("job:"))
        for field, ref in refs
        if isinstance(ref, str) and ref.startswith("job:")
    ]


def check_references(session: Session, spec: JobSpec, tenant_id: str) -> list[str]:
    """The ids of the unfinished jobs ``spec`` names as ``job:<id>`` (those it must wait for),
    without repeats, in field order; [] when every job it names has succeeded.

    Raises:
        SpecError: naming the field, for a job that does not exist or is another tenant's
            (``no such job``) or that is cancelling, failed or cancelled (its status).
    """
    pending: list[str] = []
    for field, job_id in job_references(spec):
        other = repository.get_tenant_job(session, job_id, tenant_id=tenant_id)
        if other is None:
            raise SpecError(field, f"'job:{job_id}': no such job")
        if other.status in PENDING_DEPENDENCY:
            if job_id not in pending:
                pending.append(job_id)
        elif other.status != JobStatus.SUCCEEDED:
            raise SpecError(
                field,
                f"'job:{job_id}' is {other.status}; a model reference needs a succeeded job "
                "(or one still waiting, queued, running or paused, which this job then waits "
                "for)",
            )
    return pending


def add_dependencies(session: Session, job_id: str, depends_on: list[str]) -> None:
    """Store that job ``job_id`` waits for ``depends_on`` (not committed)."""
    session.add_all(JobDependency(job_id=job_id, depends_on=d) for d in depends_on)
    session.flush()


def depends_on(session: Session, job_id: str) -> list[str]:
    """The ids of the jobs job ``job_id`` waits (or waited) for, sorted."""
    q = select(JobDependency.depends_on).where(JobDependency.job_id == job_id)
    return sorted(session.scalars(q))


def dependents(session: Session, job_id: str) -> list[str]:
    """The ids of the waiting jobs that wait for job ``job_id``."""
    q = (
        select(JobDependency.job_id)
        .join(JobRow, JobRow.id == JobDependency.job_id)
        .where(JobDependency.depends_on == job_id, JobRow.status == JobStatus.WAITING)
        .order_by(JobRow.created_at)
    )
    return list(session.scalars(q))


def _fail(session: Session, job_id: str, reason: str, data: dict[str, object]) -> bool:
    if not repository.transition(
        session,
        job_id,
        (JobStatus.WAITING,),
        JobStatus.FAILED,
        error=reason,
        finished_at=utcnow(),
    ):
        session.rollback()
        return False
    events.record(session, job_id, "failed", reason, level="error", data=data)
    session.commit()
    log.info("job %s: failed while waiting: %s", job_id, reason)
    return True


def _release(
    session: Session,
    settings: Settings,
    celery: Celery,
    job_id: str,
    tenant_id: str,
    spec_data: dict[str, object],
    deps: list[str],
    queue: str,
) -> bool:
    # The job's own queue (not this process's): its memory budget and where it is sent.
    settings = settings.model_copy(update={"queue": queue})
    try:
        spec = stored_spec(spec_data)
        validation.validate_references(session, spec, settings, tenant_id)
    except SpecError as e:
        session.rollback()
        return _fail(
            session,
            job_id,
            f"its dependencies succeeded but the job cannot run: {e}",
            {"depends_on": deps, "field": e.field},
        )
    if not repository.transition(session, job_id, (JobStatus.WAITING,), JobStatus.QUEUED):
        session.rollback()
        return False
    names = ", ".join(deps)
    events.record(
        session,
        job_id,
        "queued",
        f"dependency {names} succeeded; job queued",
        data={"depends_on": deps, "method": spec.method.name},
    )
    session.commit()
    try:
        enqueue(celery, job_id, settings.queue)
    except BrokerUnavailable as e:
        reason = f"the job could not be queued (broker unavailable: {e}); submit it again"
        if repository.transition(
            session,
            job_id,
            (JobStatus.QUEUED,),
            JobStatus.FAILED,
            error=reason,
            finished_at=utcnow(),
        ):
            events.record(session, job_id, "failed", reason, level="error")
        session.commit()
        log.warning("job %s: released but not queued: %s", job_id, e)
        return True
    log.info("job %s: dependencies %s succeeded; queued", job_id, names)
    return True


def _pass(
    session: Session, settings: Settings, celery: Celery, only: Collection[str] | None
) -> list[str]:
    q = select(JobRow.id, JobRow.tenant_id, JobRow.spec, JobRow.queue).where(
        JobRow.status == JobStatus.WAITING
    )
    if only is not None:
        q = q.where(JobRow.id.in_(list(only)))
    waiting = session.execute(q.order_by(JobRow.created_at, JobRow.id)).all()
    if not waiting:
        session.rollback()
        return []
    ids = [row.id for row in waiting]
    links = session.execute(
        select(JobDependency.job_id, JobDependency.depends_on).where(JobDependency.job_id.in_(ids))
    ).all()
    dep_ids = {link.depends_on for link in links}
    statuses = {
        row.id: row.status
        for row in session.execute(select(JobRow.id, JobRow.status).where(JobRow.id.in_(dep_ids)))
    }
    session.rollback()  # end the read; each job's change is its own transaction
    changed: list[str] = []
    for row in waiting:
        deps = sorted(link.depends_on for link in links if link.job_id == row.id)
        gone = [(d, statuses.get(d, "deleted")) for d in deps]
        bad = [(d, s) for d, s in gone if s in (JobStatus.FAILED, JobStatus.CANCELLED, "deleted")]
        if bad:
            dep, status = bad[0]
            reason = (
                f"dependency job:{dep} {status} (no model to use); submit this job again "
                "naming a job that succeeded"
            )
            if _fail(session, row.id, reason, {"dependency": dep, "dependency_status": status}):
                changed.append(row.id)
        elif all(s == JobStatus.SUCCEEDED for _, s in gone) and _release(
            session, settings, celery, row.id, row.tenant_id, row.spec, deps, row.queue
        ):
            changed.append(row.id)
    return changed


def release_waiting(
    session: Session,
    settings: Settings,
    celery: Celery,
    *,
    only: Collection[str] | None = None,
) -> list[str]:
    """Move waiting jobs whose dependencies have finished: queued (and enqueued on the job's
    own ``queue``, whose memory budget the deferred checks use) when all succeeded and the
    deferred checks pass, else failed with the reason (the dependency and its status, or the
    field a check refused). Each job's change is committed with its event on its own; the
    session is left with no transaction open.

    Args:
        session: a session with no pending changes (it is committed and rolled back here).
        settings: the roots and budgets the deferred checks read (its ``queue`` is
            replaced by each job's).
        celery: the app that sends the task (:func:`core.queue.enqueue`).
        only: consider just these waiting jobs (e.g. :func:`dependents` of a job that has
            just finished); None: every waiting job (the reconciler's pass). Jobs that waited
            for a job failed here are then considered too (a failure cascades down a chain).

    Returns:
        The ids of the jobs that changed status (queued, or failed), in the order they did.
        A job still waiting for an unfinished dependency is left as it is.
    """
    changed: list[str] = []
    todo: Collection[str] | None = only
    while todo is None or todo:
        step = _pass(session, settings, celery, todo)
        changed += step
        failed = [j for j in step if _status(session, j) == JobStatus.FAILED]
        todo = sorted({d for j in failed for d in dependents(session, j)})
        session.rollback()
    return changed


def _status(session: Session, job_id: str) -> str | None:
    return session.scalar(select(JobRow.status).where(JobRow.id == job_id))


def release_after(session: Session, settings: Settings, celery: Celery, job_id: str) -> list[str]:
    """:func:`release_waiting` for the jobs waiting on ``job_id`` (call it once ``job_id`` has
    reached a final state; a no-op while nothing waits for it). Returns what that returns."""
    waiting = dependents(session, job_id)
    session.rollback()
    if not waiting:
        return []
    return release_waiting(session, settings, celery, only=waiting)
