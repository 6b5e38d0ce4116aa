"""The liveness signal of a running job: a daemon thread that writes ``jobs.heartbeat_at``
every ``heartbeat_interval_s`` seconds while the job runs, whatever training is doing (a long
evaluation, an export, a data load is not a dead worker). Progress reports still go through
the trainer's ``on_progress`` hook; this thread only says "this worker is alive"."""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from core.db import Job, utcnow
from core.db_errors import public_message
from core.job_status import LIVE

log = logging.getLogger("distillery.worker")

LIVE_STATUSES = LIVE
"""Statuses of a job a worker is executing (its heartbeat is kept fresh)."""


def touch(session: Session, job_id: str, attempt: int) -> bool:
    """Set ``heartbeat_at = now`` on job ``job_id`` if it is still executing attempt
    ``attempt`` (status in :data:`LIVE_STATUSES`). Returns False when the job is no longer
    this attempt's (finished, re-queued by the reconciler, deleted). Not committed."""
    res = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(LIVE_STATUSES), Job.attempt == attempt)
        .values(heartbeat_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return bool(res.rowcount)  # type: ignore[attr-defined]


class Heartbeat:
    """A context manager running :func:`touch` every ``interval_s`` seconds in a daemon
    thread, from entry until exit.

    ``lost`` becomes True when a touch finds the job no longer this attempt's (the
    reconciler re-queued it after a stall, or it was deleted): the runner then stops without
    finalising it. A database error is logged and retried at the next tick.
    """

    def __init__(
        self, sessions: sessionmaker[Session], job_id: str, attempt: int, interval_s: float
    ) -> None:
        self.sessions = sessions
        self.job_id = job_id
        self.attempt = attempt
        self.interval_s = interval_s
        self.beats = 0
        self.lost = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job_id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with self.sessions() as s:
                    alive = touch(s, self.job_id, self.attempt)
                    s.commit()
            except Exception as e:  # the database may come back; the reconciler decides
                log.warning("job %s: heartbeat failed (%s)", self.job_id, public_message(e))
                continue
            self.beats += 1
            if not alive:
                self.lost = True
                return

    def start(self) -> None:
        """Start the thread (the first touch is ``interval_s`` seconds from now)."""
        self._thread.start()

    def __enter__(self) -> Heartbeat:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def stop(self) -> None:
        """Stop the thread (waits for a touch in progress to end)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=max(5.0, self.interval_s))
