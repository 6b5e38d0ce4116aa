"""``cilda``: Haidar, Rezagholizadeh, Ghaddar, Bibi, Langlais and Poupart, "CILDA: Contrastive
Data Augmentation using Intermediate Layer Knowledge Distillation", COLING 2022 (section 3).

MATE-KD (:mod:`kd_engine.methods.adversarial`) whose generator also maximises a contrastive
intermediate-layer loss between the two models on its rewrites x':

    max step:  L_G = a1 KL(T(x') || S(x')) + a2 L_CRD(x')           (a1 = a2 = 1, tau1 = 1)
    min step:  L = 1/3 CE(y, S(x)) + 1/3 KL(T(x) || S(x))
                   + 2/9 KL(T(x') || S(x')) + 1/9 L_CRD(x')

L_CRD is CILDA's in-batch contrastive loss over the concatenated per-layer [CLS] states, each
model's projected to 128 and L2-normalised, tau2 = 2 (:class:`kd_engine.methods.crd.CRDHead`,
shared with ``crd``); its projections train with the student in min steps and are held fixed
in max steps. n_G is 20 for small tasks and 10 otherwise (we call a transfer set of fewer than
10,000 examples small: GLUE's CoLA, MRPC, RTE and STS-B are, SST-2, QNLI, QQP and MNLI are not),
n_S 100, p 0.3.

Sources: no official code was published (a third-party repository, we1k/CILDA, implements only
MATE-KD) and the paper's body was not reachable from here; the recipe above is the one in our
design notes (``design/methods.md``), from the paper as summarised there. Which augmented term
weighs 2/9 and which 1/9 is our reading (KL 2/9, L_CRD 1/9). The student's epochs and LR default
to MATE-KD's authors' (30, 2e-5): CILDA's own were not reachable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from kd_engine.losses import ce_loss, kd_loss
from kd_engine.losses.adversarial import generator_divergence
from kd_engine.methods.adversarial import (
    ADVERSARIAL,
    AdversarialConfig,
    AdversarialMethod,
    trains_student,
)
from kd_engine.methods.base import LossResult, MethodConfig, StepOutputs, teacher_outputs
from kd_engine.methods.crd import CRDHead
from kd_engine.methods.mate_kd import augmented_outputs
from kd_engine.registry import register
from kd_engine.stages import ParamGroup, Stage

if TYPE_CHECKING:
    from kd_engine.data.batching import Encoded
    from kd_engine.models.shapes import ModelShape
    from kd_engine.spec import TrainingSpec

SMALL_TASK_EXAMPLES = 10_000
"""A transfer set smaller than this is a "small task" (n_G 20); see the module docstring."""
CRD_HEAD = "crd_head"


class CILDAConfig(AdversarialConfig):
    """Settings of ``cilda`` (the generator's: :class:`AdversarialConfig`; the paper's values
    as in the module docstring).

    Attributes:
        generator_steps: n_G; None: 20 for a transfer set of fewer than 10,000 examples, else 10.
        projection_size: width of both [CLS] projections (128).
        crd_temperature: tau2 of L_CRD (2).
        generator_kl_weight, generator_crd_weight: a1 and a2 of the max step (1 and 1).
        ce_weight, kd_weight: min-step weights of CE and KL on x (1/3 each).
        kd_augmented_weight, crd_augmented_weight: min-step weights of KL and L_CRD on x'
            (2/9 and 1/9).
        epochs, learning_rate: the adversarial stage's (MATE-KD's authors' 30 and 2e-5).
    """

    name: Literal["cilda"] = "cilda"
    generator_steps: int | None = Field(None, ge=1, le=10_000)  # type: ignore[assignment]
    projection_size: int = Field(128, ge=1, le=8192)
    crd_temperature: float = Field(2.0, gt=0.0, le=100.0)
    generator_kl_weight: float = Field(1.0, ge=0.0, le=1000.0)
    generator_crd_weight: float = Field(1.0, ge=0.0, le=1000.0)
    ce_weight: float = Field(1 / 3, ge=0.0, le=1000.0)
    kd_weight: float = Field(1 / 3, ge=0.0, le=1000.0)
    kd_augmented_weight: float = Field(2 / 9, ge=0.0, le=1000.0)
    crd_augmented_weight: float = Field(1 / 9, ge=0.0, le=1000.0)
    epochs: int = Field(30, ge=1, le=200)
    learning_rate: float = Field(2e-5, gt=0.0, le=1.0)


class CILDA(AdversarialMethod):
    """CILDA: MATE-KD plus in-batch contrastive [CLS] distillation on the generator's rewrites."""

    needs_hidden_states = True
    config_cls = CILDAConfig
    config: CILDAConfig

    def __init__(self, config: MethodConfig, teacher: ModelShape, student: ModelShape) -> None:
        """Build the two [CLS] projections (u = ``projection_size``)."""
        super().__init__(config, teacher, student)
        self.head = CRDHead(teacher, student, self.config.projection_size)

    def prepare(self, train_data: Encoded) -> None:
        """Also resolve n_G from the transfer set's size when it is not set."""
        super().prepare(train_data)
        if self.config.generator_steps is None:
            self.n_generator = 20 if len(train_data) < SMALL_TASK_EXAMPLES else 10

    def param_groups(self) -> list[ParamGroup]:
        """The generator (warm-up only) and the projections, group ``crd_head``."""
        return [*super().param_groups(), ParamGroup(CRD_HEAD, [self.head])]

    def stages(self, training: TrainingSpec) -> list[Stage]:
        """The generator's warm-up (built generator only), then the adversarial stage, which
        trains the student and the projections."""
        c = self.config
        return [
            *self.warmup_stages(),
            Stage(
                "cilda",
                loss=ADVERSARIAL,
                epochs=c.epochs,
                learning_rate=c.learning_rate,
                trains=trains_student(CRD_HEAD),
            ),
        ]

    def adversary_objective(
        self, student: StepOutputs, teacher: StepOutputs
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """a1 KL(T(x') || S(x')) + a2 L_CRD(x') (projections fixed: only the generator steps)."""
        c = self.config
        kl = generator_divergence(
            teacher.logits, student.logits, c.temperature, c.generator_objective
        )
        crd = self.head(student, teacher, c.crd_temperature, "cilda")
        objective = c.generator_kl_weight * kl + c.generator_crd_weight * crd
        return objective, {
            self.objective_name: float(kl.detach()),
            "generator_crd": float(crd.detach()),
        }

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        """Warm-up: the generator's MLM loss. Adversarial stage: the min step of the module
        docstring, from logits (B, C) and hidden states (layers + 1 tensors (B, T, d)) of both
        models on x and x'.

        Raises:
            ValueError: no teacher outputs, none on x', or hidden states missing.
        """
        if not self.adversarial():
            return self.warmup_loss()
        c = self.config
        t = teacher_outputs(teacher, "cilda")
        s_aug, t_aug = augmented_outputs(student, "cilda"), augmented_outputs(t, "cilda")
        ce = ce_loss(student.logits, labels)
        kd = kd_loss(student.logits, t.logits, c.temperature)
        kd_aug = kd_loss(s_aug.logits, t_aug.logits, c.temperature)
        crd_aug = self.head(s_aug, t_aug, c.crd_temperature, "cilda")
        total = (
            c.ce_weight * ce
            + c.kd_weight * kd
            + c.kd_augmented_weight * kd_aug
            + c.crd_augmented_weight * crd_aug
        )
        return LossResult(
            total=total,
            parts={
                "ce": float(ce.detach()),
                "kd": float(kd.detach()),
                "kd_augmented": float(kd_aug.detach()),
                "crd_augmented": float(crd_aug.detach()),
            },
        )


register("cilda", CILDA)
