"""The Celery task: its only argument is the job id (also the task id)."""

from __future__ import annotations

import logging
from typing import Any

import transformers
from celery.signals import setup_logging, worker_ready

from core import logs
from core.queue import TASK_NAME
from core.settings import get_settings
from core.storage import StorageError, check_storage
from worker import reconciler, runner, staging
from worker.celery_app import app

log = logging.getLogger("distillery.worker")


@app.task(name=TASK_NAME)
def run_job(job_id: str) -> str:
    """Run job ``job_id``; a duplicate delivery finds it claimed and returns ``skipped``."""
    transformers.logging.set_verbosity_error()
    return runner.execute(job_id, get_settings())


@worker_ready.connect
def _start_reconciler(**_: Any) -> None:
    """In the worker's main process (not a pool child): a reconciler pass every
    ``reconcile_interval_s`` seconds, one at a time across workers (a Redis lock)."""
    settings = get_settings()
    reconciler.start_thread(settings)
    log.info("reconciler started (a pass every %g s)", settings.reconcile_interval_s)


@worker_ready.connect
def _sweep_staging(**_: Any) -> None:
    """Once at start: remove the staging folders of dead attempts from this machine's staging
    root (with s3 each worker has its own; the reconciler's passes sweep one worker's). An
    error is logged: the next pass tries again."""
    settings = get_settings()
    try:
        staging.sweep(settings, runner.sessions_for(settings.database_url))
    except Exception:
        log.exception("could not sweep the staging folders of dead attempts")


@worker_ready.connect
def _check_storage(**_: Any) -> None:
    """Check the artifact and upload stores once at start (s3: bucket and credentials); a
    failure is logged as an error naming the setting (jobs then wait in the queue)."""
    try:
        check_storage(get_settings())
    except StorageError as e:
        log.error("storage unusable: %s", e)


@setup_logging.connect
def _configure_logging(loglevel: Any = None, **_: Any) -> None:
    """Celery leaves logging to us (a receiver of ``setup_logging`` replaces its own set-up):
    text or JSON lines by ``DISTILLERY_LOG_FORMAT``, each with the job id."""
    level = loglevel if isinstance(loglevel, int) else logging.getLevelName(str(loglevel).upper())
    if not isinstance(level, int):  # an unknown name
        level = logging.INFO
    logs.configure(get_settings().log_format, level)
