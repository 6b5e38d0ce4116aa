"""``teacher_free``: Teacher-free KD with a manually designed virtual teacher (Tf-KD_reg; Yuan,
Tay, Li, Wang and Feng, "Revisiting Knowledge Distillation via Label Smoothing Regularization",
CVPR 2020, section 4).

L = (1 - alpha) CE(y, softmax(z_s)) + alpha * multiplier * KD(p^d, z_s; T), where the virtual
teacher p^d puts a on the gold class and (1 - a)/(C - 1) elsewhere. ``variant`` chooses the KD
term (:data:`kd_engine.losses.virtual_teacher.VirtualTeacherVariant`): ``authors_code``
(default) is what yuanli2333/Teacher-free-Knowledge-Distillation ``my_loss_function.py::
loss_kd_regularization`` computes, ``nn.KLDivLoss()(log_softmax(z_s), softmax(p^d / T))``, i.e.
KL(softmax(p^d / T) || softmax(z_s)) / C with no T^2, times ``multiplier``. ``paper`` (T^2
KL(softmax(log p^d / T) || softmax(z_s / T))) has no source that could be read (neither the
authors' code nor a readable text of the paper has it): it was the default of jobs submitted
before 2026-12-07 and is kept only so that their stored specs keep their meaning.

No teacher is run (``needs.teacher`` False): the job's teacher reference is still required, for
the tokenizer and, with a ``from_teacher`` student, for the student's initial weights; it may
be a base encoder (``builtin:minilm-l6``) as for ``finetune``. The self-KD mode of the paper
(Tf-KD_self: a first, normally trained student teaches a fresh one of the same architecture)
is the ``teacher_free_self`` chain variant, not this method. Classification only: a regression
task (one output) is rejected.

Defaults: one consistent configuration of the authors, their ResNet-18 CIFAR-100 run
(``experiments/base_experiments/base_resnet18/params.json``: ``reg_alpha`` 0.1,
``reg_temperature`` 20, ``multiplier`` 100.0) and a = 0.99 (``correct_prob``, hard-coded in
``loss_kd_regularization``). With the ``authors_code`` reduction (/ C) a multiplier of 100 on
C = 100 classes is the batch-mean KL; on C classes it is 100 / C times it. The authors' recipes
are for CIFAR-100 / Tiny-ImageNet CNNs; there is no NLP recipe.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from kd_engine.errors import SpecError
from kd_engine.losses import ce_loss
from kd_engine.losses.virtual_teacher import VirtualTeacherVariant, virtual_teacher_kd
from kd_engine.methods.base import LossResult, Method, MethodConfig, Needs, StepOutputs, config_as
from kd_engine.registry import register

if TYPE_CHECKING:
    from kd_engine.models.shapes import ModelShape
    from kd_engine.spec import TrainingSpec


class TeacherFreeConfig(MethodConfig):
    """Settings of ``teacher_free`` (sources in the module doc).

    Attributes:
        alpha: weight of the KD term, in [0, 1]; 1 - alpha weighs CE (``reg_alpha``, 0.1).
        temperature: T > 0 (``reg_temperature``, 20).
        correct_prob: a, the virtual teacher's probability of the gold class, in (1/C, 1)
            (``correct_prob`` 0.99).
        multiplier: extra factor on the KD term (``multiplier``, 100.0).
        variant: ``authors_code`` (default) or ``paper`` (no source; kept for stored jobs);
            see the module doc.
    """

    name: Literal["teacher_free"] = "teacher_free"
    alpha: float = Field(0.1, ge=0.0, le=1.0)
    temperature: float = Field(20.0, gt=0.0, le=100.0)
    correct_prob: float = Field(0.99, gt=0.0, lt=1.0)
    multiplier: float = Field(100.0, gt=0.0, le=1000.0)
    variant: VirtualTeacherVariant = "authors_code"


class TeacherFree(Method):
    """Tf-KD_reg: (1 - alpha) CE + alpha * multiplier * KD towards the virtual teacher."""

    needs = Needs(teacher=False)
    config_cls = TeacherFreeConfig
    config: TeacherFreeConfig

    @classmethod
    def check(
        cls,
        config: MethodConfig,
        teacher: ModelShape,
        student: ModelShape,
        training: TrainingSpec,
    ) -> None:
        """Classification only, and the gold class must be the virtual teacher's most likely.

        Raises:
            SpecError: ``method.name`` for a regression task (one output: there is no class
                distribution to smooth); ``method.correct_prob`` when a <= 1/C.
        """
        super().check(config, teacher, student, training)
        c = config_as(config, TeacherFreeConfig)
        n = student.num_labels
        if n == 1:
            raise SpecError(
                "method.name",
                "teacher_free distils from a virtual class distribution and needs a "
                "classification task; this is a regression task (one output). Use finetune "
                "or annealing_kd",
            )
        if c.correct_prob <= 1.0 / n:
            raise SpecError(
                "method.correct_prob",
                f"{c.correct_prob} is not above 1/C = {1.0 / n:.4g} for {n} classes, so the "
                "virtual teacher would not favour the gold class",
            )

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        """Loss from the student logits (B, C) and labels (B,); the teacher is not used.

        Raises:
            ValueError: the logits and labels do not fit (see
                :func:`kd_engine.losses.virtual_teacher.virtual_teacher_kd`).
        """
        c = self.config
        ce = ce_loss(student.logits, labels)
        kd = virtual_teacher_kd(
            student.logits, labels, c.correct_prob, c.temperature, variant=c.variant
        )
        total = (1.0 - c.alpha) * ce + c.alpha * c.multiplier * kd
        return LossResult(total=total, parts={"ce": ce.detach(), "kd": kd.detach()})


register("teacher_free", TeacherFree)
