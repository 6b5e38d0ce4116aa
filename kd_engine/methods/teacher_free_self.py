"""``teacher_free_self``: Tf-KD_self of Yuan et al., CVPR 2020, "Revisiting Knowledge
Distillation via Label Smoothing Regularization" (authors' code
yuanli2333/Teacher-free-Knowledge-Distillation).

Self-KD in two hops: the student's architecture is first trained with CE alone (``finetune``,
the "pretrained teacher" the authors load from ``experiments/pretrained_teacher_models``); that
model then teaches a newly built student of the same spec with
L = (1 - alpha) CE + alpha T^2 KL(softmax(z_t/T) || softmax(z_s/T)) (``my_loss_function.py::
loss_kd_self``). The job's teacher is not a KD teacher here: it only provides the tokenizer and,
for ``from_teacher`` students, the layers (it may be a base encoder, as for ``finetune``).

The virtual-teacher variant (Tf-KD_reg) is ``teacher_free``.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from kd_engine.methods.base import MethodConfig, Needs, config_as
from kd_engine.methods.chain import ChainMethod, Hop
from kd_engine.methods.finetune import FinetuneConfig
from kd_engine.methods.vanilla_kd import VanillaKDConfig
from kd_engine.models.shapes import ModelShape
from kd_engine.registry import register


class TeacherFreeSelfConfig(MethodConfig):
    """Settings of ``teacher_free_self``.

    Attributes:
        alpha: weight of the KD term of the second run (1 - alpha weighs CE). Default 0.95: the
            authors' self-teacher settings (``experiments/kd_experiments/*_self_teacher/
            params.json``) use 0.95 for ResNet18/50, MobileNetV2 and ShuffleNetV2 (0.9, 0.4,
            0.1 for others).
        temperature: T of the second run. Default 20: the value of most of those settings
            (6 for ResNet18/50). The authors' extra ``multiplier`` of the KD term ("1.0 in most
            of cases") is fixed at 1; their KL is ``nn.KLDivLoss()``'s elementwise mean, ours the
            per-example KL (``vanilla_kd``), C times larger for C classes.
    """

    name: Literal["teacher_free_self"] = "teacher_free_self"
    alpha: float = Field(0.95, ge=0.0, le=1.0)
    temperature: float = Field(20.0, gt=0.0, le=100.0)


class TeacherFreeSelf(ChainMethod):
    """A CE run of the student's spec, then KD from it into a new student of the same spec."""

    needs = Needs(teacher=False)
    config_cls = TeacherFreeSelfConfig
    config: TeacherFreeSelfConfig

    @classmethod
    def hops(cls, config: MethodConfig, teacher: ModelShape, student: ModelShape) -> list[Hop]:
        """``self_teacher`` (finetune, no teacher) then ``student`` (vanilla KD from it), both
        built from the job's student spec: a ``from_teacher`` student starts both runs from the
        same weights; a ``fresh`` one's random weights (a ``pretrained`` one's new head) are
        drawn anew for the second run, as the authors' second network is a fresh one."""
        c = config_as(config, TeacherFreeSelfConfig)
        kd = VanillaKDConfig(alpha=c.alpha, temperature=c.temperature)
        return [
            Hop("self_teacher", None, student, FinetuneConfig(), "none"),
            Hop("student", None, student, kd, "previous"),
        ]


register("teacher_free_self", TeacherFreeSelf)
