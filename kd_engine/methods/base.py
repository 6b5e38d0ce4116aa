"""What every KD method provides: a typed config and a loss for one training step."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from kd_engine.models.shapes import ModelShape


class MethodConfig(BaseModel):
    """Base of every method's settings; ``name`` is the discriminator in the job spec."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str


@dataclass
class StepOutputs:
    """What one forward pass of a model gives a method.

    Attributes:
        logits: (B, C) classification logits.
        hidden_states: per layer (embeddings first), each (B, T, d); None unless requested.
        attentions: per layer, each (B, heads, T, T); None unless requested. Softmax
            probabilities, or the pre-softmax scores (padding mask added) for a method whose
            ``attention_scores`` is True.
    """

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None


@dataclass
class LossResult:
    """The loss to back-propagate and its named parts (plain floats, for logs and progress)."""

    total: torch.Tensor
    parts: dict[str, float] = field(default_factory=dict)


class Method(ABC):
    """One KD method: how a training step turns model outputs into a loss.

    Class attributes tell the trainer what to compute once per step:
    ``uses_teacher`` (run the teacher forward), ``needs_hidden_states``, ``needs_attentions``
    and, with it, ``attention_scores`` (attention maps as pre-softmax scores rather than
    probabilities; see :mod:`kd_engine.models.attention_scores`). ``any_student_architecture``
    is True for a method whose intermediate-layer matching works for students that are not
    transformers (BiLSTM, CNN); other methods that need hidden states or attentions need
    token-aligned transformer states, see :func:`check_student_architecture`.
    """

    uses_teacher: bool = True
    needs_hidden_states: bool = False
    needs_attentions: bool = False
    attention_scores: bool = False
    any_student_architecture: bool = False

    @abstractmethod
    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        """Return the training loss for one batch.

        Args:
            student: student outputs, logits (B, C).
            teacher: teacher outputs (None when ``uses_teacher`` is False).
            labels: (B,) gold class ids.
            attention_mask: (B, T), 1 for real tokens and 0 for padding.
        """

    def bind(self, teacher: ModelShape, student: ModelShape) -> None:  # noqa: B027
        """Check the method fits these models and build its projections.

        Called once per job, before training (and by the API, to reject a job before it is
        queued). Per-job state lives on the method instance, never on the class.

        Raises:
            ValueError: the models do not fit the method (e.g. a layer index out of range); the
                message starts with the spec field, e.g. ``method.layer_mapping: ...``.
        """

    def check_training(self, epochs: int) -> None:  # noqa: B027
        """Check the method's schedule fits a job of ``epochs`` epochs.

        Called with ``bind`` (by the API before queueing and by the engine before training).

        Raises:
            ValueError: the schedule cannot run in that many epochs; the message starts with
                the spec field, e.g. ``method.intermediate_epochs: ...``.
        """

    def schedule_warnings(self, total_steps: int) -> list[str]:
        """Warnings about a schedule that runs but cannot do what the settings ask, e.g. a
        stage that would start after the job's last optimiser step (``total_steps``).

        The engine records them in ``metrics.json`` (``warnings``) and in the training log.
        """
        return []

    def start_step(self, epoch: int, step: int) -> None:  # noqa: B027
        """Called before each training step's loss (epoch 1-based, step = optimiser steps
        taken so far); methods with schedules (layer redraws, stages) use it."""

    def counts_for_best(self, epoch: int) -> bool:
        """Whether this epoch's dev accuracy may select the exported checkpoint (False for
        epochs of a stage that does not train the classifier)."""
        return True

    def extra_modules(self) -> list[torch.nn.Module]:
        """Trainable modules the method owns (projections), optimised with the student."""
        return []


def check_student_architecture(method: Method, name: str, student: ModelShape) -> None:
    """Reject a non-transformer student for a method that matches transformer states.

    Raises:
        ValueError: ``student: ...`` explaining why, when the method needs hidden states or
            attentions aligned token by token with a transformer's and the student is not one.
    """
    needs_states = method.needs_hidden_states or method.needs_attentions
    if needs_states and not student.transformer and not method.any_student_architecture:
        raise ValueError(
            f"student: {name} matches the student's transformer hidden states or attention maps "
            "with the teacher's, layer by layer and token by token; this student is not a "
            "transformer and has none. Use universal_kd, or an output-only method such as "
            "vanilla_kd, for a BiLSTM or CNN student"
        )
