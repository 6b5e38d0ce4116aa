"""The worker's database work, retried through transient errors (:func:`core.db_errors.
is_transient`: a dropped or terminated connection, a restarting database, one refusing
connections) with exponential backoff and jitter (tenacity), up to a deadline.

Each retried function is one whole unit of work (open a session, change rows, commit): a
retry runs it again on a fresh session, and the engine's ``pool_pre_ping`` and SQLAlchemy's
invalidation of a lost connection make the pool hand out a new connection. Past the deadline
:class:`DatabaseUnavailable` is raised: the runner then stops the job's attempt without a
verdict (the job stays ``running``; its heartbeat goes stale and the reconciler re-queues it,
to resume from its newest checkpoint).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception,
    stop_before_delay,
    wait_exponential_jitter,
)

from core.db_errors import is_transient, public_message
from core.settings import Settings

log = logging.getLogger("distillery.worker")

T = TypeVar("T")

FIRST_WAIT_S = 0.1
"""The wait (seconds) before the first retry; doubled for each further one (plus up to
:data:`JITTER_S` of jitter), at most :data:`MAX_WAIT_S`."""
MAX_WAIT_S = 5.0
JITTER_S = 0.2


class DatabaseUnavailable(Exception):
    """The database stayed unreachable past the retry deadline.

    Attributes:
        what: the unit of work that failed (``progress``, ``event``, ``claim``...).
        seconds: how long it was retried.
        attempts: how many times it ran.
        reason: the last error, without SQL (:func:`core.db_errors.public_message`).
    """

    def __init__(self, what: str, seconds: float, attempts: int, reason: str) -> None:
        super().__init__(
            f"the database was unavailable for {seconds:.1f} s ({attempts} tries of {what}; "
            f"last error {reason})"
        )
        self.what = what
        self.seconds = seconds
        self.attempts = attempts
        self.reason = reason


@dataclass(frozen=True)
class Recovery:
    """A unit of work that succeeded after retries: what, after how many tries (>= 2), how
    long after its first try (seconds), and the first error (without SQL)."""

    what: str
    attempts: int
    seconds: float
    error: str


def _log_retry(what: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome is not None else None
        log.warning(
            "database %s failed (try %d, %s); retrying in %.2f s",
            what,
            state.attempt_number,
            public_message(exc) if exc is not None else "?",
            state.upcoming_sleep,
        )

    return before_sleep


def call(
    fn: Callable[[], T],
    *,
    what: str,
    deadline_s: float,
    on_recovered: Callable[[Recovery], None] | None = None,
) -> T:
    """Run ``fn()`` (one whole unit of database work) and return its result, running it again
    after a transient database error, waiting 0.1 s, 0.2 s, 0.4 s ... (at most 5 s, with
    jitter), as long as a new try starts within ``deadline_s`` seconds of the first.

    ``on_recovered`` is called (after ``fn`` succeeded, outside the retries) when it took more
    than one try. Any other exception of ``fn`` propagates at once.

    Raises:
        DatabaseUnavailable: every try up to the deadline failed with a transient error.
    """
    start = time.monotonic()
    first_error: list[str] = []

    def remember(state: RetryCallState) -> None:
        if not first_error and state.outcome is not None:
            exc = state.outcome.exception()
            first_error.append(public_message(exc) if exc is not None else "?")
        _log_retry(what)(state)

    retrying = Retrying(
        retry=retry_if_exception(is_transient),
        wait=wait_exponential_jitter(multiplier=FIRST_WAIT_S, max=MAX_WAIT_S, jitter=JITTER_S),
        stop=stop_before_delay(deadline_s),
        before_sleep=remember,
    )
    try:
        result = retrying(fn)
    except RetryError as e:
        last = e.last_attempt.exception()
        seconds = time.monotonic() - start
        raise DatabaseUnavailable(
            what,
            seconds,
            e.last_attempt.attempt_number,
            public_message(last) if last is not None else "?",
        ) from last
    attempts = int(retrying.statistics.get("attempt_number", 1))
    if attempts > 1:
        recovery = Recovery(what, attempts, time.monotonic() - start, first_error[0])
        log.warning(
            "database %s succeeded after %d tries (%.1f s)", what, attempts, recovery.seconds
        )
        if on_recovered is not None:
            on_recovered(recovery)
    return result


class Retrier:
    """:func:`call` with one deadline, keeping the :class:`Recovery` of every unit of work
    that needed retries until :meth:`take_recoveries` (the runner reports them as a job
    event)."""

    def __init__(self, deadline_s: float) -> None:
        self.deadline_s = deadline_s
        self._recoveries: list[Recovery] = []

    @classmethod
    def for_settings(cls, settings: Settings) -> Retrier:
        """The worker's retrier: ``db_retry_deadline_s``, capped at ``heartbeat_timeout_s``
        (past it the reconciler re-queues the job anyway)."""
        return cls(min(settings.db_retry_deadline_s, settings.heartbeat_timeout_s))

    def __call__(self, what: str, fn: Callable[[], T]) -> T:
        """``call(fn, what=what, deadline_s=self.deadline_s)``, remembering a recovery."""
        return call(fn, what=what, deadline_s=self.deadline_s, on_recovered=self._recoveries.append)

    def take_recoveries(self) -> list[Recovery]:
        """The recoveries since the last call (and forget them)."""
        out, self._recoveries = self._recoveries, []
        return out
