"""``universal_kd``: Wu, Rezagholizadeh, Ghaddar, Haidar and Ghodsi, "Universal-KD:
Attention-based Output-Grounded Intermediate Layer Knowledge Distillation", EMNLP 2021.

Intermediate layers are matched in the output space: a pseudo classifier on every layer of the
teacher and of the student maps the layer's pooled representation (B, d) to label logits (B, C);
each student layer attends over the teacher layers' pseudo logits (the attention-based layer
projection of ALP-KD) and learns their fused distribution by KL (see
:mod:`kd_engine.losses.universal_kd`). Nothing compares hidden vectors of the two models, so the
student may have another width or architecture (a BiLSTM or CNN student included).

With h^k the pooled state of layer k (0-based transformer layers, embeddings excluded; the LSTM
layers of a BiLSTM, the convolution block of a CNN):

    z_T^k = P_T^k(h_T^k)   (B, C), teacher pseudo classifiers over the frozen teacher
    z_S^j = P_S^j(h_S^j)   (B, C), student pseudo classifiers

Two stages (:meth:`UniversalKD.stages`):

1. ``universal_kd teacher probes``: L_probe = mean_k CE(y, softmax(z_T^k)). Only the teacher's
   pseudo classifiers train (the teacher's own weights never change; the student is frozen), at
   their own LR ``probe_learning_rate`` for ``probe_epochs`` epochs (or ``probe_steps`` steps),
   without warm-up. The stage does not evaluate or select the checkpoint: the student has not
   changed.
2. ``universal_kd distil``: the teacher's probes are frozen and
   L_UKD = sum_j tau_u^2 KL(softmax(sum_k alpha_jk z_T^k / tau_u) || softmax(z_S^j / tau_u))
   L = w_ce CE(y, softmax(z_s)) + w_kd tau^2 KL(softmax(z_t/tau) || softmax(z_s/tau)) + w_ukd L_UKD
   trains the student and its pseudo classifiers (those at ``student_probe_learning_rate``) for
   ``training.epochs`` epochs with the job's optimiser settings.

Why a stage of its own: the teacher's probes start at zero (uniform predictions). Trained jointly
at the student's LR under its warm-up, they were still near-uniform when L_UKD switched on, so
the student copied uninformative targets. Fitting them first on the frozen teacher's features (a
convex logistic regression per layer) and freezing them gives fixed, label-informed targets from
the first distillation step.

Pseudo classifiers are linear probes d -> C (with bias), zero-initialised. Pooling of a layer
(``pooling: auto``): the masked mean over real tokens for a transformer, masked max over time for
a BiLSTM or CNN (Kim's pooling; padding excluded). Mean rather than [CLS] for transformers was
decided by a measurement (``bench/probe_pooling.py``, docs/benchmarks.md): on the fine-tuned
MiniLM-L6 Rotten Tomatoes teacher, logistic probes on the [CLS] states of layers 0-2 stay at the
majority class (dev accuracy 0.578) while mean-pooled states reach 0.74-0.81; from layer 3 on the
two are close. They are created by the constructor, returned
as the parameter groups ``teacher_probes`` and ``student_probes``, and not exported.

Where this differs from, or decides beyond, the paper: no official code was published and only
the abstract of the paper was reachable (its full text could not be consulted), so the probe
architecture, the pooling per architecture, the probe stage and its LRs, and the loss weights are
ours and documented in docs/methods.md: the weights default to the same group's CKD/ALP-KD
example (0.1 CE, 0.2 KD, 0.7 intermediate) and tau = 1; the attention scores are dot products of
the pseudo logits. A regression task (one output) is rejected: a softmax over one logit is
constant, so the pseudo classifiers' KL would be zero.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import Field

from kd_engine.errors import SpecError
from kd_engine.losses import ce_loss, kd_loss
from kd_engine.losses.universal_kd import Attend, ukd_loss
from kd_engine.methods.base import (
    LossResult,
    Method,
    MethodConfig,
    Needs,
    StepOutputs,
    config_as,
    teacher_outputs,
)
from kd_engine.methods.layer_maps import TeacherLayerSet, check_layer
from kd_engine.registry import register
from kd_engine.stages import STUDENT, ParamGroup, Stage

if TYPE_CHECKING:
    from kd_engine.models.shapes import ModelShape
    from kd_engine.spec import TrainingSpec

Pooling = Literal["auto", "cls", "mean", "max"]

TEACHER_PROBES = "teacher_probes"
"""Parameter group of the teacher's pseudo classifiers (trained in stage 1 only)."""
STUDENT_PROBES = "student_probes"
"""Parameter group of the student's pseudo classifiers (trained in stage 2 with the student)."""
PROBE_LOSS = "probes"
"""Stage loss key of stage 1 (L_probe)."""
DISTIL_LOSS = "distil"
"""Stage loss key of stage 2 (CE + KD + L_UKD)."""


class UniversalKDConfig(MethodConfig):
    """Settings of ``universal_kd``.

    Attributes:
        ce_weight: w_ce, weight of CE on the student's logits.
        kd_weight: w_kd, weight of the soft-target term on the final logits.
        ukd_weight: w_ukd, weight of L_UKD.
        temperature: tau of the soft-target term on the final logits.
        ukd_temperature: tau_u of the pseudo classifiers' distributions.
        attend: ``logits`` (fuse the teacher pseudo logits, the paper's choice) or ``loss``
            (fuse the per-pair KL terms, the paper's ablation).
        pooling: how a layer becomes one vector per example: ``auto`` (masked mean for a
            transformer, masked max over time for a BiLSTM/CNN; measured, see the module doc),
            or ``cls``/``mean``/``max`` for both models.
        probe_epochs: length of stage 1 (fitting the teacher's pseudo classifiers) in epochs.
            Default 1: every training example is seen once, which at the default LR is a few
            hundred steps on a dataset of thousands (our choice; the paper's schedule is
            unknown).
        probe_steps: when set, stage 1's length in optimiser steps instead of ``probe_epochs``.
        probe_learning_rate: LR of stage 1 (AdamW, no warm-up, linear decay, no weight decay).
            Default 1e-2, measured (not from the paper): linear probes from zero on the
            mean-pooled layers of MiniLM-L6 over 128 rotten_tomatoes examples, batch 8, reach
            0.62-0.78 training accuracy after 200 steps at 1e-3 but 0.93-0.98 at 1e-2 (0.70-0.84
            after 50 steps); Adam's steps scale with the LR, so the job's 5e-5 would be 200x
            slower. A linear probe on fixed features is a convex fit, so the larger rate is safe.
        student_probe_learning_rate: fixed LR of the student's pseudo classifiers in stage 2
            (they follow the stage's warm-up and decay); None = the stage's LR (the student's).
            Default 1e-2, as for the teacher's: they start at zero, and while their weights are
            near zero they pass almost no gradient of L_UKD to the student's layers.
        teacher_layers: the teacher layers (0-based, embeddings excluded) with a pseudo
            classifier that the student attends over; None = every layer.
    """

    name: Literal["universal_kd"] = "universal_kd"
    ce_weight: float = Field(0.1, ge=0.0, le=1000.0)
    kd_weight: float = Field(0.2, ge=0.0, le=1000.0)
    ukd_weight: float = Field(0.7, ge=0.0, le=1000.0)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    ukd_temperature: float = Field(1.0, gt=0.0, le=100.0)
    attend: Attend = "logits"
    pooling: Pooling = "auto"
    probe_epochs: int = Field(1, ge=1, le=100)
    probe_steps: int | None = Field(None, ge=1, le=1_000_000)
    probe_learning_rate: float = Field(1e-2, gt=0.0, le=1.0)
    student_probe_learning_rate: float | None = Field(1e-2, gt=0.0, le=1.0)
    teacher_layers: TeacherLayerSet | None = Field(None, min_length=1, max_length=128)


def pool_layer(
    hidden: torch.Tensor, attention_mask: torch.Tensor, how: Literal["cls", "mean", "max"]
) -> torch.Tensor:
    """One vector per example from a layer's states.

    Args:
        hidden: (B, T, d).
        attention_mask: (B, T), 1 for real tokens and 0 for padding.
        how: ``cls`` the first token's state, ``mean`` the mean of the real tokens' states,
            ``max`` their element-wise maximum.

    Returns:
        (B, d), float32, a new tensor (teacher states made under ``torch.inference_mode`` may
        then take part in autograd).

    Raises:
        ValueError: the mask's shape is not (B, T).
    """
    if attention_mask.shape != hidden.shape[:2]:
        raise ValueError(
            f"attention mask {tuple(attention_mask.shape)} does not fit hidden states "
            f"{tuple(hidden.shape)}"
        )
    h = hidden.float()
    if how == "cls":
        return h[:, 0, :].clone()
    real = attention_mask.to(device=h.device).bool().unsqueeze(-1)
    if how == "mean":
        return (h * real).sum(dim=1) / real.sum(dim=1).clamp(min=1)
    pooled = h.masked_fill(~real, float("-inf")).amax(dim=1)
    return torch.where(torch.isfinite(pooled), pooled, torch.zeros_like(pooled))


def _probes(width: int, num_labels: int, count: int) -> torch.nn.ModuleList:
    """``count`` zero-initialised linear pseudo classifiers d -> C."""
    probes = [torch.nn.Linear(width, num_labels) for _ in range(count)]
    for probe in probes:
        torch.nn.init.zeros_(probe.weight)
        torch.nn.init.zeros_(probe.bias)
    return torch.nn.ModuleList(probes)


class UniversalKD(Method):
    """Universal-KD: teacher probes fitted first, then CE + soft targets + output-space
    matching of intermediate layers."""

    config_cls = UniversalKDConfig
    config: UniversalKDConfig
    needs = Needs(hidden_states=True)
    any_student_architecture = True

    @classmethod
    def check(
        cls,
        config: MethodConfig,
        teacher: ModelShape,
        student: ModelShape,
        training: TrainingSpec,
    ) -> None:
        """Check the models fit (allocates nothing).

        Raises:
            SpecError: ``teacher`` or ``student.num_layers`` for a model without layers;
                ``student`` when the models disagree on the number of classes; ``method.name``
                for a regression task (one output); ``method.teacher_layers`` for a layer the
                teacher lacks.
        """
        super().check(config, teacher, student, training)
        c = config_as(config, UniversalKDConfig)
        if teacher.num_layers < 1:
            raise SpecError("teacher", "universal_kd needs a teacher with at least one layer")
        if student.num_layers < 1:
            raise SpecError(
                "student.num_layers", "universal_kd needs a student with at least one layer"
            )
        if teacher.num_labels != student.num_labels:
            raise SpecError(
                "student",
                f"it has {student.num_labels} outputs and the teacher {teacher.num_labels}",
            )
        if teacher.num_labels == 1:
            raise SpecError(
                "method.name",
                "universal_kd matches the pseudo classifiers' class distributions, and a "
                "regression task has one output, whose softmax is constant (the KL is always "
                "zero); use vanilla_kd or an intermediate-layer method such as pkd",
            )
        for k in c.teacher_layers or []:
            check_layer("method.teacher_layers", k, teacher.num_layers, "teacher")

    def __init__(self, config: MethodConfig, teacher: ModelShape, student: ModelShape) -> None:
        """Build the pseudo classifiers (zero-initialised) for these shapes."""
        super().__init__(config, teacher, student)
        c = self.config
        self.teacher_layers: list[int] = list(c.teacher_layers or range(teacher.num_layers))
        self.teacher_probes = _probes(
            teacher.hidden_size, teacher.num_labels, len(self.teacher_layers)
        )
        self.student_probes = _probes(student.hidden_size, student.num_labels, student.num_layers)
        self._pool_teacher = self._pooling(teacher)
        self._pool_student = self._pooling(student)
        self._loss = DISTIL_LOSS

    def _pooling(self, shape: ModelShape) -> Literal["cls", "mean", "max"]:
        how = self.config.pooling
        if how == "auto":
            return "mean" if shape.transformer else "max"
        return how

    def stages(self, training: TrainingSpec) -> list[Stage]:
        """Stage 1 fits the teacher's probes (``probe_epochs`` or ``probe_steps``, at
        ``probe_learning_rate``, no warm-up, no evaluation); stage 2 distils for
        ``training.epochs`` epochs with the job's optimiser settings."""
        c = self.config
        probes = Stage(
            name="universal_kd teacher probes",
            loss=PROBE_LOSS,
            epochs=None if c.probe_steps is not None else c.probe_epochs,
            steps=c.probe_steps,
            learning_rate=c.probe_learning_rate,
            warmup_ratio=0.0,
            schedule="linear",
            trains=(TEACHER_PROBES,),
            selects_best=False,
            evaluate=False,
        )
        distil = Stage(
            name="universal_kd distil",
            loss=DISTIL_LOSS,
            epochs=training.epochs,
            trains=(STUDENT, STUDENT_PROBES),
        )
        return [probes, distil]

    def begin_stage(self, stage: Stage) -> None:
        """Switch to the stage's loss (``probes`` or ``distil``).

        Raises:
            ValueError: a stage loss this method does not have.
        """
        if stage.loss not in (PROBE_LOSS, DISTIL_LOSS):
            raise ValueError(f"universal_kd has no stage loss {stage.loss!r}")
        super().begin_stage(stage)
        self._loss = stage.loss

    def param_groups(self) -> list[ParamGroup]:
        """``teacher_probes`` (at the stage's LR, i.e. ``probe_learning_rate`` in stage 1) and
        ``student_probes`` (at ``student_probe_learning_rate``); no weight decay."""
        return [
            ParamGroup(TEACHER_PROBES, [self.teacher_probes]),
            ParamGroup(
                STUDENT_PROBES,
                [self.student_probes],
                learning_rate=self.config.student_probe_learning_rate,
            ),
        ]

    def _layers(self, outputs: StepOutputs, who: str, expected: int) -> tuple[torch.Tensor, ...]:
        if outputs.hidden_states is None:
            raise ValueError(
                f"universal_kd needs the {who}'s hidden states (output_hidden_states=True)"
            )
        states = tuple(outputs.hidden_states[1:])  # embeddings dropped
        if len(states) != expected:
            raise ValueError(
                f"universal_kd was built for a {who} with {expected} layers but got "
                f"{len(states)} layer states"
            )
        return states

    def teacher_pseudo_logits(
        self, teacher: StepOutputs, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The teacher's pseudo logits (B, n', C), n' the attended teacher layers. Gradients
        reach the probes only (the teacher's states are detached).

        Raises:
            ValueError: hidden states are missing or of another count or width than built for.
        """
        states = self._layers(teacher, "teacher", self.teacher_shape.num_layers)
        try:
            return torch.stack(
                [
                    probe(pool_layer(states[k], attention_mask, self._pool_teacher).detach())
                    for k, probe in zip(self.teacher_layers, self.teacher_probes, strict=True)
                ],
                dim=1,
            )
        except RuntimeError as e:  # a width other than the built one
            raise ValueError(
                f"universal_kd: teacher hidden states do not fit the built shapes ({e})"
            ) from None

    def student_pseudo_logits(
        self, student: StepOutputs, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """The student's pseudo logits (B, m, C), with gradients to its states and probes.

        Raises:
            ValueError: hidden states are missing or of another count or width than built for.
        """
        states = self._layers(student, "student", len(self.student_probes))
        try:
            return torch.stack(
                [
                    probe(pool_layer(h, attention_mask, self._pool_student))
                    for h, probe in zip(states, self.student_probes, strict=True)
                ],
                dim=1,
            )
        except RuntimeError as e:
            raise ValueError(
                f"universal_kd: student hidden states do not fit the built shapes ({e})"
            ) from None

    def probe_loss(
        self, teacher: StepOutputs, labels: torch.Tensor, attention_mask: torch.Tensor
    ) -> LossResult:
        """Stage 1: L_probe = mean_k CE(y, softmax(z_T^k)) over the attended teacher layers;
        parts ``probe_ce`` and ``probe_acc`` (mean accuracy of the probes on the batch)."""
        z_t = self.teacher_pseudo_logits(teacher, attention_mask)
        n = z_t.shape[1]
        probe_ce = torch.stack([F.cross_entropy(z_t[:, k].float(), labels) for k in range(n)])
        acc = (z_t.detach().argmax(dim=-1) == labels.unsqueeze(1)).float().mean()
        return LossResult(
            total=probe_ce.mean(),
            parts={"probe_ce": probe_ce.mean().detach(), "probe_acc": acc},
        )

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        """The current stage's loss (``distil`` before any stage began) from logits (B, C),
        hidden states (m + 1 and n + 1 tensors (B, T, d), embeddings first), labels (B,) and
        the attention mask (B, T).

        Raises:
            ValueError: no teacher outputs or hidden states, or the layer counts or widths
                differ from those the method was built for.
        """
        t_out = teacher_outputs(teacher, "universal_kd")
        if self._loss == PROBE_LOSS:
            return self.probe_loss(t_out, labels, attention_mask)
        c = self.config
        with torch.no_grad():  # the teacher's probes are fixed targets in this stage
            z_t = self.teacher_pseudo_logits(t_out, attention_mask)
        z_s = self.student_pseudo_logits(student, attention_mask)
        ce = ce_loss(student.logits, labels)
        kd = kd_loss(student.logits, t_out.logits, c.temperature)
        ukd = ukd_loss(z_s, z_t, c.ukd_temperature, c.attend)
        total = c.ce_weight * ce + c.kd_weight * kd + c.ukd_weight * ukd
        parts = {"ce": ce.detach(), "kd": kd.detach(), "ukd": ukd.detach()}
        return LossResult(total=total, parts=parts)


register("universal_kd", UniversalKD)
