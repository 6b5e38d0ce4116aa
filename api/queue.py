"""Sending a job to the workers (after the job row is committed)."""

from __future__ import annotations

from celery import Celery
from kombu.exceptions import OperationalError

from worker.celery_app import TASK_NAME


class BrokerUnavailable(Exception):
    """The broker did not accept the task."""


def enqueue(celery: Celery, job_id: str, queue: str) -> None:
    """Send the job id (the only task argument; also the Celery task id) to ``queue``.

    Raises:
        BrokerUnavailable: the broker could not be reached.
    """
    try:
        celery.send_task(
            TASK_NAME,
            args=[job_id],
            task_id=job_id,
            queue=queue,
            retry=True,
            retry_policy={"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        )
    except (OperationalError, ConnectionError, OSError) as e:
        raise BrokerUnavailable(str(e)) from e
