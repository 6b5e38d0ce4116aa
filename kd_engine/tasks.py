"""Task families: how the training loop runs a model on a batch and what a loss is given.

The loop does not look inside a step's outputs (:class:`~kd_engine.methods.base.StepOutputs`):
it asks the job's :class:`Task` to run a model on a batch with the outputs a method's
:class:`~kd_engine.methods.base.Needs` ask for, to wrap cached teacher logits, and to give the
loss its targets. Sequence classification (:data:`CLASSIFICATION`: one label per example,
logits (B, C) over classes, or (B, 1) for regression) is the one family today; a causal-LM
family (logits (B, T, V) over a vocabulary per position, next-token targets) plugs in by
implementing the same protocol.
"""

from __future__ import annotations

from typing import Protocol

import torch

from kd_engine.evaluation import model_inputs
from kd_engine.methods.base import Needs, StepOutputs


class Task(Protocol):
    """What the loop needs from a task family."""

    def forward(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        needs: Needs,
        device: torch.device,
    ) -> StepOutputs:
        """Run ``model`` on ``batch`` (moved to ``device``), reporting hidden states and
        attention maps when ``needs`` asks for them."""
        ...

    def from_logits(self, logits: torch.Tensor) -> StepOutputs:
        """Outputs made of logits alone (a teacher's, read from a cache)."""
        ...

    def targets(self, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """What the loss compares the student with, on ``device``."""
        ...


class SequenceClassification:
    """One label per example: logits (B, C) (regression: (B, 1)); targets are ``labels`` (B,)
    class ids (float targets for regression)."""

    def forward(
        self,
        model: torch.nn.Module,
        batch: dict[str, torch.Tensor],
        needs: Needs,
        device: torch.device,
    ) -> StepOutputs:
        """A ``transformers`` classifier's (or a text student's) forward pass: logits (B, C),
        hidden states and attentions as ``needs`` asks."""
        out = model(
            **model_inputs(batch, device),
            output_hidden_states=needs.hidden_states,
            output_attentions=needs.attentions,
        )
        return StepOutputs(out.logits, out.hidden_states, out.attentions)

    def from_logits(self, logits: torch.Tensor) -> StepOutputs:
        """Cached logits (B, C) as outputs with no hidden states or attentions."""
        return StepOutputs(logits)

    def targets(self, batch: dict[str, torch.Tensor], device: torch.device) -> torch.Tensor:
        """The batch's ``labels`` (B,)."""
        return batch["labels"].to(device)


CLASSIFICATION = SequenceClassification()
"""The task of every job today."""
