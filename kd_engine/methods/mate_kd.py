"""``mate_kd``: Rashid, Lioutas and Rezagholizadeh, "MATE-KD: Masked Adversarial TExt, a
Companion to Knowledge Distillation", ACL 2021 (section 3); authors' code huawei-noah/Efficient-NLP
``MATE-KD/train_adversarial_student.py``. The generator, its max steps and x' are in
:mod:`kd_engine.methods.adversarial`.

Min step (the paper's and the authors' ``loss = 1/3 loss_good + 1/3 loss_adv + 1/3
loss_teach``):

    L = 1/3 CE(y, S(x)) + 1/3 tau^2 KL(T(x) || S(x)) + 1/3 tau^2 KL(T(x') || S(x'))

at tau 1 (``KL_temperature``); for a regression head (one output) the CE and KL terms are MSE,
as in the authors' STS-B branch. Stages: the generator's MLM warm-up when it is built from the
teacher, then one adversarial stage of ``epochs`` epochs at ``learning_rate`` (the authors' 30
epochs at 2e-5, batch 32; their warm-up is a hard-coded 2138 steps, here
``training.warmup_ratio``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from kd_engine.losses import ce_loss, kd_loss
from kd_engine.methods.adversarial import (
    ADVERSARIAL,
    AdversarialConfig,
    AdversarialMethod,
    trains_student,
)
from kd_engine.methods.base import LossResult, StepOutputs, teacher_outputs
from kd_engine.registry import register
from kd_engine.stages import Stage

if TYPE_CHECKING:
    from kd_engine.spec import TrainingSpec


class MATEKDConfig(AdversarialConfig):
    """Settings of ``mate_kd`` (the generator's: :class:`AdversarialConfig`).

    Attributes:
        epochs: epochs of the adversarial stage (the authors' run scripts: 30).
        learning_rate: the student's peak LR there (the authors' ``--learning_rate 2e-5``).
    """

    name: Literal["mate_kd"] = "mate_kd"
    epochs: int = Field(30, ge=1, le=200)
    learning_rate: float = Field(2e-5, gt=0.0, le=1.0)


def augmented_outputs(outputs: StepOutputs, method: str) -> StepOutputs:
    """The outputs on x' the loop attached to a step's outputs.

    Raises:
        ValueError: the loop did not run the model on the augmented batch.
    """
    if outputs.augmented is None:
        raise ValueError(f"{method}: the step has no outputs on the augmented batch x'")
    return outputs.augmented


class MATEKD(AdversarialMethod):
    """MATE-KD: a masked-LM generator's adversarial rewrites x' next to the original x."""

    config_cls = MATEKDConfig
    config: MATEKDConfig

    def stages(self, training: TrainingSpec) -> list[Stage]:
        """The generator's warm-up (built generator only), then the adversarial stage (selects
        the exported checkpoint)."""
        c = self.config
        return [
            *self.warmup_stages(),
            Stage(
                "mate_kd",
                loss=ADVERSARIAL,
                epochs=c.epochs,
                learning_rate=c.learning_rate,
                trains=trains_student(),
            ),
        ]

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        """Warm-up: the generator's MLM loss. Adversarial stage: 1/3 CE(y, S(x)) + 1/3 KD on x
        + 1/3 KD on x' (logits (B, C) of both models on x and x').

        Raises:
            ValueError: no teacher outputs, or none on x'.
        """
        if not self.adversarial():
            return self.warmup_loss()
        t = teacher_outputs(teacher, "mate_kd")
        tau = self.config.temperature
        ce = ce_loss(student.logits, labels)
        kd = kd_loss(student.logits, t.logits, tau)
        s_aug, t_aug = augmented_outputs(student, "mate_kd"), augmented_outputs(t, "mate_kd")
        kd_aug = kd_loss(s_aug.logits, t_aug.logits, tau)
        total = (ce + kd + kd_aug) / 3
        return LossResult(
            total=total,
            parts={
                "ce": ce.detach(),
                "kd": kd.detach(),
                "kd_augmented": kd_aug.detach(),
            },
        )


register("mate_kd", MATEKD)
