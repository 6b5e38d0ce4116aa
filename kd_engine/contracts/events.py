"""The typed ``data`` of the job events that carry details: :data:`EVENT_PAYLOADS`. Pure
pydantic."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import Field

from kd_engine.contracts.metrics import Block, EvaluationRecord, Scores


class CheckpointSaved(Block):
    """The ``data`` of a ``checkpoint`` event: a checkpoint stored (``name``; at ``step`` of
    ``total_steps`` of ``hop`` of ``num_hops``, in ``stage``), why (``reason``: ``interval``,
    ``stage_end``, ``pause``) and its ``size_bytes`` in the artifact store."""

    name: str | None = None
    step: int | None = None
    total_steps: int | None = None
    hop: int | None = None
    num_hops: int | None = None
    stage: str | None = None
    reason: str | None = None
    size_bytes: int | None = None


class Resumed(Block):
    """The ``data`` of a ``resumed`` event: the ``checkpoint`` an attempt continued from, its
    ``step`` of ``total_steps``, ``hop`` of ``num_hops``, ``stage``, and the ``attempt``."""

    checkpoint: str | None = None
    step: int | None = None
    total_steps: int | None = None
    hop: int | None = None
    num_hops: int | None = None
    stage: str | None = None
    attempt: int | None = None


class PausedAt(Block):
    """The ``data`` of a ``paused`` event of a running job: the ``checkpoint`` it paused at and
    its ``step`` of ``total_steps`` (empty for a job paused while queued)."""

    checkpoint: str | None = None
    step: int | None = None
    total_steps: int | None = None


class Succeeded(Block):
    """The ``data`` of a ``succeeded`` event: the trained model's ``test`` metrics and the
    names of the job's ``artifacts``."""

    test: Scores = Field(default_factory=dict)
    artifacts: list[str] = Field(default_factory=list)


EVENT_PAYLOADS: dict[str, type[Block]] = {
    "checkpoint": CheckpointSaved,
    "resumed": Resumed,
    "paused": PausedAt,
    "succeeded": Succeeded,
    "epoch": EvaluationRecord,
}
"""The typed ``data`` of the job events that carry structured details, by event type (the
others carry at most a ``message``-like detail; see docs/usage.md, "Events")."""


def event_payload(event_type: str, data: Mapping[str, Any]) -> Block | None:
    """The ``data`` of an event of type ``event_type`` as its typed payload
    (:data:`EVENT_PAYLOADS`), or None for a type without one.

    Raises:
        pydantic.ValidationError: ``data`` does not fit the payload (the error names the key).
    """
    model = EVENT_PAYLOADS.get(event_type)
    return model.model_validate(dict(data)) if model is not None else None
