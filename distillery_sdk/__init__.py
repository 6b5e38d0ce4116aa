"""Distillery's Python SDK: :class:`Client` over the HTTP API, typed answers
(:mod:`distillery_sdk.models`) and typed errors (:mod:`distillery_sdk.errors`). The
``distillery`` command line is :mod:`distillery_sdk.cli`.

Example::

    from distillery_sdk import Client

    with Client("http://127.0.0.1:8000", api_key="dk_...") as c:
        job = c.submit({"teacher": "builtin:minilm-l6", "method": {"name": "finetune"},
                        "dataset": {"source": "builtin:rotten_tomatoes"}})
        done = c.wait(job.id, on_progress=lambda j: print(j.status, j.progress))
        c.download(done.id, "student/")
"""

from distillery_sdk.client import DEFAULT_URL, Client
from distillery_sdk.errors import (
    ChecksumMismatch,
    Conflict,
    ConnectionFailed,
    DistilleryError,
    InvalidRequest,
    NotFound,
    QuotaExceeded,
    Unauthorized,
    Unavailable,
)
from distillery_sdk.models import FINAL_STATUSES, Artifact, Event, File, Job, Key, Progress

__all__ = [
    "DEFAULT_URL",
    "FINAL_STATUSES",
    "Artifact",
    "ChecksumMismatch",
    "Client",
    "Conflict",
    "ConnectionFailed",
    "DistilleryError",
    "Event",
    "File",
    "InvalidRequest",
    "Job",
    "Key",
    "NotFound",
    "Progress",
    "QuotaExceeded",
    "Unauthorized",
    "Unavailable",
]
