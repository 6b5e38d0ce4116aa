"""``universal_kd``: Wu, Rezagholizadeh, Ghaddar, Haidar and Ghodsi, "Universal-KD:
Attention-based Output-Grounded Intermediate Layer Knowledge Distillation", EMNLP 2021.

Intermediate layers are matched in the output space: a pseudo classifier on every layer of the
teacher and of the student maps the layer's pooled representation (B, d) to label logits (B, C);
each student layer attends over the teacher layers' pseudo logits (the attention-based layer
projection of ALP-KD) and learns their fused distribution by KL (see
:mod:`kd_engine.losses.universal_kd`). Nothing compares hidden vectors of the two models, so the
student may have another width or architecture (a BiLSTM or CNN student included).

Per step, with h^k the pooled state of layer k (0-based transformer layers, embeddings excluded;
the LSTM layers of a BiLSTM, the convolution block of a CNN):

    z_T^k = P_T^k(h_T^k)   (B, C), teacher pseudo classifiers, teacher frozen
    z_S^j = P_S^j(h_S^j)   (B, C), student pseudo classifiers
    L_probe = mean_k CE(y, softmax(z_T^k))      trains only the P_T^k (teacher states are constants)
    L_UKD   = sum_j tau_u^2 KL(softmax(sum_k alpha_jk z_T^k / tau_u) || softmax(z_S^j / tau_u))
    L = w_ce CE(y, softmax(z_s)) + w_kd tau^2 KL(softmax(z_t/tau) || softmax(z_s/tau))
        + [step >= teacher_probe_steps] w_ukd L_UKD + L_probe

The teacher's pseudo classifiers are trained with cross-entropy on the gold labels over the
frozen teacher's states (the teacher's own weights never change; the L_UKD targets are detached,
so the student never pulls them). They must carry label information before the student copies
them, so L_UKD starts after ``teacher_probe_steps`` optimiser steps; until then the student
trains on the output terms (CE and soft targets), which is a plain ``vanilla_kd`` warm-up, and
the teacher probes fit. We chose this in-run first stage over a separate pre-training pass (no
second loop over the data, no stage whose epochs could not select the checkpoint, and every
optimiser step trains the student); the probes keep fitting afterwards. The student's pseudo
classifiers are trained jointly with the student by L_UKD alone. Both sets are created in
:meth:`UniversalKD.bind` and returned by :meth:`UniversalKD.extra_modules`, so the job's
optimiser trains them; they are not exported with the student.

Pseudo classifiers are linear probes d -> C (with bias), zero-initialised (uniform
distributions at the start). Pooling of a layer: the [CLS] state for a transformer (what BERT's
classifier reads), masked max over time for a BiLSTM or CNN (Kim's pooling; padding excluded).

Where this differs from, or decides beyond, the paper (no official code; the full text could
not be consulted for this implementation, so the probe architecture, the pooling per
architecture, the loss weights and the warm-up length are ours and documented in
docs/methods.md): the weights default to the same group's CKD/ALP-KD example (0.1 CE, 0.2 KD,
0.7 intermediate) and tau = 1; the attention scores are dot products of the pseudo logits.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import Field

from kd_engine.losses import ce_loss, kd_loss
from kd_engine.losses.universal_kd import Attend, ukd_loss
from kd_engine.methods.base import LossResult, Method, MethodConfig, StepOutputs
from kd_engine.methods.layer_maps import TeacherLayerSet
from kd_engine.registry import register

if TYPE_CHECKING:
    from kd_engine.models.shapes import ModelShape

Pooling = Literal["auto", "cls", "mean", "max"]


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
        pooling: how a layer becomes one vector per example: ``auto`` ([CLS] for a
            transformer, masked max over time for a BiLSTM/CNN), or ``cls``/``mean``/``max`` for
            both models.
        teacher_probe_steps: optimiser steps during which only the teacher's pseudo classifiers
            learn (and the student trains on CE + soft targets) before L_UKD starts; 0 starts
            L_UKD at once, with probes learning jointly.
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
    teacher_probe_steps: int = Field(100, ge=0, le=1_000_000)
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
    """Universal-KD: CE + soft targets + output-space matching of intermediate layers."""

    needs_hidden_states = True
    any_student_architecture = True

    def __init__(self, config: UniversalKDConfig) -> None:
        self.config = config
        self.teacher_probes: torch.nn.ModuleList | None = None  # set by bind()
        self.student_probes: torch.nn.ModuleList | None = None
        self.teacher_layers: list[int] = []
        self._pool_teacher: Literal["cls", "mean", "max"] = "cls"
        self._pool_student: Literal["cls", "mean", "max"] = "cls"
        self._num_teacher_layers = 0
        self._step = 0

    def _pooling(self, shape: ModelShape) -> Literal["cls", "mean", "max"]:
        how = self.config.pooling
        if how == "auto":
            return "cls" if shape.transformer else "max"
        return how

    def bind(self, teacher: ModelShape, student: ModelShape) -> None:
        """Build the pseudo classifiers for these shapes.

        Raises:
            ValueError: ``method.teacher_layers`` names a layer the teacher lacks, a model has
                no layer, or the two models disagree on the number of classes.
        """
        if teacher.num_layers < 1:
            raise ValueError("teacher: universal_kd needs a teacher with at least one layer")
        if student.num_layers < 1:
            raise ValueError("student: universal_kd needs a student with at least one layer")
        if teacher.num_labels != student.num_labels:
            raise ValueError(
                f"student: it has {student.num_labels} classes and the teacher {teacher.num_labels}"
            )
        n = teacher.num_layers
        layers = self.config.teacher_layers or list(range(n))
        for k in layers:
            if not 0 <= k < n:
                raise ValueError(
                    f"method.teacher_layers: teacher layer {k} is out of range (the teacher has "
                    f"{n} layers, 0..{n - 1})"
                )
        self.teacher_layers = list(layers)
        self._num_teacher_layers = n
        self.teacher_probes = _probes(teacher.hidden_size, teacher.num_labels, len(layers))
        self.student_probes = _probes(student.hidden_size, student.num_labels, student.num_layers)
        self._pool_teacher = self._pooling(teacher)
        self._pool_student = self._pooling(student)

    def schedule_warnings(self, total_steps: int) -> list[str]:
        """Warn when L_UKD would start at or after the job's last step (it would never run)."""
        k = self.config.teacher_probe_steps
        if k < total_steps:
            return []
        return [
            f"method.teacher_probe_steps is {k} but the job trains for {total_steps} optimiser "
            "steps, so L_UKD (the intermediate-layer term) never starts and this job is "
            "vanilla_kd with universal_kd's weights; set teacher_probe_steps below "
            f"{total_steps} or train longer"
        ]

    def start_step(self, epoch: int, step: int) -> None:
        """Remember the optimiser step: L_UKD starts at ``teacher_probe_steps``."""
        self._step = step

    def extra_modules(self) -> list[torch.nn.Module]:
        """The teacher's and the student's pseudo classifiers."""
        if self.teacher_probes is None or self.student_probes is None:
            return []
        return [self.teacher_probes, self.student_probes]

    def _layers(
        self, outputs: StepOutputs | None, who: str, expected: int
    ) -> tuple[torch.Tensor, ...]:
        if outputs is None:
            raise ValueError(f"universal_kd needs {who} outputs")
        if outputs.hidden_states is None:
            raise ValueError(
                f"universal_kd needs the {who}'s hidden states (output_hidden_states=True)"
            )
        states = tuple(outputs.hidden_states[1:])  # embeddings dropped
        if len(states) != expected:
            raise ValueError(
                f"universal_kd was bound to a {who} with {expected} layers but got "
                f"{len(states)} layer states"
            )
        return states

    def pseudo_logits(
        self, student: StepOutputs, teacher: StepOutputs, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pseudo classifiers' logits: student (B, m, C) and teacher (B, n', C), n' the
        attended teacher layers. The teacher's carry gradients to its probes only.

        Raises:
            ValueError: bind() was not called, or hidden states are missing or of other counts
                or widths than bound.
        """
        if self.teacher_probes is None or self.student_probes is None:
            raise ValueError("universal_kd: call bind() with the model shapes before the loss")
        t_states = self._layers(teacher, "teacher", self._num_teacher_layers)
        s_states = self._layers(student, "student", len(self.student_probes))
        try:
            z_t = torch.stack(
                [
                    probe(pool_layer(t_states[k], attention_mask, self._pool_teacher).detach())
                    for k, probe in zip(self.teacher_layers, self.teacher_probes, strict=True)
                ],
                dim=1,
            )
            z_s = torch.stack(
                [
                    probe(pool_layer(h, attention_mask, self._pool_student))
                    for h, probe in zip(s_states, self.student_probes, strict=True)
                ],
                dim=1,
            )
        except RuntimeError as e:  # a width other than the bound one
            raise ValueError(
                f"universal_kd: hidden states do not fit the bound shapes ({e})"
            ) from None
        return z_s, z_t

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        """Loss from logits (B, C), hidden states (m + 1 and n + 1 tensors (B, T, d),
        embeddings first), labels (B,) and the attention mask (B, T).

        Raises:
            ValueError: no teacher outputs or hidden states, bind() was not called, or the
                layer counts or widths differ from those given to bind().
        """
        if teacher is None:
            raise ValueError("universal_kd needs teacher outputs")
        c = self.config
        z_s, z_t = self.pseudo_logits(student, teacher, attention_mask)
        probe_ce = torch.stack(
            [F.cross_entropy(z_t[:, k], labels) for k in range(z_t.shape[1])]
        ).mean()
        ce = ce_loss(student.logits, labels)
        kd = kd_loss(student.logits, teacher.logits, c.temperature)
        total = c.ce_weight * ce + c.kd_weight * kd + probe_ce
        if self._step >= c.teacher_probe_steps:
            ukd = ukd_loss(z_s, z_t.detach(), c.ukd_temperature, c.attend)
            total = total + c.ukd_weight * ukd
        else:
            with torch.no_grad():  # reported, not trained, while the teacher probes fit
                ukd = ukd_loss(z_s, z_t.detach(), c.ukd_temperature, c.attend)
        parts = {
            "ce": float(ce.detach()),
            "kd": float(kd.detach()),
            "ukd": float(ukd.detach()),
            "probe_ce": float(probe_ce.detach()),
        }
        return LossResult(total=total, parts=parts)


register("universal_kd", UniversalKDConfig, lambda c: UniversalKD(c))  # type: ignore[arg-type]
