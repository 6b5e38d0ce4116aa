"""``finetune``: cross-entropy on gold labels only, no teacher.

The no-KD baseline (a student trained from the same initialisation without a teacher), and how
a teacher is made for later jobs.
"""

from __future__ import annotations

from typing import Literal

import torch

from kd_engine.losses import ce_loss
from kd_engine.methods.base import LossResult, Method, MethodConfig, Needs, StepOutputs
from kd_engine.registry import register


class FinetuneConfig(MethodConfig):
    """Settings of ``finetune`` (there are none besides the name)."""

    name: Literal["finetune"] = "finetune"


class Finetune(Method):
    """L = CE(y, softmax(z_s))."""

    needs = Needs(teacher=False)
    config_cls = FinetuneConfig
    config: FinetuneConfig

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        """CE loss of the student logits (B, C) against labels (B,)."""
        ce = ce_loss(student.logits, labels)
        return LossResult(total=ce, parts={"ce": ce.detach()})


register("finetune", Finetune)
