"""Path and query parameters shared by the routes, validated before anything reaches the
database: a control character (NUL included) or an over-long value is a 422 naming the
parameter. A job id that is printable but not a UUID passes here and is answered 404 (no job
can have it) without a query (see :func:`core.refs.is_job_id`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query
from pydantic import AfterValidator

from core.job_status import JobStatus
from kd_engine.spec_fields import check_text


def printable(value: str) -> str:
    """``value`` if it holds no control character.

    Raises:
        ValueError: naming the character and its position.
    """
    return check_text(value, max_chars=len(value))


JobId = Annotated[
    str,
    Path(description="The job id (a UUID).", max_length=64),
    AfterValidator(printable),
]
ArtifactName = Annotated[
    str,
    Path(description="A file name from the job's artifact list.", max_length=255),
    AfterValidator(printable),
]
CheckpointName = Annotated[
    str,
    Path(description="A checkpoint name from the job's checkpoint list.", max_length=128),
    AfterValidator(printable),
]
StatusFilter = Annotated[JobStatus | None, Query(description="Only jobs in this status.")]
Cursor = Annotated[
    str | None,
    Query(description="next_cursor of the previous page", max_length=1024),
]


def _printable_or_none(value: str | None) -> str | None:
    return None if value is None else printable(value)


NameFilter = Annotated[
    str | None,
    Query(
        description="Only jobs with this name (name_contains: whose name holds it).",
        max_length=128,
    ),
    AfterValidator(_printable_or_none),
]
MetadataFilter = Annotated[
    list[str] | None,
    Query(
        description="key=value: only jobs whose metadata has it (repeat it: all must match).",
        max_length=16,
    ),
]
