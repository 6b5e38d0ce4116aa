"""The worker's Celery application (``celery -A worker.celery_app worker ...``): the app of
:func:`core.queue.make_celery` with this package's task modules included."""

from __future__ import annotations

from core.queue import make_celery
from core.settings import get_settings

TASK_MODULES = ("worker.tasks",)
"""The modules that define the worker's tasks."""

app = make_celery(get_settings(), include=TASK_MODULES)
