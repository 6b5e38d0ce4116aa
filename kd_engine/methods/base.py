"""What every KD method provides: a typed config and a loss for one training step."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch
from pydantic import BaseModel, ConfigDict


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
        attentions: per layer, each (B, heads, T, T); None unless requested.
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
    ``uses_teacher`` (run the teacher forward), ``needs_hidden_states``, ``needs_attentions``.
    """

    uses_teacher: bool = True
    needs_hidden_states: bool = False
    needs_attentions: bool = False

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

    def extra_modules(self) -> list[torch.nn.Module]:
        """Trainable modules the method owns (projections), optimised with the student."""
        return []
