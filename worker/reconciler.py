"""The reconciler: makes the database (the truth about jobs) and the broker agree, so that no
job depends on its worker surviving, on the broker keeping its messages, or on someone
reading it.

One pass (:func:`reconcile_once`) runs the functions of :data:`PASSES` in order:

* :func:`recover_lost_workers`: a running, cancelling or pausing job whose heartbeat is
  older than ``heartbeat_timeout_s`` has lost its worker. Running with attempts left (fewer
  than ``max_attempts``): back to ``queued`` (``attempt`` kept; the next claim increments it)
  with a ``retried`` event naming the step it had reached (its progress, or its newest
  checkpoint's step when it was lost outside training: testing, exporting, publishing) and
  that checkpoint, and sent again. Running with none left: ``failed``, the reason
  listing the attempts. Cancelling: ``cancelled``. Pausing: ``paused``.
* :func:`resend_lost_messages`: a job queued for more than ``requeue_grace_s`` whose message
  the broker does not hold (neither waiting in its queue's lists nor delivered and
  unacknowledged in the ``unacked`` hash of kombu's Redis transport, delivered less than the
  grace ago) is sent again. A duplicate delivery is harmless: only one claim of a queued job
  succeeds (:func:`core.repository.claim`).
* :func:`release_waiting_jobs`: ``waiting`` jobs whose dependencies have finished move on.
* :func:`sweep_uploads`: uploads that died (:func:`core.upload_liveness.sweep`).
* :func:`sweep_dead_staging`: the local staging folders of attempts that are no longer alive
  (a killed worker's output and checkpoints, :mod:`worker.staging`) are removed.

Every send goes to the job's own queue (``jobs.queue``, the submitting API's
``DISTILLERY_QUEUE``), never to this worker's: a pass of a ``cpu`` worker leaves a ``gpu`` job
in the ``gpu`` queue, and sends it there again if its message was lost.

A further pass (for example ``release_waiting`` for jobs waiting on dependencies) is a
function ``(ctx: PassContext) -> None`` appended to :data:`PASSES`.

Every worker's main process runs a pass every ``reconcile_interval_s`` seconds
(:func:`start_thread`, started on ``worker_ready``); a Redis lock on the broker makes one
pass run at a time across workers. Operators: ``python -m worker.reconciler [--once]``.
Jobs that failed for a reason of their own are ``failed`` already and never touched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import redis
from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core import checkpoints, dependencies, events, repository, upload_liveness
from core.db import Job, JobEvent, make_engine, make_sessionmaker, utcnow
from core.db_errors import public_message
from core.job_status import LIVE, JobStatus
from core.queue import BrokerUnavailable, broker_lists, enqueue, make_celery
from core.settings import Settings, get_settings
from worker import staging

log = logging.getLogger("distillery.reconciler")

LOCK_NAME = "distillery:reconciler:lock"
"""The Redis key (on the broker's database) of the one-pass-at-a-time lock."""

UNACKED_KEY = "unacked"
UNACKED_INDEX_KEY = "unacked_index"
"""kombu's Redis transport: hash delivery tag -> [message, exchange, routing key] of the
messages delivered and not yet acknowledged, and a sorted set of their delivery times."""


@dataclass
class ReconcileReport:
    """What a pass did (job ids). ``acquired`` is False when another pass held the lock (then
    nothing was done); ``errors`` lists what could not be done (broker or database down)."""

    acquired: bool = True
    retried: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)
    paused: list[str] = field(default_factory=list)
    resent: list[str] = field(default_factory=list)
    released: list[str] = field(default_factory=list)
    swept_uploads: list[str] = field(default_factory=list)
    swept: list[str] = field(default_factory=list)  # staging folders (names), not job ids
    errors: list[str] = field(default_factory=list)

    def acted(self) -> bool:
        """Whether the pass changed anything."""
        return bool(
            self.retried
            or self.failed
            or self.cancelled
            or self.paused
            or self.resent
            or self.released
            or self.swept_uploads
            or self.swept
        )


@dataclass
class PassContext:
    """What a pass needs: the settings, a session factory on the jobs database, the Celery
    app to send with, a client of the broker's Redis database, and the report to fill."""

    settings: Settings
    sessions: sessionmaker[Session]
    celery: Celery
    broker: redis.Redis
    report: ReconcileReport

    def send(self, job_id: str, queue: str) -> bool:
        """Send job ``job_id`` to its ``queue``; False (and an error noted) if the broker
        failed: the job stays queued and a later pass sends it."""
        try:
            timeout = self.settings.broker_publish_timeout_s
            enqueue(self.celery, job_id, queue, timeout)
        except BrokerUnavailable as e:
            self.report.errors.append(f"job {job_id}: not sent ({e})")
            return False
        return True


def _attempts(session: Session, job_id: str) -> list[str]:
    """'attempt k on <worker>' for each ``started`` event of the job, oldest first."""
    rows = session.scalars(
        select(JobEvent)
        .where(JobEvent.job_id == job_id, JobEvent.type == "started")
        .order_by(JobEvent.id)
    )
    out = []
    for e in rows:
        data: dict[str, Any] = e.data or {}
        out.append(f"attempt {data.get('attempt', '?')} on {data.get('worker', '?')}")
    return out


def recover_lost_workers(ctx: PassContext) -> None:
    """Re-queue, fail, cancel or pause the jobs whose heartbeat is older than
    ``heartbeat_timeout_s`` (see the module docstring). Each change and its event are one
    transaction; a re-queued job is sent after its commit."""
    settings = ctx.settings
    timeout = settings.heartbeat_timeout_s
    limit = utcnow() - timedelta(seconds=timeout)
    last_seen = func.coalesce(Job.heartbeat_at, Job.updated_at)
    with ctx.sessions() as s:
        stale = list(
            s.execute(
                select(Job.id, Job.status, Job.attempt, Job.progress, Job.queue).where(
                    Job.status.in_(LIVE), last_seen < limit
                )
            )
        )
    for job_id, status, attempt, progress, queue in stale:
        step = (progress or {}).get("step", 0)
        with ctx.sessions() as s:
            if status == JobStatus.CANCELLING:
                if repository.transition(
                    s, job_id, (JobStatus.CANCELLING,), JobStatus.CANCELLED, finished_at=utcnow()
                ):
                    events.record(
                        s, job_id, "cancelled", "the worker was lost while cancelling; cancelled"
                    )
                    ctx.report.cancelled.append(job_id)
            elif status == JobStatus.PAUSING:
                if repository.transition(
                    s, job_id, (JobStatus.PAUSING,), JobStatus.PAUSED, worker=None
                ):
                    events.record(
                        s, job_id, "paused", f"the worker was lost while pausing at step {step}"
                    )
                    ctx.report.paused.append(job_id)
            elif attempt < settings.max_attempts:
                newest = checkpoints.newest(s, job_id)
                if not step and newest is not None:  # lost outside training (test, publish)
                    step = newest.step
                saved = (
                    f" (newest checkpoint {newest.name} at step {newest.step})"
                    if newest is not None
                    else ""
                )
                if repository.transition(
                    s,
                    job_id,
                    (JobStatus.RUNNING,),
                    JobStatus.QUEUED,
                    worker=None,
                    heartbeat_at=None,
                ):
                    events.record(
                        s,
                        job_id,
                        "retried",
                        f"worker lost at step {step}{saved}; attempt {attempt + 1} of "
                        f"{settings.max_attempts}",
                        level="warning",
                        data={
                            "lost_attempt": attempt,
                            "next_attempt": attempt + 1,
                            "max_attempts": settings.max_attempts,
                            "step": step,
                            "checkpoint": newest.name if newest is not None else None,
                            "checkpoint_step": newest.step if newest is not None else None,
                        },
                    )
                    ctx.report.retried.append(job_id)
            else:
                tried = _attempts(s, job_id) or [f"{attempt} attempt(s)"]
                reason = (
                    f"the worker was lost on every attempt ({attempt} of "
                    f"{settings.max_attempts}: {', '.join(tried)}; no heartbeat for "
                    f"{timeout:g} s each time); submit the job again"
                )
                if repository.transition(
                    s,
                    job_id,
                    (JobStatus.RUNNING,),
                    JobStatus.FAILED,
                    finished_at=utcnow(),
                    error=reason,
                ):
                    events.record(s, job_id, "failed", reason, level="error")
                    ctx.report.failed.append(job_id)
            s.commit()
        if job_id in ctx.report.retried:
            ctx.send(job_id, queue)


def held_job_ids(broker: redis.Redis, queue: str, delivered_after: float) -> set[str]:
    """Task ids (= job ids) of the messages the broker holds for ``queue``: waiting in its
    lists (every priority), or delivered and unacknowledged since ``delivered_after`` (a Unix
    time; an older delivery whose job is still queued was lost with its consumer)."""
    held: set[str] = set()
    lists = broker_lists(queue)
    for name in lists:
        for raw in broker.lrange(name, 0, -1):
            try:
                held.add(str(json.loads(raw)["headers"]["id"]))
            except (ValueError, KeyError, TypeError):
                continue
    recent = {
        t.decode() if isinstance(t, bytes) else str(t)
        for t in broker.zrangebyscore(UNACKED_INDEX_KEY, delivered_after, "+inf")
    }
    for tag, raw in broker.hscan_iter(UNACKED_KEY):
        tag_s = tag.decode() if isinstance(tag, bytes) else str(tag)
        if tag_s not in recent:
            continue
        try:
            message = json.loads(raw)[0]
            held.add(str(message["headers"]["id"]))
        except (ValueError, KeyError, TypeError, IndexError):
            continue
    return held


def resend_lost_messages(ctx: PassContext) -> None:
    """Send again, each to its own queue, the jobs queued for more than ``requeue_grace_s``
    that the broker does not hold in that queue (:func:`held_job_ids`): lost with a flushed or
    restarted broker, or with a consumer that died before claiming them. A job held in its
    queue is left alone, whichever queues the workers running this pass consume."""
    grace = ctx.settings.requeue_grace_s
    limit = utcnow() - timedelta(seconds=grace)
    with ctx.sessions() as s:
        queued = list(
            s.execute(
                select(Job.id, Job.queue)
                .where(Job.status == JobStatus.QUEUED, Job.updated_at < limit)
                .order_by(Job.created_at)
            )
        )
    held: dict[str, set[str]] = {}
    for job_id, queue in queued:
        if queue not in held:
            held[queue] = held_job_ids(ctx.broker, queue, time.time() - grace)
        if job_id not in held[queue] and ctx.send(job_id, queue):
            ctx.report.resent.append(job_id)


def release_waiting_jobs(ctx: PassContext) -> None:
    """Move on the ``waiting`` jobs whose dependencies have finished
    (:func:`core.dependencies.release_waiting`: queued and sent when they all succeeded, failed
    naming the one that did not). The worker releases them when a job ends; this pass covers a
    worker lost in between, a job failed by the reconciler, and a broker that was down."""
    with ctx.sessions() as s:
        ctx.report.released.extend(dependencies.release_waiting(s, ctx.settings, ctx.celery))


def sweep_uploads(ctx: PassContext) -> None:
    """Remove the uploads whose API process died (``uploading`` rows without a heartbeat for
    ``upload_stale_s``) with their files, and stored files without a row
    (:func:`core.upload_liveness.sweep`)."""
    swept = upload_liveness.sweep(ctx.settings, ctx.sessions)
    ctx.report.swept_uploads.extend(swept.stale + swept.orphans)


def sweep_dead_staging(ctx: PassContext) -> None:
    """Remove the staging folders of attempts that are no longer alive
    (:func:`worker.staging.sweep`): a killed worker's output, checkpoints and resume copies."""
    ctx.report.swept.extend(staging.sweep(ctx.settings, ctx.sessions).removed)


PASSES: list[Callable[[PassContext], None]] = [
    recover_lost_workers,
    resend_lost_messages,
    release_waiting_jobs,
    sweep_uploads,
    sweep_dead_staging,
]
"""The passes of :func:`reconcile_once`, in order. Append a pass (e.g. ``release_waiting``)
here; each gets the :class:`PassContext` and records what it did in ``ctx.report``."""


def _lock_ttl_s(settings: Settings) -> float:
    return max(30.0, 2 * settings.reconcile_interval_s)


_SESSIONS: dict[str, sessionmaker[Session]] = {}
_SESSIONS_LOCK = threading.Lock()


def _sessions(database_url: str) -> sessionmaker[Session]:
    """The reconciler's own pool (not the task code's: a prefork child must never inherit
    connections the main process uses)."""
    with _SESSIONS_LOCK:
        if database_url not in _SESSIONS:
            _SESSIONS[database_url] = make_sessionmaker(make_engine(database_url))
        return _SESSIONS[database_url]


def _forget_pools_in_child() -> None:
    """After a fork (a prefork pool child): drop the parent's pools without closing their
    connections, which the parent still uses."""
    global _SESSIONS_LOCK
    _SESSIONS_LOCK = threading.Lock()
    for sm in _SESSIONS.values():
        bind = sm.kw.get("bind")
        if bind is not None:
            bind.dispose(close=False)
    _SESSIONS.clear()


os.register_at_fork(after_in_child=_forget_pools_in_child)


def reconcile_once(
    settings: Settings, celery: Celery | None = None, broker: redis.Redis | None = None
) -> ReconcileReport:
    """Run every pass of :data:`PASSES` once, if no other pass holds the lock (a Redis key
    set with NX and a TTL on the broker's database, released with its token).

    ``celery`` (default: a new app for ``settings``) sends the jobs, ``broker`` (default: a
    client of ``settings.broker_url`` with socket timeouts of ``broker_publish_timeout_s``)
    is read for the messages it holds. Never raises for a broker or database fault: the
    error is in the report and the next pass tries again.
    """
    report = ReconcileReport()
    own_broker = broker is None
    if broker is None:
        broker = redis.Redis.from_url(
            settings.broker_url,
            socket_timeout=settings.broker_publish_timeout_s,
            socket_connect_timeout=settings.broker_publish_timeout_s,
        )
    token = uuid.uuid4().hex
    try:
        try:
            got = broker.set(LOCK_NAME, token, nx=True, px=int(_lock_ttl_s(settings) * 1000))
        except redis.RedisError as e:
            report.acquired = False
            report.errors.append(f"the broker is unavailable: {e}")
            return report
        if not got:
            report.acquired = False
            return report
        ctx = PassContext(
            settings=settings,
            sessions=_sessions(settings.database_url),
            celery=celery or make_celery(settings),
            broker=broker,
            report=report,
        )
        try:
            for step in PASSES:
                try:
                    step(ctx)
                except Exception as e:  # one pass failing must not stop the others
                    log.warning("reconciler pass %s failed", step.__name__, exc_info=True)
                    report.errors.append(f"{step.__name__}: {public_message(e)}")
        finally:
            # Release only our own lock (it may have expired and been taken since); on a
            # broker error it expires by itself.
            with contextlib.suppress(redis.RedisError):
                broker.eval(
                    "if redis.call('get', KEYS[1]) == ARGV[1] then "
                    "return redis.call('del', KEYS[1]) else return 0 end",
                    1,
                    LOCK_NAME,
                    token,
                )
    finally:
        if own_broker:
            broker.close()
    if report.acted() or report.errors:
        log.warning("reconciler: %s", report)
    return report


def run_forever(settings: Settings, stop: threading.Event | None = None) -> None:
    """Run :func:`reconcile_once` every ``reconcile_interval_s`` seconds until ``stop`` is
    set (never, without one)."""
    stop = stop or threading.Event()
    celery = make_celery(settings)
    while True:
        try:
            reconcile_once(settings, celery)
        except Exception:  # never let the timer die
            log.exception("reconciler pass failed")
        if stop.wait(settings.reconcile_interval_s):
            return


def start_thread(settings: Settings) -> threading.Thread:
    """Start :func:`run_forever` in a daemon thread (the worker's main process calls it on
    ``worker_ready``) and return it."""
    thread = threading.Thread(
        target=run_forever, args=(settings,), name="distillery-reconciler", daemon=True
    )
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> None:
    """``python -m worker.reconciler [--once]``: one pass (printing its report as JSON), or
    a pass every ``DISTILLERY_RECONCILE_INTERVAL_S`` seconds until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m worker.reconciler", description=__doc__)
    parser.add_argument("--once", action="store_true", help="run one pass and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    settings = get_settings()
    if args.once:
        report = reconcile_once(settings)
        print(json.dumps(report.__dict__, indent=2))
        return
    run_forever(settings)


if __name__ == "__main__":
    main()
