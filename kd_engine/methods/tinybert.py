"""``tinybert``: Jiao et al., "TinyBERT: Distilling BERT for Natural Language Understanding",
Findings of EMNLP 2020 (arXiv 1909.10351), task-specific distillation (section 3.1, and the
two-step task distillation of section 3.2), both steps in one job:

- stage 1 (epochs 1..``intermediate_epochs``), intermediate-layer distillation:
      L = MSE(E^S W_e, E^T) + sum_j [ L_attn(j) + MSE(H_j^S W_h, H_g(j)^T) ],
      L_attn(j) = 1/h sum_heads MSE(A^S_j, A^T_g(j)),   A = Q K^T / sqrt(d_k)  (scores),
  with E the embedding output, H_j the output of student layer j, and W_e, W_h learned maps
  d_s -> d_t (:func:`~kd_engine.losses.attention_mse.attention_mse`,
  :func:`~kd_engine.losses.hidden_mse.hidden_mse`). The classifier gets no gradient, so these
  epochs never select the exported checkpoint (:meth:`TinyBERT.counts_for_best`).
- stage 2 (the remaining epochs), prediction-layer distillation: L = soft CE(z^T/t, z^S/t)
  at t = 1 (:func:`~kd_engine.losses.soft_cross_entropy.soft_cross_entropy`); no gold labels,
  as in the authors' ``--pred_distill`` step.

Layer map: 0-based transformer layers (layer i is ``hidden_states[i + 1]``); student layer j
learns from teacher layer g(j) = floor((j + 1) n / m) - 1, the paper's g(m) = m * n/m for
1-based layers when m divides n (12 -> 4: 2, 5, 8, 11), used for both attention and hidden
states as in the authors' code; ``layer_mapping`` overrides it. The embeddings always match
the embeddings.

Attention SCORES (``attention_target="scores"``, the paper's choice): transformers' attention
outputs are post-softmax (and post-dropout) probabilities, so this method sets
``attention_scores``: the trainer runs both models with the attention implementation of
:mod:`kd_engine.models.attention_scores`, which reports the scaled Q K^T plus the additive
padding mask, exactly the tensor the authors' BERT returns. ``probabilities`` matches
softmax(scores) instead (computed here, before dropout).

Where we follow or differ from the authors' code (huawei-noah/Pretrained-Language-Model,
``TinyBERT/task_distill.py``, ``transformer/modeling.py``):
- as the code: scores at masked keys are excluded (the code zeroes entries <= -100), one MSE
  per layer summed over layers, losses added with weight 1, the stage-2 temperature is 1;
- differs: masked (padding) positions are excluded from the means (the code averages over the
  padded tensor, see :mod:`kd_engine.losses.attention_mse`); the soft CE sums over classes
  (the paper; the code also divides by C); two maps W_e and W_h as in the paper (the code
  shares one ``fit_dense`` for embeddings and layers); when d_s = d_t (a student cut from
  the teacher) W_e and W_h start as the identity (zero bias) instead of at random, so the
  matching states of such a student start at zero loss; the two steps share one learning-rate
  schedule (the authors run them as two jobs: 10 epochs at lr 5e-5, then 3 at 3e-5, without
  and with ``--pred_distill``). No data augmentation (the paper's GLUE results use it).
- the number of attention heads must match (maps are compared head by head).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from kd_engine.losses.attention_mse import attention_mse
from kd_engine.losses.hidden_mse import hidden_mse
from kd_engine.losses.soft_cross_entropy import soft_cross_entropy
from kd_engine.methods.base import LossResult, Method, MethodConfig, StepOutputs
from kd_engine.methods.layer_maps import TeacherLayerMapping, check_layer, upper_layers
from kd_engine.registry import register

if TYPE_CHECKING:
    from kd_engine.models.shapes import ModelShape


class TinyBERTConfig(MethodConfig):
    """Settings of ``tinybert``.

    Attributes:
        intermediate_epochs: epochs of stage 1 (attention + hidden-state distillation); the
            remaining ``training.epochs`` are stage 2 (soft CE on the logits). 0 skips stage 1.
        temperature: t of the stage-2 soft cross-entropy (the paper: 1).
        attention_target: ``scores`` (pre-softmax, the paper) or ``probabilities``.
        layer_mapping: optional explicit mapping, entry j = the 0-based teacher layer that
            student layer j learns from; at most as many entries as student layers.
    """

    name: Literal["tinybert"] = "tinybert"
    intermediate_epochs: int = Field(1, ge=0, le=200)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
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


class TinyBERT(Method):
    """TinyBERT task distillation: stage 1 attention + hidden states, stage 2 soft CE."""

    needs_hidden_states = True
    needs_attentions = True
    attention_scores = True

    def __init__(self, config: TinyBERTConfig) -> None:
        self.config = config
        self.mapping: list[int] | None = None
        self.embedding_projection: torch.nn.Linear | None = None
        self.hidden_projection: torch.nn.Linear | None = None
        self._shapes: tuple[int, int] = (0, 0)
        self._epoch = 1

    def bind(self, teacher: ModelShape, student: ModelShape) -> None:
        """Resolve the layer mapping and build W_e and W_h (d_s -> d_t).

        Raises:
            ValueError: the models do not fit (message names the field).
        """
        if not (teacher.transformer and student.transformer):
            raise ValueError("student.type: tinybert needs transformer teacher and student")
        if student.num_heads != teacher.num_heads:
            raise ValueError(
                "student.num_heads: tinybert matches attention maps head by head, so the student "
                f"needs the teacher's {teacher.num_heads} heads, not {student.num_heads}"
            )
        n, m = teacher.num_layers, student.num_layers
        if self.config.layer_mapping is not None:
            if len(self.config.layer_mapping) > m:
                raise ValueError(
                    f"method.layer_mapping: lists {len(self.config.layer_mapping)} teacher layers "
                    f"but the student has {m} layers (entry j is the teacher layer of student "
                    "layer j)"
                )
            for index in self.config.layer_mapping:
                check_layer("method.layer_mapping", index, n, "teacher")
            self.mapping = list(self.config.layer_mapping)
        else:
            if m > n:
                raise ValueError(
                    f"student.num_layers: the student has {m} layers, more than the teacher's "
                    f"{n}; tinybert maps each student layer to a different teacher layer "
                    "(or set method.layer_mapping)"
                )
            self.mapping = upper_layers(n, m)
        self.embedding_projection = _projection(student.hidden_size, teacher.hidden_size)
        self.hidden_projection = _projection(student.hidden_size, teacher.hidden_size)
        self._shapes = (n, m)

    def check_training(self, epochs: int) -> None:
        """Stage 2 needs at least one epoch: it is the only stage that trains the classifier.

        Raises:
            ValueError: ``method.intermediate_epochs`` is not below ``epochs``.
        """
        k = self.config.intermediate_epochs
        if k >= epochs:
            raise ValueError(
                f"method.intermediate_epochs: is {k} but training.epochs is {epochs}; stage 2 "
                "(soft cross-entropy, the only stage that trains the classifier and can be "
                f"exported) needs at least one epoch, so set it below {epochs} or raise "
                "training.epochs"
            )

    def extra_modules(self) -> list[torch.nn.Module]:
        """W_e and W_h (empty before :meth:`bind`)."""
        return [p for p in (self.embedding_projection, self.hidden_projection) if p is not None]

    def start_step(self, epoch: int, step: int) -> None:
        """Remember the epoch: it selects the stage."""
        self._epoch = epoch

    def in_stage_one(self, epoch: int) -> bool:
        """Whether ``epoch`` (1-based) is an intermediate-layer (stage-1) epoch."""
        return epoch <= self.config.intermediate_epochs

    def counts_for_best(self, epoch: int) -> bool:
        """Only stage-2 epochs train the classifier, so only they may be exported."""
        return not self.in_stage_one(epoch)

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
            RuntimeError: :meth:`bind` was not called.
            ValueError: teacher outputs, hidden states or attentions are missing or do not fit.
        """
        if teacher is None:
            raise ValueError("tinybert needs teacher outputs")
        if not self.in_stage_one(self._epoch):
            pred = soft_cross_entropy(student.logits, teacher.logits, self.config.temperature)
            return LossResult(total=pred, parts={"soft_ce": float(pred.detach())})
        return self._intermediate_loss(student, teacher, attention_mask)

    def _intermediate_loss(
        self, student: StepOutputs, teacher: StepOutputs, attention_mask: torch.Tensor
    ) -> LossResult:
        w_e, w_h, mapping = self.embedding_projection, self.hidden_projection, self.mapping
        if w_e is None or w_h is None or mapping is None:
            raise RuntimeError("tinybert: bind() must be called before loss()")
        s_hid, s_att = student.hidden_states, student.attentions
        t_hid, t_att = teacher.hidden_states, teacher.attentions
        if s_hid is None or s_att is None or t_hid is None or t_att is None:
            raise ValueError("tinybert needs the hidden states and attentions of both models")
        n, m = self._shapes
        if (len(t_att), len(s_att), len(t_hid), len(s_hid)) != (n, m, n + 1, m + 1):
            raise ValueError(
                f"tinybert was bound to {n} teacher and {m} student layers but got "
                f"{len(t_att)} and {len(s_att)} attention maps, {len(t_hid)} and {len(s_hid)} "
                "hidden states"
            )
        embedding = hidden_mse(w_e(s_hid[0]), t_hid[0], attention_mask)
        zero = torch.zeros((), device=s_hid[0].device)
        hidden, attention = zero, zero
        for j, i in enumerate(mapping):
            hidden = hidden + hidden_mse(w_h(s_hid[j + 1]), t_hid[i + 1], attention_mask)
            attention = attention + attention_mse(
                self._maps(s_att[j]), self._maps(t_att[i]), attention_mask
            )
        total = embedding + hidden + attention
        return LossResult(
            total=total,
            parts={
                "embedding": float(embedding.detach()),
                "hidden": float(hidden.detach()),
                "attention": float(attention.detach()),
            },
        )

    def _maps(self, scores: torch.Tensor) -> torch.Tensor:
        """Scores as given, or their softmax over keys (the padding mask is already added)."""
        if self.config.attention_target == "scores":
            return scores
        return torch.softmax(scores.float(), dim=-1)


register("tinybert", TinyBERTConfig, lambda c: TinyBERT(c))  # type: ignore[arg-type]
