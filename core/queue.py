"""The job queue: the Celery app factory, the task's name, and sending a job to the workers
(after the job row is committed).

Long GPU tasks: late acks, reject on worker loss, prefetch 1, JSON only, a visibility timeout
above the longest job, socket timeouts so that a silent broker fails a publish (see
docs/production.md). The API sends through an app made here; the worker
(:mod:`worker.celery_app`) makes its own from the same factory with its task modules included.
Importing this module does not import torch.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from celery import Celery

from core.settings import Settings

TASK_NAME = "distillery.run_job"
"""The one task: its only argument is the job id (also the Celery task id)."""


def make_celery(settings: Settings, *, include: Sequence[str] = ()) -> Celery:
    """A configured Celery app for ``settings.broker_url``; ``include`` names the modules that
    define tasks (a worker's; an app that only sends tasks needs none)."""
    app = Celery("distillery", broker=settings.broker_url, include=list(include))
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_max_tasks_per_child=1,
        worker_hijack_root_logger=False,
        task_default_queue=settings.queue,
        broker_transport_options={
            # Must be here: the Redis transport's own default is 1 h (a longer job would be
            # delivered again while it runs).
            "visibility_timeout": settings.visibility_timeout_s,
            # A broker that accepts TCP but never answers must not hang a publish forever.
            "socket_timeout": settings.broker_publish_timeout_s,
            "socket_connect_timeout": settings.broker_publish_timeout_s,
        },
        broker_connection_timeout=settings.broker_publish_timeout_s,
        broker_connection_retry_on_startup=True,
    )
    return app


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
