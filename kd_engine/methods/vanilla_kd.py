"""``vanilla_kd``: Hinton et al. 2015, "Distilling the Knowledge in a Neural Network".

L = (1 - alpha) * CE(y, softmax(z_s)) + alpha * tau^2 * KL(softmax(z_t/tau) || softmax(z_s/tau))
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from kd_engine.losses import ce_loss, kd_loss
from kd_engine.methods.base import (
    LossResult,
    Method,
    MethodConfig,
    StepOutputs,
    teacher_outputs,
)
from kd_engine.registry import register


class VanillaKDConfig(MethodConfig):
    """Settings of ``vanilla_kd``.

    Attributes:
        alpha: weight of the soft-target (KD) term, in [0, 1]; 1 - alpha weighs the CE term.
        temperature: tau > 0, softens both distributions (DistilBERT uses 2).
    """

    name: Literal["vanilla_kd"] = "vanilla_kd"
    alpha: float = Field(0.5, ge=0.0, le=1.0)
    temperature: float = Field(2.0, gt=0.0, le=100.0)


class VanillaKD(Method):
    """Hinton KD: (1 - alpha) CE + alpha tau^2 KL on the logits."""

    config_cls = VanillaKDConfig
    config: VanillaKDConfig

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        """Loss from student and teacher logits (B, C) and labels (B,).

        Raises:
            ValueError: no teacher outputs were given.
        """
        alpha = self.config.alpha
        ce = ce_loss(student.logits, labels)
        t_logits = teacher_outputs(teacher, "vanilla_kd").logits
        kd = kd_loss(student.logits, t_logits, self.config.temperature)
        total = (1.0 - alpha) * ce + alpha * kd
        return LossResult(total=total, parts={"ce": ce.detach(), "kd": kd.detach()})


register("vanilla_kd", VanillaKD)
