"""A job's ``name`` and ``metadata``: how a team tells its jobs apart. Both are optional, set
at submit and never read by the worker (they are stored on the job row, not in its spec).

- ``name``: 1 to :data:`JOB_NAME_MAX` characters, no control characters.
- ``metadata``: at most :data:`METADATA_MAX_KEYS` string keys (1 to :data:`METADATA_KEY_MAX`
  characters of letters, digits, ``_ . : / -``) with string values (at most
  :data:`METADATA_VALUE_MAX` characters, no control characters), as the managed fine-tuning
  APIs have.

``GET /v1/jobs`` filters on them: ``name`` (exact), ``name_contains`` (case-insensitive) and
``metadata=key=value`` (repeatable; every pair must match).
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, Field

from core.db import JOB_NAME_MAX
from kd_engine.spec import JobSpec
from kd_engine.spec_fields import check_text

METADATA_MAX_KEYS = 16
"""The most keys a job's ``metadata`` may hold."""
METADATA_KEY_MAX = 64
"""The longest metadata key (characters)."""
METADATA_VALUE_MAX = 512
"""The longest metadata value (characters)."""
_KEY = re.compile(r"[A-Za-z0-9_.:/-]+")


def check_name(value: str) -> str:
    """``value`` stripped, if it is a valid job name.

    Raises:
        ValueError: empty, over :data:`JOB_NAME_MAX` characters, or a control character.
    """
    value = check_text(value.strip(), max_chars=JOB_NAME_MAX)
    if not value:
        raise ValueError("must not be empty (leave name out for an unnamed job)")
    return value


def check_metadata(value: dict[str, str]) -> dict[str, str]:
    """``value`` if it is valid job metadata (see the module's rules).

    Raises:
        ValueError: too many keys, or a key or value that breaks a rule (named in the message).
    """
    if len(value) > METADATA_MAX_KEYS:
        raise ValueError(f"has {len(value)} keys; at most {METADATA_MAX_KEYS} are allowed")
    for key, item in value.items():
        if len(key) > METADATA_KEY_MAX or not _KEY.fullmatch(key):
            raise ValueError(
                f"key {key[:80]!r}: keys are 1 to {METADATA_KEY_MAX} letters, digits or _ . : / -"
            )
        try:
            check_text(item, max_chars=METADATA_VALUE_MAX)
        except ValueError as e:
            raise ValueError(f"value of {key!r} {e}") from None
    return value


def parse_pair(pair: str) -> tuple[str, str]:
    """``key=value`` as (key, value) (the value may hold ``=``).

    Raises:
        ValueError: no ``=``, or a key that is not a valid metadata key.
    """
    key, sep, value = pair.partition("=")
    if not sep:
        raise ValueError(f"{pair[:80]!r} is not key=value")
    check_metadata({key: value})
    return key, value


JobName = Annotated[
    str,
    Field(description=f"A name for the job (1 to {JOB_NAME_MAX} characters)."),
    AfterValidator(check_name),
]
JobMetadata = Annotated[
    dict[str, str],
    Field(
        description=f"Free-form labels: at most {METADATA_MAX_KEYS} string keys "
        f"(1-{METADATA_KEY_MAX} of A-Z a-z 0-9 _ . : / -) with string values "
        f"(at most {METADATA_VALUE_MAX} characters)."
    ),
    AfterValidator(check_metadata),
]


class JobSubmit(JobSpec):
    """The body of ``POST /v1/jobs``: a :class:`~kd_engine.spec.JobSpec` with the job's
    optional ``name`` and ``metadata`` (kept on the job, not in its spec)."""

    name: JobName | None = None
    metadata: JobMetadata = Field(default_factory=dict)

    def job_spec(self) -> JobSpec:
        """The spec without ``name`` and ``metadata`` (its sections as they were validated,
        so which dataset settings were given explicitly is kept)."""
        spec = JobSpec.model_construct(
            _fields_set=self.model_fields_set - {"name", "metadata"},
            **{k: getattr(self, k) for k in JobSpec.model_fields},
        )
        return spec
