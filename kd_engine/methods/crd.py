"""``crd``: CILDA's in-batch contrastive intermediate-layer loss L_CRD (Haidar et al., "CILDA:
Contrastive Data Augmentation using Intermediate Layer Knowledge Distillation", COLING 2022,
section 3), used on its own, beside CE and soft targets:

    L = w_ce CE(y, softmax(z_s)) + w_kd tau^2 KL(softmax(z_t/tau) || softmax(z_s/tau))
        + w_crd L_CRD

    L_CRD = mean_k -log( exp(cos(h_T^k, h_S^k)/tau2) / sum_j exp(cos(h_T^k, h_S^j)/tau2) )

over the examples k, j of the batch (positives: the same example; negatives: the rest of the
batch, whatever their class). h is the concatenation of every transformer layer's [CLS] state
(embeddings excluded), linearly projected to ``projection_size`` (128) and L2-normalised; the
two projections (W_T: n d_t -> u, W_S: m d_s -> u) are learned with the student.
:class:`CRDHead` holds them and computes L_CRD from two models' outputs, so that CILDA can
reuse it.

What this is NOT: it is not CoDIR (Sun et al., "Contrastive Distillation on Intermediate
Representations for Language Model Compression", EMNLP 2020; intersun/CoDIR,
``fairseq/criterions/sentence_prediction_crd.py``), which keeps a memory bank of teacher
representations updated with momentum, draws K negatives only from examples of OTHER classes,
uses tau 0.07 and the symmetric NCE loss of Tian et al.'s CRD. Here the negatives are only the
other examples of the current batch (so a batch of one has none, and same-class examples count
as negatives), there is no memory bank, and tau2 = 2 is CILDA's.

CILDA applies L_CRD in the generator's (max) step on augmented inputs; this method applies it
to the training inputs, as a plain contrastive intermediate-layer KD. The weights (1/3 each)
and tau = 1 are our defaults (CILDA's min step weighs its three original-sample terms equally
and uses tau1 = 1); tau2 = 2 is CILDA's. No official CILDA code was published; projections
have no bias.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from kd_engine.losses import ce_loss, kd_loss
from kd_engine.losses.crd import crd_loss
from kd_engine.methods.base import (
    LossResult,
    Method,
    MethodConfig,
    Needs,
    StepOutputs,
    teacher_outputs,
)
from kd_engine.methods.layer_maps import cls_pool, linear_projection, paired_states
from kd_engine.registry import register
from kd_engine.stages import ParamGroup

if TYPE_CHECKING:
    from kd_engine.models.shapes import ModelShape


class CRDHead(torch.nn.Module):
    """The two projections of L_CRD and the loss between two models' outputs.

    Args:
        teacher: the teacher's shape (n layers of width d_t).
        student: the student's shape (m layers of width d_s).
        projection_size: u.
    """

    def __init__(self, teacher: ModelShape, student: ModelShape, projection_size: int) -> None:
        super().__init__()
        self.num_layers = (student.num_layers, teacher.num_layers)
        self.student = linear_projection(student.num_layers * student.hidden_size, projection_size)
        self.teacher = linear_projection(teacher.num_layers * teacher.hidden_size, projection_size)

    def forward(
        self, student: StepOutputs, teacher: StepOutputs, temperature: float, method: str = "crd"
    ) -> torch.Tensor:
        """L_CRD between the concatenated [CLS] states of the two models (scalar, nats).

        Raises:
            ValueError: hidden states are missing, or their layer counts differ from the shapes
                the head was built for.
        """
        s_states, t_states = paired_states(student, teacher, method, self.num_layers)
        h_s = torch.cat([cls_pool(h) for h in s_states], dim=-1)
        h_t = torch.cat([cls_pool(h) for h in t_states], dim=-1)
        return crd_loss(self.student(h_s), self.teacher(h_t), temperature)


class CRDConfig(MethodConfig):
    """Settings of ``crd``.

    Attributes:
        projection_size: u, the width both concatenations are projected to.
        crd_temperature: tau2 of L_CRD.
        ce_weight, kd_weight, crd_weight: weights of CE, soft targets and L_CRD.
        temperature: tau of the soft-target term.
    """

    name: Literal["crd"] = "crd"
    projection_size: int = Field(128, ge=1, le=8192)
    crd_temperature: float = Field(2.0, gt=0.0, le=100.0)
    ce_weight: float = Field(1 / 3, ge=0.0, le=1000.0)
    kd_weight: float = Field(1 / 3, ge=0.0, le=1000.0)
    crd_weight: float = Field(1 / 3, ge=0.0, le=1000.0)
    temperature: float = Field(1.0, gt=0.0, le=100.0)


class CRD(Method):
    """CE + soft targets + CILDA's in-batch contrastive loss on concatenated, projected [CLS]
    states."""

    needs = Needs(hidden_states=True)
    config_cls = CRDConfig
    config: CRDConfig

    def __init__(self, config: MethodConfig, teacher: ModelShape, student: ModelShape) -> None:
        """Build the two projections for these shapes (call :meth:`check` first)."""
        super().__init__(config, teacher, student)
        self.head = CRDHead(teacher, student, self.config.projection_size)

    def param_groups(self) -> list[ParamGroup]:
        """The two projections as group ``crd_head`` (no weight decay, the engine's rule for
        projections)."""
        return [ParamGroup("crd_head", [self.head])]

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        """Loss from logits (B, C), hidden states (m + 1 and n + 1 tensors (B, T, d)), labels.

        Raises:
            ValueError: no teacher outputs or hidden states, or their layer counts differ from
                the models the method was built for.
        """
        t_out = teacher_outputs(teacher, "crd")
        c = self.config
        crd = self.head(student, t_out, c.crd_temperature)
        ce = ce_loss(student.logits, labels)
        kd = kd_loss(student.logits, t_out.logits, c.temperature)
        total = c.ce_weight * ce + c.kd_weight * kd + c.crd_weight * crd
        parts = {"ce": ce.detach(), "kd": kd.detach(), "crd": crd.detach()}
        return LossResult(total=total, parts=parts)


register("crd", CRD)
