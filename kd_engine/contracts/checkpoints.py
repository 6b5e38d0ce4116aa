"""A checkpoint's ``manifest.json`` (:mod:`kd_engine.checkpoint` writes and reads it):
:class:`CheckpointInfo` and :class:`CheckpointManifest`. Pure pydantic."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class FinishedHopRecord(BaseModel):
    """A finished hop in a checkpoint manifest: its training result
    (:class:`kd_engine.trainer.TrainResult` as a dict) and its ``hops[]`` report."""

    result: dict[str, Any]
    report: dict[str, Any]


class CheckpointInfo(BaseModel):
    """What a checkpoint's ``manifest.json`` says of it (:func:`kd_engine.checkpoint.
    read_checkpoint_info`): ``format`` (the checkpoint format's version), its ``name``, where it
    was taken (``step`` of ``total_steps`` of ``hop`` of ``num_hops``, ``stage`` and its 1-based
    ``stage_index``), why (``reason``: ``interval``, ``stage_end``, ``pause``) and the latest
    ``dev`` metrics. The rest of the manifest is ignored here (:class:`CheckpointManifest`)."""

    format: int
    name: str
    step: int
    total_steps: int
    hop: int
    num_hops: int
    stage: str
    stage_index: int
    reason: str
    dev: dict[str, float]


class CheckpointManifest(CheckpointInfo):
    """A checkpoint's whole ``manifest.json`` (:mod:`kd_engine.checkpoint`; written and read
    for a resume there): :class:`CheckpointInfo`, the ``spec_hash`` of the run that wrote it,
    the unix ``time`` it was written, whether the job's teacher taught a hop so far
    (``teacher_taught``), the loop's counters and running sums (``loop``: the scalar fields of
    :class:`kd_engine.checkpoint.LoopState`) and the ``finished`` hops. The tensors are in the
    checkpoint's safetensors and ``state.pt`` files, not here."""

    spec_hash: str
    time: float
    teacher_taught: bool
    loop: dict[str, Any]
    finished: list[FinishedHopRecord]
