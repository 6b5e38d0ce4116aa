"""Sending a job to the workers (after the job row is committed)."""

from __future__ import annotations

import threading

from celery import Celery

from worker.celery_app import TASK_NAME

PRIORITY_SEP = "\x06\x16"
"""kombu's Redis transport keeps priority ``p`` > 0 of queue ``q`` in list ``q + SEP + p``."""


def broker_lists(queue: str) -> list[str]:
    """The Redis lists that hold ``queue``'s waiting messages: the queue's own and one per
    priority 1-9 (kombu's Redis transport)."""
    return [queue] + [f"{queue}{PRIORITY_SEP}{p}" for p in range(1, 10)]


class BrokerUnavailable(Exception):
    """The broker did not accept the task (down, refusing, or not answering in time)."""


def enqueue(celery: Celery, job_id: str, queue: str, timeout_s: float = 10.0) -> None:
    """Send the job id (the only task argument; also the Celery task id) to ``queue``, within
    ``timeout_s`` seconds.

    The publish runs in a helper thread bounded by a hard deadline: the transport's socket
    timeouts (``broker_transport_options``) bound each connect and command, and the deadline
    bounds their sum (retries included), also against a broker that accepts the TCP
    connection and never answers. A publish that completes after the deadline is harmless:
    the caller has marked the job failed, and the worker cannot claim a job that is not
    queued.

    Raises:
        BrokerUnavailable: the broker could not be reached or did not answer within
            ``timeout_s`` seconds.
    """
    done = threading.Event()
    errors: list[BaseException] = []

    def publish() -> None:
        try:
            celery.send_task(
                TASK_NAME,
                args=[job_id],
                task_id=job_id,
                queue=queue,
                retry=True,
                retry_policy={
                    "max_retries": 2,
                    "interval_start": 0.2,
                    "interval_step": 0.5,
                    "interval_max": 1.0,
                },
            )
        except BaseException as e:  # reported to the caller's thread
            errors.append(e)
        finally:
            done.set()

    threading.Thread(target=publish, name=f"publish-{job_id}", daemon=True).start()
    if not done.wait(timeout_s):
        raise BrokerUnavailable(f"no answer from the broker within {timeout_s:g} s")
    if errors:
        if _timed_out(errors[0]):  # a socket timeout of the transport, not a refusal
            raise BrokerUnavailable(
                f"no answer from the broker within {timeout_s:g} s"
            ) from errors[0]
        raise BrokerUnavailable(str(errors[0]) or type(errors[0]).__name__) from errors[0]


def _timed_out(error: BaseException) -> bool:
    """Whether ``error`` or an exception it was raised from is a timeout (the builtin
    ``TimeoutError``, or a client library's own ``TimeoutError`` such as redis-py's, which
    kombu may wrap)."""
    seen: set[int] = set()
    cur: BaseException | None = error
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, TimeoutError) or type(cur).__name__ == "TimeoutError":
            return True
        cur = cur.__cause__ or cur.__context__
    return False
