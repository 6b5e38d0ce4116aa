"""``annealing_kd``: Jafari, Rezagholizadeh, Sharma and Ghodsi, "Annealing Knowledge
Distillation", EACL 2021 (section 3).

Two stages:

- stage I (no labels), k * tau_max epochs: L = MSE(z_s, Phi(T) z_t), Phi(T) = 1 - (T - 1)/tau_max,
  the integer temperature T stepping down from tau_max to 1, k epochs per value
  (:mod:`kd_engine.losses.annealing`). One stage: one AdamW and one linear LR decay over all of
  stage I (the authors create an optimiser and a scheduler per phase, not per T). It does not
  select the exported checkpoint, but the next stage starts from its best dev evaluation (the
  authors reload ``BestModel.pt``, the best stage-I dev checkpoint, before phase 2).
- stage II: CE on the gold labels only (MSE for a regression head, through
  :func:`kd_engine.losses.ce_loss`); selects the exported checkpoint.

Defaults are the authors' GLUE recipe (huawei-noah/Efficient-NLP, ``Annealing_KD/README.md``):
tau_max 7, 14 stage-I epochs (k = 2), 4 stage-II epochs, lr 2e-5 in both, batch 32, max length
128; ``Annealing_KD/NLP_glue_tasks/annealing_kd_glue.py``: no warm-up (``warmup_steps`` 0),
linear decay to 0 per phase, AdamW eps 1e-8, weight decay 0.0, grad clip 1.0.

Differences from the authors' code: the student's weight decay is ``training.weight_decay``
(default 0.01; set it to 0 for the authors' 0.0); the dev set is evaluated at the END of each
epoch (and every ``training.eval_every_steps``), the authors evaluate at the START of each epoch
(so their first evaluation is of the untrained student, and the last stage-I epoch is seen only
through their every-500-steps evaluations); the exported model is the best stage-II evaluation
(the authors save the last stage-II state and report the best dev score over both phases); the
stage-I schedule of T is exact (the authors' ``i % int(epochs_1 / tau_max)`` overshoots tau_max
when epochs_1 is not a multiple of it; here stage I always has k * tau_max epochs). The
teacher's forward pass also runs in stage II, whose loss does not read it (``needs.teacher`` is
per method, not per stage).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from kd_engine.errors import SpecError
from kd_engine.losses import ce_loss
from kd_engine.losses.annealing import annealing_factor, annealing_mse, annealing_temperature
from kd_engine.methods.base import (
    LossResult,
    Method,
    MethodConfig,
    StepOutputs,
    config_as,
    teacher_outputs,
)
from kd_engine.registry import register
from kd_engine.stages import Stage

if TYPE_CHECKING:
    from kd_engine.models.shapes import ModelShape
    from kd_engine.spec import TrainingSpec

MAX_STAGE_ONE_EPOCHS = 200
"""Stage I may not be longer than ``training.epochs`` may be."""


class AnnealingKDConfig(MethodConfig):
    """Settings of ``annealing_kd`` (defaults: the authors' README recipe for GLUE,
    huawei-noah/Efficient-NLP ``Annealing_KD/README.md``).

    Attributes:
        tau_max: the first (largest) temperature; stage I anneals T = tau_max, ..., 1
            (README ``--max_temperature 7``).
        epochs_per_temperature: k, epochs at each T; stage I has k * tau_max epochs (README
            ``--num_train_epochs_phase_1 14`` with tau_max 7: k = 2).
        stage_one_learning_rate: peak LR of stage I, decayed linearly to 0 without warm-up
            (README ``--learning_rate 2e-5``; ``annealing_kd_glue.py`` ``warmup_steps`` 0).
        stage_two_epochs: epochs of stage II, CE on the labels (README
            ``--num_train_epochs_phase_2 4``).
        stage_two_learning_rate: peak LR of stage II, its own linear decay from it to 0 (the
            README's one ``--learning_rate 2e-5`` serves both phases).
    """

    name: Literal["annealing_kd"] = "annealing_kd"
    tau_max: int = Field(7, ge=1, le=100)
    epochs_per_temperature: int = Field(2, ge=1, le=100)
    stage_one_learning_rate: float = Field(2e-5, gt=0.0, le=1.0)
    stage_two_epochs: int = Field(4, ge=1, le=200)
    stage_two_learning_rate: float = Field(2e-5, gt=0.0, le=1.0)


ANNEALING, LABELS = "annealing", "labels"


class AnnealingClock:
    """The temperature of an annealing stage: tau_max during its first k epochs, tau_max - 1
    during the next k, ..., 1 during the last k (:func:`annealing_temperature`). The loop counts
    epochs over the whole job; the stage's first epoch is the one of its first step."""

    def __init__(self, tau_max: int, epochs_per_temperature: int) -> None:
        self.tau_max = tau_max
        self.epochs_per_temperature = epochs_per_temperature
        self.temperature = tau_max
        self._first_epoch: int | None = None

    def reset(self) -> None:
        """Back to T = tau_max, at the start of a stage."""
        self.temperature = self.tau_max
        self._first_epoch = None

    def tick(self, epoch: int) -> int:
        """Set and return T for job epoch ``epoch`` (1-based) of the stage."""
        if self._first_epoch is None:
            self._first_epoch = epoch
        self.temperature = annealing_temperature(
            epoch - self._first_epoch + 1, self.tau_max, self.epochs_per_temperature
        )
        return self.temperature

    def state(self) -> dict[str, int | None]:
        """The clock's state, for a checkpoint."""
        return {"temperature": self.temperature, "first_epoch": self._first_epoch}

    def load_state(self, state: dict[str, int | None]) -> None:
        """Restore what :meth:`state` returned."""
        self.temperature = int(state["temperature"] or self.tau_max)
        self._first_epoch = state["first_epoch"]

    def factor(self) -> float:
        """Phi(T) of the current temperature (:func:`annealing_factor`)."""
        return annealing_factor(self.temperature, self.tau_max)

    def label(self, name: str) -> str:
        """``<name> T=5/7``."""
        return f"{name} T={self.temperature}/{self.tau_max}"


class AnnealingKD(Method):
    """Annealing-KD: stage I annealed logit MSE (no labels), stage II CE on the labels."""

    config_cls = AnnealingKDConfig
    config: AnnealingKDConfig

    def __init__(self, config: MethodConfig, teacher: ModelShape, student: ModelShape) -> None:
        """Start at T = tau_max."""
        super().__init__(config, teacher, student)
        self.clock = AnnealingClock(self.config.tau_max, self.config.epochs_per_temperature)

    @classmethod
    def check(
        cls,
        config: MethodConfig,
        teacher: ModelShape,
        student: ModelShape,
        training: TrainingSpec,
    ) -> None:
        """Stage I (k * tau_max epochs) must not exceed 200 epochs.

        Raises:
            SpecError: ``method.epochs_per_temperature`` when k * tau_max > 200.
        """
        super().check(config, teacher, student, training)
        c = config_as(config, AnnealingKDConfig)
        if c.tau_max * c.epochs_per_temperature > MAX_STAGE_ONE_EPOCHS:
            raise SpecError(
                "method.epochs_per_temperature",
                f"stage I would last epochs_per_temperature x tau_max = "
                f"{c.epochs_per_temperature} x {c.tau_max} epochs, more than "
                f"{MAX_STAGE_ONE_EPOCHS}",
            )

    def stages(self, training: TrainingSpec) -> list[Stage]:
        """Stage I (k * tau_max epochs, linear decay without warm-up, restores its best dev
        weights, does not select), then stage II (its own epochs, LR and linear decay without
        warm-up, selects). ``training.epochs``, ``warmup_ratio`` and ``schedule`` are not used."""
        c = self.config
        return [
            Stage(
                ANNEALING,
                loss=ANNEALING,
                epochs=c.tau_max * c.epochs_per_temperature,
                learning_rate=c.stage_one_learning_rate,
                warmup_ratio=0.0,
                schedule="linear",
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
            ),
        ]

    def begin_stage(self, stage: Stage) -> None:
        """Reset the temperature to tau_max; the stage's first epoch is taken from its first
        step (:meth:`start_step`)."""
        super().begin_stage(stage)
        self.clock.reset()

    def start_step(self, epoch: int, step: int) -> None:
        """Set T from the epoch within stage I (``epoch`` is 1-based over the whole job; the
        stage's first epoch is the one of its first step)."""
        if self.stage is None or self.stage.loss != ANNEALING:
            return
        self.clock.tick(epoch)

    def extra_state(self) -> dict[str, Any]:
        """The annealing clock (temperature and the stage's first epoch)."""
        return {"clock": self.clock.state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the annealing clock."""
        self.clock.load_state(state["clock"])

    def stage_label(self) -> str:
        """``annealing T=5/7`` in stage I, the stage's name in stage II."""
        if self.stage is not None and self.stage.loss == ANNEALING:
            return self.clock.label(self.stage.name)
        return super().stage_label()

    def schedule_warnings(self, stage_steps: list[int]) -> list[str]:
        """Warn when ``training.max_steps`` cuts stage I short, so T never reaches 1.

        Uncut, stage I has k * tau_max / stage_two_epochs times as many steps as stage II (both
        are whole epochs of the same data); fewer means the cap cut stage I.
        """
        c = self.config
        if len(stage_steps) != 2:
            return []
        first, second = stage_steps
        stage_one_epochs = c.tau_max * c.epochs_per_temperature
        if first * c.stage_two_epochs < second * stage_one_epochs:
            return [
                f"training.max_steps cuts annealing stage I to {first} steps: the temperature "
                f"will not anneal down to T=1 (stage I needs {stage_one_epochs} epochs)"
            ]
        return []

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        """Stage I: MSE(z_s, Phi(T) z_t) over logits (B, C), labels unused; stage II:
        ``ce_loss(z_s, y)``, teacher unused.

        Raises:
            ValueError: stage I without teacher outputs.
        """
        if self.stage is not None and self.stage.loss == LABELS:
            ce = ce_loss(student.logits, labels)
            return LossResult(total=ce, parts={"ce": ce.detach()})
        t = teacher_outputs(teacher, "annealing_kd")
        factor = self.clock.factor()
        mse = annealing_mse(student.logits, t.logits, factor)
        return LossResult(total=mse, parts={"annealed_mse": mse.detach()})


register("annealing_kd", AnnealingKD)
