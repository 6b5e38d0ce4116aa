"""``alp_kd``: Passban, Wu, Rezagholizadeh and Liu, "ALP-KD: Attention-Based Layer Projection
for Knowledge Distillation", AAAI 2021.

    L = beta CE(y, softmax(z_s)) + eta tau^2 KL(softmax(z_t/tau) || softmax(z_s/tau))
        + lambda L_ALP,        L_ALP = sum_j MSE(h_S^j, sum_{k in A(j)} alpha_jk h_T^k)

with h the [CLS] state of each transformer layer (embeddings excluded) and alpha_jk the
softmax over k in A(j) of h_S^j . h_T^k (see :mod:`kd_engine.losses.alp`).

Variants (the set A(j) of teacher layers student layer j attends to):

- ``alp``: every teacher layer (the paper's main model).
- ``alp_no`` ("no overlap"): the teacher layers are cut into m contiguous buckets, one per
  student layer, nearly equal in size, the larger ones first (12 -> 4: {0,1,2}, {3,4,5}, ...).
- ``alp_po`` ("partial overlap"): the same buckets, each widened by ``overlap`` layers into
  each neighbouring bucket (12 -> 4, overlap 1: {0..3}, {2..6}, {5..9}, {8..11}). The widening
  follows the "overlap" grouping of the authors' group's CKD code (yimeng0701/CKD_pytorch,
  6 -> 2: [1,2,3,4] -> 1, [3,4,5,6] -> 2).
- ``buckets`` replaces the computed sets of ``alp_no``/``alp_po`` by explicit ones.

Layer indices are 0-based transformer layers (layer k is ``hidden_states[k + 1]``).

Where we had to decide (the paper's full text and the authors' code were not reachable: only
the abstract and third-party reimplementations): the KD term is Hinton's tau^2 KL (the paper
writes the soft cross-entropy, which has the same gradient); when the hidden sizes differ, one
learned linear map W (d_s -> d_t, no bias, shared by the student layers) projects the student's
vectors before attention and MSE (the paper's students share the teacher's width); the default
weights (beta 0.1, eta 0.2, lambda 0.7) follow the example of the same group's CKD code, the
paper tunes them per task.

Default ``score_scale="sqrt_d"`` (scores divided by sqrt(d_t)), decided by a measurement
(``python -m bench.alp_attention``, docs/benchmarks.md "ALP-KD attention over teacher layers"):
with the built-in MiniLM-L6 teacher (d = 384) and students cut from its layers, on 64 Rotten
Tomatoes sentences, raw dot products give every student layer a mean largest weight of
0.96-0.998 and an entropy of 0.01-0.16 nats (uniform: ln 6 = 1.79), all on the same teacher
layer (the one with the largest [CLS] norm) for every example: a hard layer selection. Divided
by sqrt(384) the largest weight is 0.26-0.35 and the entropy 1.55-1.73 nats: a soft mixture
over teacher layers, which is what the paper's attention is meant to give. ``none`` (raw dot
products, the formula as the abstract-level sources write it) remains available.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field, model_validator

from kd_engine.errors import SpecError
from kd_engine.losses import ce_loss, kd_loss
from kd_engine.losses.alp import alp_loss
from kd_engine.methods.base import (
    LossResult,
    Method,
    MethodConfig,
    Needs,
    StepOutputs,
    config_as,
    teacher_outputs,
)
from kd_engine.methods.layer_maps import (
    check_layer,
    cls_pool,
    contiguous_buckets,
    linear_projection,
    paired_states,
)
from kd_engine.registry import register
from kd_engine.stages import ParamGroup

if TYPE_CHECKING:
    from kd_engine.models.shapes import ModelShape
    from kd_engine.spec import TrainingSpec


class ALPKDConfig(MethodConfig):
    """Settings of ``alp_kd``.

    Attributes:
        variant: ``alp`` (every teacher layer), ``alp_no`` (non-overlapping buckets) or
            ``alp_po`` (buckets overlapping by ``overlap`` layers).
        overlap: ``alp_po`` only: layers each bucket borrows from each neighbour.
        buckets: ``alp_no``/``alp_po`` only: explicit A(j), one non-empty list of 0-based
            teacher layers per student layer (replaces the computed buckets).
        ce_weight: beta, weight of CE with the gold labels.
        kd_weight: eta, weight of the soft-target term.
        alp_weight: lambda, weight of L_ALP.
        temperature: tau of the soft-target term.
        score_scale: ``sqrt_d`` (default: divide the dot products by sqrt(d_t), a soft
            attention over layers) or ``none`` (raw dot products, nearly one-hot on real
            models; see the module doc for the measurement).
    """

    name: Literal["alp_kd"] = "alp_kd"
    variant: Literal["alp", "alp_no", "alp_po"] = "alp"
    overlap: int = Field(1, ge=1, le=48)
    buckets: list[list[int]] | None = Field(None, min_length=1, max_length=48)
    ce_weight: float = Field(0.1, ge=0.0, le=1000.0)
    kd_weight: float = Field(0.2, ge=0.0, le=1000.0)
    alp_weight: float = Field(0.7, ge=0.0, le=1000.0)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    score_scale: Literal["none", "sqrt_d"] = "sqrt_d"

    @model_validator(mode="after")
    def _buckets_fit_variant(self) -> ALPKDConfig:
        if self.buckets is not None:
            if self.variant == "alp":
                raise ValueError("buckets is for the alp_no and alp_po variants (alp uses all)")
            if any(not b for b in self.buckets):
                raise ValueError("every bucket needs at least one teacher layer")
            if any(k < 0 for b in self.buckets for k in b):
                raise ValueError("teacher layer indices are 0-based and must be >= 0")
        return self


def alp_buckets(variant: str, n_teacher: int, n_student: int, overlap: int) -> list[list[int]]:
    """A(j) for every student layer j (0-based teacher layers).

    Raises:
        SpecError: ``method.variant``: ``alp_no``/``alp_po`` with fewer teacher than student
            layers.
    """
    if variant == "alp":
        return [list(range(n_teacher)) for _ in range(n_student)]
    if n_teacher < n_student:
        raise SpecError(
            "method.variant",
            f"{variant} gives each student layer its own teacher layers, but the teacher has "
            f"{n_teacher} layers and the student {n_student}",
        )
    buckets = contiguous_buckets(n_teacher, n_student)
    if variant == "alp_no":
        return buckets
    return [
        list(range(max(0, b[0] - overlap), min(n_teacher, b[-1] + 1 + overlap))) for b in buckets
    ]


def alp_sets(config: ALPKDConfig, teacher: ModelShape, student: ModelShape) -> list[list[int]]:
    """A(j) for these models: the explicit ``buckets`` or the variant's. Pure: used by
    :meth:`ALPKD.check` and the constructor.

    Raises:
        SpecError: ``method.buckets`` (not one bucket per student layer, or a layer the teacher
            lacks) or ``method.variant`` (see :func:`alp_buckets`).
    """
    n, m = teacher.num_layers, student.num_layers
    if config.buckets is None:
        return alp_buckets(config.variant, n, m, config.overlap)
    if len(config.buckets) != m:
        raise SpecError(
            "method.buckets",
            f"gives {len(config.buckets)} buckets but the student has {m} layers (one bucket "
            "per student layer)",
        )
    for bucket in config.buckets:
        for k in bucket:
            check_layer("method.buckets", k, n, "teacher")
    return [list(b) for b in config.buckets]


class ALPKD(Method):
    """ALP-KD: CE + soft targets + attention-fused teacher layers matched by MSE."""

    needs = Needs(hidden_states=True)
    config_cls = ALPKDConfig
    config: ALPKDConfig

    @classmethod
    def check(
        cls,
        config: MethodConfig,
        teacher: ModelShape,
        student: ModelShape,
        training: TrainingSpec,
    ) -> None:
        """Check A(j) against these models; allocates nothing.

        Raises:
            SpecError: a non-transformer student (``student``), or buckets that do not fit
                (``method.buckets``, ``method.variant``).
        """
        super().check(config, teacher, student, training)
        alp_sets(config_as(config, ALPKDConfig), teacher, student)

    def __init__(self, config: MethodConfig, teacher: ModelShape, student: ModelShape) -> None:
        """Compute A(j) as an (m, n) mask and, if the widths differ, build W (d_s -> d_t, no
        bias). Call :meth:`check` first.

        Raises:
            SpecError: the buckets do not fit the models.
        """
        super().__init__(config, teacher, student)
        c = self.config
        n, m = teacher.num_layers, student.num_layers
        self.allowed = torch.zeros(m, n, dtype=torch.bool)  # (m, n): True where k is in A(j)
        for j, bucket in enumerate(alp_sets(c, teacher, student)):
            self.allowed[j, bucket] = True
        self.projection = (
            linear_projection(student.hidden_size, teacher.hidden_size)
            if student.hidden_size != teacher.hidden_size
            else None
        )
        self.score_divisor = math.sqrt(teacher.hidden_size) if c.score_scale == "sqrt_d" else 1.0

    def param_groups(self) -> list[ParamGroup]:
        """The projection W as group ``alp_projection`` when the widths differ (no weight
        decay, the engine's rule for projections)."""
        if self.projection is None:
            return []
        return [ParamGroup("alp_projection", [self.projection])]

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
        t_out = teacher_outputs(teacher, "alp_kd")
        m, n = self.allowed.shape
        s_states, t_states = paired_states(student, t_out, "alp_kd", (m, n))
        h_s = torch.stack([cls_pool(h) for h in s_states], dim=1)  # (B, m, d_s)
        h_t = torch.stack([cls_pool(h) for h in t_states], dim=1)  # (B, n, d_t)
        if self.projection is not None:
            h_s = self.projection(h_s).float()
        c = self.config
        ce = ce_loss(student.logits, labels)
        kd = kd_loss(student.logits, t_out.logits, c.temperature)
        alp = alp_loss(h_s, h_t, self.allowed, self.score_divisor)
        total = c.ce_weight * ce + c.kd_weight * kd + c.alp_weight * alp
        parts = {"ce": ce.detach(), "kd": kd.detach(), "alp": alp.detach()}
        return LossResult(total=total, parts=parts)


register("alp_kd", ALPKD)
