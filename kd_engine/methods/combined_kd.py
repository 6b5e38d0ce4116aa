"""``combined_kd``: Annealing-KD's stages with MATE-KD's adversarial augmentation ("Combined-KD",
Li, Rashid, Jafari, Sharma, Ghodsi and Rezagholizadeh, "How to Select One Among All? An
Extensive Empirical Study Towards the Robustness of Knowledge Distillation in Natural Language
Understanding", Findings of EMNLP 2021; the GLUE-leaderboard entry of the source talk). Authors'
code: huawei-noah/Efficient-NLP ``Combined-KD/Combined_KD.py`` (read, not copied).

- stage I (no labels), k * tau_max epochs, T stepping down from tau_max to 1 as in
  :mod:`kd_engine.methods.annealing_kd`, with MATE-KD's generator
  (:mod:`kd_engine.methods.adversarial`): max step: the generator maximises
  MSE(S(x'), T(x')) on the UN-annealed teacher logits; min step:
  1/2 MSE(S(x'), Phi(T) T(x')) + 1/2 MSE(S(x), Phi(T) T(x)). Does not select; stage II starts
  from its best dev weights (the authors reload ``BestModel.pt``).
- stage II: CE on the labels (MSE for regression); no augmentation.

Defaults: the authors' run script (tau_max 10, 30 stage-I epochs: k = 3, 10 stage-II epochs,
lr 2e-5, batch 32) and MATE-KD's generator settings (p 0.3, n_G 10, n_S 100, generator lr 5e-7,
clipping 5). Differences from the authors' code: their generator keeps taking max steps in
stage II (its rewrites are unused there; here it stops); the student optimiser is the loop's
AdamW with ``training.weight_decay`` (theirs: AdamW, weight decay 0.0); the warm-up is the
stage's ``warmup_ratio`` 0 (theirs: 2138 steps hard-coded). Their BERT variant computes the
augmented loss and never adds it (so its students never see x'); this follows the RoBERTa file,
where it is added.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import Field

from kd_engine.losses import ce_loss
from kd_engine.losses.annealing import annealing_mse
from kd_engine.methods.adversarial import (
    ADVERSARIAL,
    AdversarialConfig,
    AdversarialMethod,
    trains_student,
)
from kd_engine.methods.annealing_kd import AnnealingClock
from kd_engine.methods.base import LossParts, LossResult, MethodConfig, StepOutputs, teacher_outputs
from kd_engine.methods.mate_kd import augmented_outputs
from kd_engine.registry import register
from kd_engine.stages import Stage

if TYPE_CHECKING:
    from kd_engine.models.shapes import ModelShape
    from kd_engine.spec import TrainingSpec

LABELS = "labels"


class CombinedKDConfig(AdversarialConfig):
    """Settings of ``combined_kd`` (the generator's: :class:`AdversarialConfig`).

    Attributes:
        tau_max: the first temperature of stage I (the run script's ``--max_temperature 10``).
        epochs_per_temperature: k; stage I has k * tau_max epochs (run script: 30 epochs, k 3).
        stage_one_learning_rate: peak LR of stage I, linear decay, no warm-up (2e-5).
        stage_two_epochs: CE epochs of stage II (run script ``--num_train_epochs_phase_2 10``).
        stage_two_learning_rate: peak LR of stage II (2e-5).
    """

    name: Literal["combined_kd"] = "combined_kd"
    tau_max: int = Field(10, ge=1, le=100)
    epochs_per_temperature: int = Field(3, ge=1, le=100)
    stage_one_learning_rate: float = Field(2e-5, gt=0.0, le=1.0)
    stage_two_epochs: int = Field(10, ge=1, le=200)
    stage_two_learning_rate: float = Field(2e-5, gt=0.0, le=1.0)


class CombinedKD(AdversarialMethod):
    """Annealing-KD stage I on x and MATE-KD's x', then CE on the labels."""

    config_cls = CombinedKDConfig
    config: CombinedKDConfig

    def __init__(self, config: MethodConfig, teacher: ModelShape, student: ModelShape) -> None:
        """Start at T = tau_max."""
        super().__init__(config, teacher, student)
        self.clock = AnnealingClock(self.config.tau_max, self.config.epochs_per_temperature)
        self.objective_name = "generator_mse"

    def stages(self, training: TrainingSpec) -> list[Stage]:
        """Generator warm-up (built generator only), annealing with augmentation (restores its
        best dev weights, does not select), then CE on the labels (selects)."""
        c = self.config
        return [
            *self.warmup_stages(),
            Stage(
                "combined annealing",
                loss=ADVERSARIAL,
                epochs=c.tau_max * c.epochs_per_temperature,
                learning_rate=c.stage_one_learning_rate,
                warmup_ratio=0.0,
                schedule="linear",
                trains=trains_student(),
                selects_best=False,
                restore_best=True,
            ),
            Stage(
                "label fine-tuning",
                loss=LABELS,
                epochs=c.stage_two_epochs,
                learning_rate=c.stage_two_learning_rate,
                warmup_ratio=0.0,
                schedule="linear",
                trains=trains_student(),
            ),
        ]

    def adversarial(self) -> bool:
        """Only stage I alternates generator and student steps."""
        return self.stage is not None and self.stage.loss == ADVERSARIAL

    def begin_stage(self, stage: Stage) -> None:
        """Reset T to tau_max (the stage's first epoch is taken from its first step)."""
        super().begin_stage(stage)
        self.clock.reset()

    def start_step(self, epoch: int, step: int) -> None:
        """Set T from the epoch within stage I (as :class:`AnnealingKD`)."""
        super().start_step(epoch, step)
        if self.adversarial():
            self.clock.tick(epoch)

    def extra_state(self) -> dict[str, Any]:
        """The adversarial state (:meth:`AdversarialMethod.extra_state`) and the clock."""
        return {**super().extra_state(), "clock": self.clock.state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""
        super().load_extra_state(state)
        self.clock.load_state(state["clock"])

    def stage_label(self) -> str:
        """``combined annealing T=5/10`` in stage I."""
        if self.adversarial() and self.stage is not None:
            return self.clock.label(self.stage.name)
        return super().stage_label()

    def adversary_objective(
        self, student: StepOutputs, teacher: StepOutputs
    ) -> tuple[torch.Tensor, LossParts]:
        """MSE(S(x'), T(x')) on raw (un-annealed) logits (B, C), gradients through both (the
        authors' ``-F.mse_loss(student_logits, teacher_logits)`` max-step loss)."""
        mse = F.mse_loss(student.logits.float(), teacher.logits.float())
        return mse, {self.objective_name: mse.detach()}

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        """Warm-up: the generator's MLM loss. Stage I: 1/2 annealed MSE on x' + 1/2 on x,
        labels unused. Stage II: CE on the labels.

        Raises:
            ValueError: stage I without teacher outputs or outputs on x'.
        """
        if self.stage is not None and self.stage.loss == LABELS:
            ce = ce_loss(student.logits, labels)
            return LossResult(total=ce, parts={"ce": ce.detach()})
        if not self.adversarial():
            return self.warmup_loss()
        t = teacher_outputs(teacher, "combined_kd")
        s_aug, t_aug = (
            augmented_outputs(student, "combined_kd"),
            augmented_outputs(t, "combined_kd"),
        )
        factor = self.clock.factor()
        mse = annealing_mse(student.logits, t.logits, factor)
        mse_aug = annealing_mse(s_aug.logits, t_aug.logits, factor)
        total = 0.5 * mse + 0.5 * mse_aug
        return LossResult(
            total=total,
            parts={
                "annealed_mse": mse.detach(),
                "annealed_mse_augmented": mse_aug.detach(),
            },
        )


register("combined_kd", CombinedKD)
