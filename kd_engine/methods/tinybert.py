"""``tinybert``: Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding",
Findings of EMNLP 2020 (arXiv 1909.10351), task-specific distillation (section 3.1, and the
two-step task distillation of section 3.2), both steps in one job:

- stage 1 ``tinybert intermediate`` (``intermediate_epochs``), intermediate-layer distillation:
      L = MSE(E^S W_e, E^T) + sum_j [ L_attn(j) + MSE(H_j^S W_h, H_g(j)^T) ],
      L_attn(j) = 1/h sum_heads MSE(A^S_j, A^T_g(j)),   A = Q K^T / sqrt(d_k)  (scores),
  with E the embedding output, H_j the output of student layer j, and W_e, W_h learned maps
  d_s -> d_t (:func:`~kd_engine.losses.attention_mse.attention_mse`,
  :func:`~kd_engine.losses.hidden_mse.hidden_mse`). The classifier gets no gradient, so this
  stage is not evaluated and never selects the exported checkpoint. The authors' recipe
  (``task_distill.py`` with ``schedule='none'``; README: 10 epochs at the default lr 5e-5):
  constant LR, no warm-up, the last weights go on to stage 2.
- stage 2 ``tinybert prediction`` (``prediction_epochs``), prediction-layer distillation:
  L = soft CE(z^T/t, z^S/t) at t = 1
  (:func:`~kd_engine.losses.soft_cross_entropy.soft_cross_entropy`); no gold labels, as in the
  authors' ``--pred_distill`` step. Its own optimiser: README 3 epochs at 3e-5, warm-up 0.1 then
  linear decay (``warmup_linear``), dev evaluation every ``eval_step`` = 100 steps (README)
  keeping the best. W_e and W_h do not train in this stage.

Layer map: 0-based transformer layers (layer i is ``hidden_states[i + 1]``); student layer j
learns from teacher layer g(j) = floor((j + 1) n / m) - 1, the paper's g(m) = m * n/m for
1-based layers when m divides n (12 -> 4: 2, 5, 8, 11), used for both attention and hidden
states as in the authors' code; ``layer_mapping`` overrides it. The embeddings always match
the embeddings.

Attention SCORES (``attention_target="scores"``, the paper's choice): transformers' attention
outputs are post-softmax (and post-dropout) probabilities, so this method sets
``needs.attention_scores``: the trainer runs both models with the attention implementation of
:mod:`kd_engine.models.attention_scores`, which reports the scaled Q K^T plus the additive
padding mask, exactly the tensor the authors' BERT returns. ``probabilities`` matches
softmax(scores) instead (computed here, before dropout).

Where we follow or differ from the authors' code (huawei-noah/Pretrained-Language-Model,
``TinyBERT/task_distill.py``, ``transformer/modeling.py``):
- as the code: scores at masked keys are excluded (the code zeroes entries <= -100), one MSE
  per layer summed over layers, losses added with weight 1, the stage-2 temperature is 1;
- differs: masked (padding) positions are excluded from the means (the code averages over the
  padded tensor, see :mod:`kd_engine.losses.attention_mse`); the soft CE sums over classes
  by default (the paper; ``soft_ce_reduction="class_mean"`` divides by C as the code does —
  with t = 1 and no other loss term in stage 2 the two differ only by a constant factor on the
  learning rate, so the paper's form keeps stage 2's LR comparable across label counts); two
  maps W_e and W_h as in the paper (the code shares one ``fit_dense`` for embeddings and
  layers); when d_s = d_t (a student cut from the teacher) W_e and W_h start as the identity
  (zero bias) instead of at random, so the matching states of such a student start at zero
  loss; AdamW (the code's BertAdam has no bias correction). No data augmentation (the paper's
  GLUE results use it).
- the number of attention heads must match (maps are compared head by head).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from kd_engine.errors import SpecError
from kd_engine.losses.attention_mse import attention_mse
from kd_engine.losses.hidden_mse import hidden_mse
from kd_engine.losses.soft_cross_entropy import soft_cross_entropy
from kd_engine.losses.soft_targets import KDReduction
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
    TeacherLayerMapping,
    explicit_mapping,
    upper_layers,
)
from kd_engine.registry import register
from kd_engine.stages import STUDENT, ParamGroup, Stage

if TYPE_CHECKING:
    from kd_engine.models.shapes import ModelShape
    from kd_engine.spec import TrainingSpec


class TinyBERTConfig(MethodConfig):
    """Settings of ``tinybert`` (defaults: the authors' README recipe, see the module doc).

    Attributes:
        intermediate_epochs: length of stage 1 (attention + hidden-state distillation); 0 skips
            it. README: 10 (with augmented data).
        intermediate_learning_rate: stage 1's constant LR (``task_distill.py`` default 5e-5).
        prediction_epochs: length of stage 2 (soft CE on the logits). README: 3.
        prediction_learning_rate: stage 2's peak LR (README 3e-5).
        prediction_warmup_ratio: stage 2's warm-up fraction (``warmup_proportion`` 0.1).
        prediction_eval_every_steps: stage 2's dev evaluation interval when the job sets no
            ``training.eval_every_steps`` (README ``eval_step`` 100).
        temperature: t of the stage-2 soft cross-entropy (the paper: 1).
        soft_ce_reduction: ``batchmean`` (the paper's sum over classes) or ``class_mean`` (the
            authors' ``.mean()``, / C).
        attention_target: ``scores`` (pre-softmax, the paper) or ``probabilities``.
        layer_mapping: optional explicit mapping, entry j = the 0-based teacher layer that
            student layer j learns from; at most as many entries as student layers.
    """

    name: Literal["tinybert"] = "tinybert"
    intermediate_epochs: int = Field(10, ge=0, le=200)
    intermediate_learning_rate: float = Field(5e-5, gt=0.0, le=1.0)
    prediction_epochs: int = Field(3, ge=1, le=200)
    prediction_learning_rate: float = Field(3e-5, gt=0.0, le=1.0)
    prediction_warmup_ratio: float = Field(0.1, ge=0.0, lt=1.0)
    prediction_eval_every_steps: int | None = Field(100, ge=1, le=1_000_000)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    soft_ce_reduction: KDReduction = "batchmean"
    attention_target: Literal["scores", "probabilities"] = "scores"
    layer_mapping: TeacherLayerMapping | None = Field(None, min_length=1, max_length=48)


def _projection(d_student: int, d_teacher: int) -> torch.nn.Linear:
    """A learned map d_s -> d_t with bias; the identity when the widths are equal."""
    layer = torch.nn.Linear(d_student, d_teacher)
    if d_student == d_teacher:
        with torch.no_grad():
            layer.weight.copy_(torch.eye(d_teacher))
            layer.bias.zero_()
    return layer


def tinybert_layers(config: TinyBERTConfig, teacher: ModelShape, student: ModelShape) -> list[int]:
    """The teacher layer g(j) of each student layer j (0-based).

    Raises:
        SpecError: the models or the mapping do not fit (names the field).
    """
    if not (teacher.transformer and student.transformer):
        raise SpecError("student.type", "tinybert needs transformer teacher and student")
    if student.num_heads != teacher.num_heads:
        raise SpecError(
            "student.num_heads",
            "tinybert matches attention maps head by head, so the student needs the teacher's "
            f"{teacher.num_heads} heads, not {student.num_heads}",
        )
    n, m = teacher.num_layers, student.num_layers
    if config.layer_mapping is not None:
        return explicit_mapping(config.layer_mapping, n, m)
    if m > n:
        raise SpecError(
            "student.num_layers",
            f"the student has {m} layers, more than the teacher's {n}; tinybert maps each "
            "student layer to a different teacher layer (or set method.layer_mapping)",
        )
    return upper_layers(n, m)


INTERMEDIATE, PREDICTION = "intermediate", "prediction"
PROJECTIONS = "projections"


class TinyBERT(Method):
    """TinyBERT task distillation: stage 1 attention + hidden states, stage 2 soft CE."""

    needs = Needs(hidden_states=True, attentions=True, attention_scores=True)
    config_cls = TinyBERTConfig
    config: TinyBERTConfig

    def __init__(self, config: MethodConfig, teacher: ModelShape, student: ModelShape) -> None:
        """Resolve the layer mapping and build W_e and W_h (d_s -> d_t)."""
        super().__init__(config, teacher, student)
        self.mapping = tinybert_layers(self.config, teacher, student)
        self.embedding_projection = _projection(student.hidden_size, teacher.hidden_size)
        self.hidden_projection = _projection(student.hidden_size, teacher.hidden_size)

    @classmethod
    def check(
        cls,
        config: MethodConfig,
        teacher: ModelShape,
        student: ModelShape,
        training: TrainingSpec,
    ) -> None:
        """The heads must match and the mapping must fit the layers.

        Raises:
            SpecError: the models do not fit (names the field).
        """
        super().check(config, teacher, student, training)
        tinybert_layers(config_as(config, TinyBERTConfig), teacher, student)

    def stages(self, training: TrainingSpec) -> list[Stage]:
        """Stage 1 (constant LR, W_e/W_h and the student, not evaluated), then stage 2 (its
        own LR, warm-up and linear decay, selects the exported checkpoint)."""
        c = self.config
        out = []
        if c.intermediate_epochs:
            out.append(
                Stage(
                    "tinybert intermediate",
                    loss=INTERMEDIATE,
                    epochs=c.intermediate_epochs,
                    learning_rate=c.intermediate_learning_rate,
                    warmup_ratio=0.0,
                    schedule="constant",
                    selects_best=False,
                    evaluate=False,
                )
            )
        out.append(
            Stage(
                "tinybert prediction",
                loss=PREDICTION,
                epochs=c.prediction_epochs,
                learning_rate=c.prediction_learning_rate,
                warmup_ratio=c.prediction_warmup_ratio,
                schedule="linear",
                trains=(STUDENT,),
                eval_every_steps=c.prediction_eval_every_steps,
            )
        )
        return out

    def param_groups(self) -> list[ParamGroup]:
        """W_e and W_h (no weight decay)."""
        return [ParamGroup(PROJECTIONS, [self.embedding_projection, self.hidden_projection])]

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        """The loss of the current stage.

        Stage 1 reads hidden states (layers + 1 of (B, T, d)) and attention scores (layers of
        (B, heads, T, T)); stage 2 reads the logits (B, C). Labels are not used.

        Raises:
            ValueError: teacher outputs, hidden states or attentions are missing or do not fit.
        """
        t = teacher_outputs(teacher, "tinybert")
        if self.stage is not None and self.stage.loss == PREDICTION:
            c = self.config
            pred = soft_cross_entropy(
                student.logits, t.logits, c.temperature, reduction=c.soft_ce_reduction
            )
            return LossResult(total=pred, parts={"soft_ce": pred.detach()})
        return self._intermediate_loss(student, t, attention_mask)

    def _intermediate_loss(
        self, student: StepOutputs, teacher: StepOutputs, attention_mask: torch.Tensor
    ) -> LossResult:
        s_hid, s_att = student.hidden_states, student.attentions
        t_hid, t_att = teacher.hidden_states, teacher.attentions
        if s_hid is None or s_att is None or t_hid is None or t_att is None:
            raise ValueError("tinybert needs the hidden states and attentions of both models")
        n, m = self.teacher_shape.num_layers, self.student_shape.num_layers
        if (len(t_att), len(s_att), len(t_hid), len(s_hid)) != (n, m, n + 1, m + 1):
            raise ValueError(
                f"tinybert was built for {n} teacher and {m} student layers but got "
                f"{len(t_att)} and {len(s_att)} attention maps, {len(t_hid)} and {len(s_hid)} "
                "hidden states"
            )
        w_e, w_h = self.embedding_projection, self.hidden_projection
        embedding = hidden_mse(w_e(s_hid[0]), t_hid[0], attention_mask)
        zero = torch.zeros((), device=s_hid[0].device)
        hidden, attention = zero, zero
        for j, i in enumerate(self.mapping):
            hidden = hidden + hidden_mse(w_h(s_hid[j + 1]), t_hid[i + 1], attention_mask)
            attention = attention + attention_mse(
                self._maps(s_att[j]), self._maps(t_att[i]), attention_mask
            )
        total = embedding + hidden + attention
        return LossResult(
            total=total,
            parts={
                "embedding": embedding.detach(),
                "hidden": hidden.detach(),
                "attention": attention.detach(),
            },
        )

    def _maps(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores as given, or their softmax over keys (the padding mask is already added)."""
        if self.config.attention_target == "scores":
            return scores
        return torch.softmax(scores.float(), dim=-1)


register("tinybert", TinyBERT)
