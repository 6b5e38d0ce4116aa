"""A job's status and the one table of which status may follow which.

Self-contained (the standard library only): the database models, the repository's
:func:`~core.repository.transition`, the API's schemas and the worker all take the status from
here. The values are the strings stored in ``jobs.status`` and shown by the HTTP API.

Every status change goes through :func:`check_transition` (the repository's ``transition``
calls it before its conditional UPDATE), so a change the table does not allow is a
:class:`IllegalTransition` raised in the code that asked for it, never a row in a state the
lifecycle does not know.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum


class JobStatus(StrEnum):
    """The status of a job (a ``str``: ``JobStatus.QUEUED == "queued"``).

    ``waiting``: for a job it depends on (``job:<id>`` teacher, student or generator) to
    succeed; ``queued``: sent to the broker, not claimed yet; ``running``: claimed by a worker;
    ``pausing``: asked to pause, its worker checkpoints and stops; ``paused``: holds no worker
    until resumed; ``cancelling``: asked to cancel, its worker stops within a few steps;
    ``succeeded``, ``failed``, ``cancelled``: finished (:data:`FINISHED`).
    """

    WAITING = "waiting"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSING = "pausing"
    PAUSED = "paused"
    CANCELLING = "cancelling"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


S = JobStatus

JOB_STATUSES: tuple[JobStatus, ...] = tuple(JobStatus)
"""Every job status, in lifecycle order."""

INITIAL: frozenset[JobStatus] = frozenset({S.QUEUED, S.WAITING})
"""The statuses a job is created in: ``waiting`` when it names an unfinished job, else
``queued``."""

TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    # released when its dependencies succeed; failed when one did not (or a deferred check
    # refuses the spec); cancelled by request
    S.WAITING: frozenset({S.QUEUED, S.FAILED, S.CANCELLED}),
    # claimed by a worker; paused or cancelled by request; failed when the broker does not
    # take it
    S.QUEUED: frozenset({S.RUNNING, S.PAUSED, S.CANCELLED, S.FAILED}),
    # pause or cancel requested; finished by its worker; re-queued by the reconciler when its
    # worker is lost (another attempt), failed once the attempts are spent
    S.RUNNING: frozenset({S.PAUSING, S.CANCELLING, S.SUCCEEDED, S.FAILED, S.CANCELLED, S.QUEUED}),
    # its worker checkpointed and stopped (or was lost); a cancel while pausing; the worker
    # finished before it reached the pause check
    S.PAUSING: frozenset({S.PAUSED, S.CANCELLING, S.SUCCEEDED, S.FAILED, S.CANCELLED}),
    # resumed (queued again), cancelled
    S.PAUSED: frozenset({S.QUEUED, S.CANCELLED}),
    # its worker stopped (or was lost); a worker that was publishing when the cancel came
    # still finishes, as succeeded or failed
    S.CANCELLING: frozenset({S.CANCELLED, S.SUCCEEDED, S.FAILED}),
    S.SUCCEEDED: frozenset(),
    # only a job the broker never took (it never ran): queued again by a retry of its submit
    # with the same Idempotency-Key
    S.FAILED: frozenset({S.QUEUED}),
    S.CANCELLED: frozenset(),
}
"""Status -> the statuses that may follow it. Nothing ever goes back to ``running`` but
through ``queued`` and a worker's claim; ``succeeded`` and ``cancelled`` are final."""

FINISHED: tuple[JobStatus, ...] = (S.SUCCEEDED, S.FAILED, S.CANCELLED)
"""The statuses of a finished job (its ``finished_at`` is set; it can be deleted)."""

LIVE: tuple[JobStatus, ...] = (S.RUNNING, S.PAUSING, S.CANCELLING)
"""The statuses of a job a worker holds (it sends heartbeats and progress)."""

PENDING_DEPENDENCY: tuple[JobStatus, ...] = (S.WAITING, S.QUEUED, S.RUNNING, S.PAUSING, S.PAUSED)
"""Statuses of a job that another job may name as ``job:<id>`` before it has finished (the new
job then waits for it); ``cancelling``, ``failed`` and ``cancelled`` jobs are refused."""


class IllegalTransition(ValueError):
    """A status change the table (:data:`TRANSITIONS`) does not allow: a bug in the code that
    asked for it, never a user's error. ``source`` and ``target`` are the two statuses."""

    def __init__(self, source: str, target: str) -> None:
        allowed = ", ".join(sorted(TRANSITIONS.get(JobStatus(source), ()))) or "nothing"
        super().__init__(f"a job cannot go from {source} to {target} (after {source}: {allowed})")
        self.source = source
        self.target = target


def can_follow(source: str, target: str) -> bool:
    """Whether status ``target`` may follow ``source`` (both statuses or their values).

    Raises:
        ValueError: either is not a job status.
    """
    return JobStatus(target) in TRANSITIONS[JobStatus(source)]


def check_transition(sources: Iterable[str], target: str) -> tuple[JobStatus, ...]:
    """``sources`` as statuses, once each checked that ``target`` may follow it.

    Raises:
        IllegalTransition: ``target`` may not follow one of ``sources``.
        ValueError: a value that is not a job status, or no source at all.
    """
    checked = tuple(dict.fromkeys(JobStatus(s) for s in sources))
    if not checked:
        raise ValueError(f"a transition to {target} needs at least one status to come from")
    for source in checked:
        if not can_follow(source, target):
            raise IllegalTransition(source, target)
    return checked


def sources_of(target: str, among: Iterable[str] = tuple(JobStatus)) -> tuple[JobStatus, ...]:
    """The statuses of ``among`` that ``target`` may follow, in ``among``'s order (e.g. the
    live statuses a worker may finish a job from as ``failed``)."""
    return tuple(JobStatus(s) for s in among if can_follow(s, target))
