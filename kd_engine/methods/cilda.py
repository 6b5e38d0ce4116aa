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
in max steps. n_S 100, p 0.3.

n_G: the paper (section 4.2) uses "n_G = 20 for CoLA, MRPC, RTE tasks and n_G = 10 for the rest
of the tasks". Our datasets have no GLUE names, so ``auto`` (the default) states that rule by
what the three share: 20 for a classification transfer set of fewer than 10,000 examples, 10
otherwise (GLUE: CoLA 8.5k, MRPC 3.7k, RTE 2.5k get 20; SST-2, QNLI, QQP, MNLI and the
regression task STS-B, 5.7k, get 10, as in the paper). ``None``, what jobs submitted before
2026-12-07 stored, keeps their rule: 20 below 10,000 examples whatever the task (STS-B 20).

Sources: the paper's full text (``shared/papers/cilda-paper.txt``): Eq. 1-3 and section 4.2
give the max and min steps, a1 = a2 = 1, tau1 = 1, tau2 = 2, u = 128, n_S = 100, p = 0.3 and
the min-step weights lambda_1 = lambda_2 = 1/3 on x, lambda_2 = 2/9 (KL) and lambda_3 = 1/9
(L_CRD) on x'. No official code was published (a third-party repository, we1k/CILDA,
implements only MATE-KD). The paper tunes the LR in {1e-5, 2e-5, 4e-6} and the batch in
{8, 16, 32} with early stopping on dev and gives no epoch count; the student's epochs and LR
default to MATE-KD's authors' (30, 2e-5), the LR being inside CILDA's grid.
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
from kd_engine.methods.base import (
    LossParts,
    LossResult,
    MethodConfig,
    Needs,
    StepOutputs,
    teacher_outputs,
)
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


def small_task_generator_steps(setting: int | str | None, examples: int, regression: bool) -> int:
    """n_G for a transfer set of ``examples`` examples: the setting when it is a number;
    ``auto``: 20 for a classification set of fewer than :data:`SMALL_TASK_EXAMPLES`, else 10
    (the paper's 20 for CoLA, MRPC and RTE, 10 for the rest); None (the rule of jobs stored
    before 2026-12-07): 20 below :data:`SMALL_TASK_EXAMPLES` whatever the task, else 10."""
    if isinstance(setting, int):
        return setting
    small = examples < SMALL_TASK_EXAMPLES
    if setting == "auto":
        return 20 if small and not regression else 10
    return 20 if small else 10


class CILDAConfig(AdversarialConfig):
    """Settings of ``cilda`` (the generator's: :class:`AdversarialConfig`; the paper's values
    as in the module docstring).

    Attributes:
        generator_steps: n_G; ``auto`` (default): 20 for a classification transfer set of
            fewer than 10,000 examples, else 10 (the paper's CoLA/MRPC/RTE rule; module doc);
            None (stored by jobs before 2026-12-07): 20 below 10,000 examples, else 10.
        projection_size: width of both [CLS] projections (128).
        crd_temperature: tau2 of L_CRD (2).
        generator_kl_weight, generator_crd_weight: a1 and a2 of the max step (1 and 1).
        ce_weight, kd_weight: min-step weights of CE and KL on x (1/3 each).
        kd_augmented_weight, crd_augmented_weight: min-step weights of KL and L_CRD on x'
            (2/9 and 1/9).
        epochs, learning_rate: the adversarial stage's (MATE-KD's authors' 30 and 2e-5).
    """

    name: Literal["cilda"] = "cilda"
    generator_steps: int | Literal["auto"] | None = Field(  # type: ignore[assignment]
        "auto", ge=1, le=10_000
    )
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

    needs = Needs(hidden_states=True, models=True, augmented=True, generator=True)
    config_cls = CILDAConfig
    config: CILDAConfig

    def __init__(self, config: MethodConfig, teacher: ModelShape, student: ModelShape) -> None:
        """Build the two [CLS] projections (u = ``projection_size``)."""
        super().__init__(config, teacher, student)
        self.head = CRDHead(teacher, student, self.config.projection_size)

    def prepare(self, train_data: Encoded) -> None:
        """Also resolve n_G from the transfer set's size when it is not set."""
        super().prepare(train_data)
        self.n_generator = small_task_generator_steps(
            self.config.generator_steps, len(train_data), self.student_shape.num_labels == 1
        )

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
    ) -> tuple[torch.Tensor, LossParts]:
        """a1 KL(T(x') || S(x')) + a2 L_CRD(x') (projections fixed: only the generator steps)."""
        c = self.config
        kl = generator_divergence(
            teacher.logits, student.logits, c.temperature, c.generator_objective
        )
        crd = self.head(student, teacher, c.crd_temperature, "cilda")
        objective = c.generator_kl_weight * kl + c.generator_crd_weight * crd
        return objective, {
            self.objective_name: kl.detach(),
            "generator_crd": crd.detach(),
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
                "ce": ce.detach(),
                "kd": kd.detach(),
                "kd_augmented": kd_aug.detach(),
                "crd_augmented": crd_aug.detach(),
            },
        )


register("cilda", CILDA)
