"""``rail_kd``: Haidar, Anchuri, Rezagholizadeh, Ghaddar, Langlais and Poupart, "RAIL-KD:
RAndom Intermediate Layer Mapping for Knowledge Distillation", Findings of NAACL 2022.

    L = lambda_1 CE(y, softmax(z_s)) + lambda_2 tau^2 KL(softmax(z_t/tau) || softmax(z_s/tau))
        + lambda_3 L_RAIL

Every epoch (or every ``redraw_every_steps`` optimiser steps) m of the teacher's n - 1
intermediate layers (all but the last; ``teacher_layers`` may name another pool) are drawn at
random without replacement, sorted, and mapped in order to the m student layers. Each layer is
pooled to one vector per example (masked mean, or the [CLS] state), projected linearly to a
shared size u, L2-normalised and compared with a squared distance (see
:mod:`kd_engine.losses.rail`):

- ``layerwise`` (RAIL-KD_l): one projection per student layer and per teacher layer of the
  pool; the loss sums over the m pairs.
- ``concat`` (RAIL-KD_c): the m pooled vectors of each side are concatenated, then projected
  (W_S: m d_s -> u, W_T: m d_t -> u).

The projections are learned with the student. Layer indices are 0-based transformer layers
(layer k is ``hidden_states[k + 1]``).

Reproducibility: draw number r (r = epoch - 1, or step // redraw_every_steps) is a seeded
function of (seed, r): ``seed`` from the config, else ``torch.initial_seed()`` when bind() runs,
which the engine sets to ``training.seed`` just before. No official code was published; where
we had to decide: masked mean pooling (padding is ignored), projections without bias (the
paper writes W h), equal weights lambda = 1/3 by default, tau = 1.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import Field

from kd_engine.losses import ce_loss, kd_loss
from kd_engine.losses.rail import rail_loss
from kd_engine.methods.base import LossResult, Method, MethodConfig, StepOutputs
from kd_engine.methods.layer_maps import (
    TeacherLayerSet,
    check_layer,
    linear_projection,
    paired_states,
    pool,
)
from kd_engine.registry import register

if TYPE_CHECKING:
    from kd_engine.models.shapes import ModelShape


class RAILKDConfig(MethodConfig):
    """Settings of ``rail_kd``.

    Attributes:
        mode: ``layerwise`` (RAIL-KD_l) or ``concat`` (RAIL-KD_c).
        pooling: ``mean`` (masked mean over tokens) or ``cls`` (the first token's state).
        projection_size: u, the shared width both sides are projected to.
        redraw_every_steps: draw new layers every this many optimiser steps; None = every epoch.
        teacher_layers: the pool to draw from (0-based teacher layers); None = 0..n-2.
        seed: seed of the draws; None = training.seed.
        ce_weight, kd_weight, rail_weight: lambda_1, lambda_2, lambda_3.
        temperature: tau of the soft-target term.
    """

    name: Literal["rail_kd"] = "rail_kd"
    mode: Literal["layerwise", "concat"] = "concat"
    pooling: Literal["mean", "cls"] = "mean"
    projection_size: int = Field(128, ge=1, le=8192)
    redraw_every_steps: int | None = Field(None, ge=1)
    teacher_layers: TeacherLayerSet | None = Field(None, min_length=1, max_length=48)
    seed: int | None = None
    ce_weight: float = Field(1 / 3, ge=0.0, le=1000.0)
    kd_weight: float = Field(1 / 3, ge=0.0, le=1000.0)
    rail_weight: float = Field(1 / 3, ge=0.0, le=1000.0)
    temperature: float = Field(1.0, gt=0.0, le=100.0)


def draw_teacher_layers(pool: Sequence[int], m: int, seed: int, draw: int) -> list[int]:
    """Draw number ``draw``: m distinct layers of ``pool``, sorted; the same (pool, m, seed,
    draw) always gives the same layers.

    Raises:
        ValueError: the pool has fewer than m layers.
    """
    if m > len(pool):
        raise ValueError(f"cannot draw {m} layers from a pool of {len(pool)}")
    rng = random.Random(f"rail_kd:{seed}:{draw}")
    return sorted(rng.sample(list(pool), m))


class RAILKD(Method):
    """RAIL-KD: CE + soft targets + randomly mapped, projected, normalised layer vectors."""

    needs_hidden_states = True

    def __init__(self, config: RAILKDConfig) -> None:
        self.config = config
        self.pool: list[int] = []
        self.layers: list[int] = []  # the current draw: teacher layer of student layer i
        self.draw = -1
        self.seed = 0
        self.projections: torch.nn.ModuleDict | None = None
        self._shapes: tuple[int, int] | None = None  # (m, n)

    def bind(self, teacher: ModelShape, student: ModelShape) -> None:
        """Fix the pool, build the projections and make draw 0.

        Raises:
            ValueError: a non-transformer model, a pool layer the teacher lacks, or a pool
                smaller than the student's layer count.
        """
        if not (teacher.transformer and student.transformer):
            raise ValueError("student: rail_kd needs transformer teacher and student")
        c = self.config
        n, m = teacher.num_layers, student.num_layers
        if c.teacher_layers is not None:
            for k in c.teacher_layers:
                check_layer("method.teacher_layers", k, n, "teacher")
            self.pool = list(c.teacher_layers)
        else:
            self.pool = list(range(n - 1))
        if len(self.pool) < m:
            raise ValueError(
                f"method.teacher_layers: the student has {m} layers but only {len(self.pool)} "
                f"teacher layers can be drawn ({self.pool}; by default all but the last of the "
                f"teacher's {n}); name more, or use a student with fewer layers"
            )
        u, d_s, d_t = c.projection_size, student.hidden_size, teacher.hidden_size
        if c.mode == "layerwise":
            self.projections = torch.nn.ModuleDict(
                {
                    "student": torch.nn.ModuleList([linear_projection(d_s, u) for _ in range(m)]),
                    "teacher": torch.nn.ModuleList([linear_projection(d_t, u) for _ in self.pool]),
                }
            )
        else:
            self.projections = torch.nn.ModuleDict(
                {"student": linear_projection(m * d_s, u), "teacher": linear_projection(m * d_t, u)}
            )
        self._shapes = (m, n)
        self.seed = c.seed if c.seed is not None else torch.initial_seed()
        self.draw = -1
        self._redraw(0)

    def _redraw(self, draw: int) -> None:
        if self._shapes is not None and draw != self.draw:
            self.layers = draw_teacher_layers(self.pool, self._shapes[0], self.seed, draw)
            self.draw = draw

    def start_step(self, epoch: int, step: int) -> None:
        """Draw new teacher layers at the start of each epoch, or every N steps."""
        every = self.config.redraw_every_steps
        self._redraw(epoch - 1 if every is None else step // every)

    def extra_modules(self) -> list[torch.nn.Module]:
        """The projections (student and teacher sides)."""
        return [self.projections] if self.projections is not None else []

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        """Loss from logits (B, C), hidden states (m + 1 and n + 1 tensors (B, T, d)), labels
        and the attention mask (B, T) used by mean pooling.

        Raises:
            RuntimeError: bind() was not called.
            ValueError: no teacher outputs or hidden states, or the layer counts differ from
                those given to bind().
        """
        if teacher is None:
            raise ValueError("rail_kd needs teacher outputs")
        if self.projections is None:
            raise RuntimeError("rail_kd: bind() must be called before loss()")
        s_states, t_states = paired_states(student, teacher, "rail_kd", self._shapes)
        c = self.config
        h_s = [pool(h, attention_mask, c.pooling) for h in s_states]
        h_t = [pool(t_states[k], attention_mask, c.pooling) for k in self.layers]
        w_s, w_t = self.projections["student"], self.projections["teacher"]
        if c.mode == "layerwise":
            s_proj = [w_s[i](h) for i, h in enumerate(h_s)]  # type: ignore[index]
            t_proj = [
                w_t[self.pool.index(k)](h)  # type: ignore[index]
                for k, h in zip(self.layers, h_t, strict=True)
            ]
        else:
            s_proj = [w_s(torch.cat(h_s, dim=-1))]
            t_proj = [w_t(torch.cat(h_t, dim=-1))]
        ce = ce_loss(student.logits, labels)
        kd = kd_loss(student.logits, teacher.logits, c.temperature)
        rail = rail_loss(s_proj, t_proj)
        total = c.ce_weight * ce + c.kd_weight * kd + c.rail_weight * rail
        parts = {"ce": float(ce.detach()), "kd": float(kd.detach()), "rail": float(rail.detach())}
        return LossResult(total=total, parts=parts)


register("rail_kd", RAILKDConfig, lambda c: RAILKD(c))  # type: ignore[arg-type]
