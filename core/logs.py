"""Logging for the API and the workers: plain text or one JSON object per line, with the id of
the job being worked on in every record (``job_id``; ``-`` outside a job).

The job id lives in a context variable: a worker binds it for the whole run of a job
(:func:`bound_job`), the API for a request whose path names a job
(:func:`api.request_logs.install`). Log shippers (Loki, CloudWatch, Elasticsearch) then
filter a job's lines on one field.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

LogFormat = Literal["text", "json"]

job_id_var: ContextVar[str | None] = ContextVar("distillery_job_id", default=None)
"""The id of the job the current thread or task works on (None outside a job)."""

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s [job %(job_id)s] %(message)s"
JSON_FIELDS = "%(asctime)s %(levelname)s %(name)s %(job_id)s %(message)s"


class JobIdFilter(logging.Filter):
    """Adds ``job_id`` (the bound job's id, ``-`` when none) to every record it sees."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id = job_id_var.get() or "-"
        return True


class _DistilleryHandler(logging.StreamHandler):  # type: ignore[type-arg,unused-ignore]
    """The root handler :func:`configure` installs (found again and replaced on a second call)."""


def configure(fmt: LogFormat = "text", level: int = logging.INFO) -> logging.Handler:
    """Log every record of the process to stderr in ``fmt`` with its ``job_id``: ``text``
    (``time level logger [job <id>] message``) or ``json`` (one object per line with
    ``time``, ``level``, ``logger``, ``job_id``, ``message`` and any ``extra`` fields).
    Replaces the handler an earlier call installed; returns the new one."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _DistilleryHandler)]:
        root.removeHandler(old)
    handler = _DistilleryHandler(sys.stderr)
    handler.addFilter(JobIdFilter())
    if fmt == "json":
        handler.setFormatter(
            JsonFormatter(
                JSON_FIELDS,
                rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter(TEXT_FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    return handler


@contextmanager
def bound_job(job_id: str) -> Iterator[None]:
    """Within the block, every log record of this thread or task names job ``job_id``."""
    token = job_id_var.set(job_id)
    try:
        yield
    finally:
        job_id_var.reset(token)
