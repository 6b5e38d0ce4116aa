"""Checkpoints of a running job, and bit-exact resume from one.

A checkpoint is a local directory, written atomically (a hidden temporary directory renamed into
place with :func:`os.replace`), that holds everything the training loop needs to continue as if
it had never stopped: the student's and the method's weights, the optimiser and LR scheduler of
the current stage, every RNG state (Python, NumPy, torch CPU and CUDA, the loop's data-order
generator as of the start of the current epoch plus the micro-batch reached), the loop's
counters and running loss sums, the best-so-far weights, the training result so far, the
method's own non-parameter state (:meth:`kd_engine.methods.base.Method.extra_state`), and for a
chain the finished hops' models and reports. ``manifest.json`` describes it
(:func:`read_checkpoint_info`); ``student/`` is a transformers directory that loads like the
final export.

On the CPU a resumed run ends with the same weights, bit for bit, as an uninterrupted one. On a
GPU, kernels that are not deterministic (atomics in some reductions) can make two runs differ
anyway, resumed or not.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

MANIFEST = "manifest.json"
"""The checkpoint's description (JSON), read by :func:`read_checkpoint_info`."""

STUDENT_DIR = "student"
"""The checkpoint's transformers directory of the student (config, safetensors, tokenizer)."""

FORMAT_VERSION = 1


@dataclass(frozen=True)
class CheckpointPolicy:
    """When the loop writes a checkpoint.

    Attributes:
        directory: local directory; each checkpoint is a subdirectory named
            ``step-{step:08d}`` for a single-model job and ``hop{hop}-step-{step:08d}`` for a
            chain (``step`` counts optimiser steps within the hop).
        every_steps: write one every N optimiser steps (of the hop); None = never by count.
        every_seconds: write one when this many wall-clock seconds have passed since the last
            one (or the start), checked after each optimiser step; None = never by time.
        at_stage_end: write one when a stage ends (not after the last stage of the last hop:
            the job is then about to finish).
    """

    directory: Path
    every_steps: int | None = None
    every_seconds: float | None = None
    at_stage_end: bool = True


@dataclass(frozen=True)
class SavedCheckpoint:
    """A checkpoint that was written (given to ``TrainHooks.on_checkpoint``), or read back.

    Attributes:
        path: the complete local checkpoint directory.
        name: its directory name (``step-00000040``, ``hop2-step-00000040``).
        step: optimiser steps over the whole hop when it was taken.
        total_steps: optimiser steps the hop will take.
        hop, num_hops: 1-based position of the hop, and how many the job trains (1 and 1 for a
            single-model job).
        stage: the name of the stage it was taken in; stage_index its 1-based position.
        reason: ``interval`` (every_steps / every_seconds), ``stage_end`` or ``pause``.
        dev: the latest dev metrics (empty if none yet).
        student_dir: ``path/"student"``: a transformers directory (config.json,
            model.safetensors, tokenizer files) loadable as a student, like the final export.
    """

    path: Path
    name: str
    step: int
    total_steps: int
    hop: int
    num_hops: int
    stage: str
    stage_index: int
    reason: str
    dev: dict[str, float]
    student_dir: Path


class Paused(Exception):
    """Raised by the loop after it wrote a ``pause`` checkpoint because
    ``TrainHooks.should_pause`` returned True. ``checkpoint`` is that checkpoint."""

    def __init__(self, checkpoint: SavedCheckpoint) -> None:
        super().__init__(f"paused at step {checkpoint.step}: {checkpoint.path}")
        self.checkpoint = checkpoint


def read_checkpoint_info(path: Path) -> SavedCheckpoint:
    """Read the manifest of the checkpoint directory ``path``.

    Raises:
        ValueError: ``path`` is not a complete checkpoint (no readable manifest).
    """
    raise NotImplementedError
