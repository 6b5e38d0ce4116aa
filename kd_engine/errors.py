"""The one error of a job spec that cannot run: it names the spec field at fault."""

from __future__ import annotations

from typing import Any


class SpecError(ValueError):
    """A job spec that is well formed but cannot run with these models or this data.

    ``field`` is the dotted spec path (``method.layer_mapping``, ``student.num_heads``) and
    ``reason`` says why; ``str()`` is ``"field: reason"``; ``details`` is optional JSON data
    (e.g. the memory estimate of a job over its queue's budget). Every check of a spec raises
    this one type (:mod:`kd_engine.validation`, the methods' checks, the data checks): the API
    answers it with a 422 whose body has ``field``, the reason as ``message`` and ``details``;
    the worker fails the job with ``str()``. A ``ValueError`` subclass, so callers that catch
    ``ValueError`` keep working.
    """

    def __init__(self, field: str, reason: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.details = details
