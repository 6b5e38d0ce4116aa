"""The Celery application, shared by the API (to send tasks) and the worker (to run them).

Long GPU tasks: late acks, reject on worker loss, prefetch 1, JSON only, a visibility timeout
above the longest job, socket timeouts so that a silent broker fails a publish (see
docs/production.md). Importing this module does not import torch.
"""

from __future__ import annotations

from celery import Celery

from api.settings import Settings, get_settings

TASK_NAME = "distillery.run_job"


def make_celery(settings: Settings) -> Celery:
    """A configured Celery app for ``settings.broker_url``."""
    app = Celery("distillery", broker=settings.broker_url, include=["worker.tasks"])
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


app = make_celery(get_settings())
