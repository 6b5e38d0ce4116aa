"""``rail_kd``: Haidar, Anchuri, Rezagholizadeh, Ghaddar, Langlais and Poupart, "RAIL-KD:
RAndom Intermediate Layer Mapping for Knowledge Distillation", Findings of NAACL 2022.

    L = lambda_1 CE(y, softmax(z_s)) + lambda_2 tau^2 KL(softmax(z_t/tau) || softmax(z_s/tau))
        + lambda_3 L_RAIL

Every epoch (or every ``redraw_every_steps`` optimiser steps) m' layers of the teacher's pool
are drawn at random without replacement, sorted, and mapped in order to the m' mapped student
layers. Each layer is pooled to one vector per example (masked mean, or the [CLS] state),
projected linearly to a shared size u, L2-normalised and compared with a squared distance (see
:mod:`kd_engine.losses.rail`):

- ``layerwise`` (RAIL-KD_l): one projection per mapped student layer and per teacher layer of
  the pool; the loss sums over the m' pairs.
- ``concat`` (RAIL-KD_c): the m' pooled vectors of each side are concatenated, then projected
  (W_S: m' d_s -> u, W_T: m' d_t -> u).

Which layers take part (``include_last_layer``; see :func:`rail_layers`): both models' last
layers are in, or both are out, so that a student layer is never asked to copy a teacher layer
of another depth class than the pool allows:

- True (default): the pool is all n teacher layers and all m student layers are mapped (m' = m).
  This follows the abstract ("all teacher layers are taken into account") and the only public
  reimplementation we could read (TKC002/CILDA-plus-minILD: ``KD_admin.py`` ``select_layers``
  samples m of ``range(num_hidden_layers)``; ``KD_model.py`` maps every student layer
  ``hidden_states[1:]``). It also keeps a one-layer student usable. The last layer's mean-pooled
  state is not what the output term matches (the logits come from the [CLS] state through the
  classifier), so including it does not duplicate the soft-target term.
- False: PKD's choice (Sun et al. 2019, section 3: the last layer is left to the output-level
  KD): the pool is teacher layers 0..n-2 and student layers 0..m-2 are mapped (m' = m - 1); the
  student needs at least two layers.

The paper's full text and the authors' code were not reachable (only the abstract and the
third-party code above), so the pool's size is not confirmed by the authors. ``teacher_layers``
names another pool; it must hold the teacher's last layer exactly when ``include_last_layer`` is
True. Layer indices are 0-based transformer layers (layer k is ``hidden_states[k + 1]``).

Reproducibility: draw number r (r = epoch - 1, or step // redraw_every_steps) is a seeded
function of (seed, r): ``seed`` from the config, else ``torch.initial_seed()`` when the method
is built (the engine seeds torch with ``training.seed`` before it builds the models and the
method). Where we had to decide: masked mean pooling (padding is ignored), projections without
bias (the paper writes W h), equal weights lambda = 1/3 by default, tau = 1.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from kd_engine.errors import SpecError
from kd_engine.losses import ce_loss, kd_loss
from kd_engine.losses.rail import rail_loss
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
    TeacherLayerSet,
    check_layer,
    linear_projection,
    paired_states,
    pool,
)
from kd_engine.registry import register
from kd_engine.stages import ParamGroup

if TYPE_CHECKING:
    from kd_engine.models.shapes import ModelShape
    from kd_engine.spec import TrainingSpec


class RAILKDConfig(MethodConfig):
    """Settings of ``rail_kd``.

    Attributes:
        mode: ``layerwise`` (RAIL-KD_l) or ``concat`` (RAIL-KD_c).
        pooling: ``mean`` (masked mean over tokens) or ``cls`` (the first token's state).
        projection_size: u, the shared width both sides are projected to.
        redraw_every_steps: draw new layers every this many optimiser steps; None = every epoch.
        include_last_layer: True: the pool is every teacher layer and every student layer is
            mapped; False: both models' last layers are left out (PKD's choice). Default True
            (the abstract and the third-party reimplementation; the paper's full text and the
            authors' code were not reachable).
        teacher_layers: the pool to draw from (0-based teacher layers); None = 0..n-1 (or
            0..n-2 without the last layer).
        seed: seed of the draws; None = training.seed.
        ce_weight, kd_weight, rail_weight: lambda_1, lambda_2, lambda_3 (equal by default: our
            choice; the paper tunes them).
        temperature: tau of the soft-target term.
    """

    name: Literal["rail_kd"] = "rail_kd"
    mode: Literal["layerwise", "concat"] = "concat"
    pooling: Literal["mean", "cls"] = "mean"
    projection_size: int = Field(128, ge=1, le=8192)
    redraw_every_steps: int | None = Field(None, ge=1)
    include_last_layer: bool = True
    teacher_layers: TeacherLayerSet | None = Field(None, min_length=1, max_length=48)
    seed: int | None = None
    ce_weight: float = Field(1 / 3, ge=0.0, le=1000.0)
    kd_weight: float = Field(1 / 3, ge=0.0, le=1000.0)
    rail_weight: float = Field(1 / 3, ge=0.0, le=1000.0)
    temperature: float = Field(1.0, gt=0.0, le=100.0)


@dataclass(frozen=True)
class RAILLayers:
    """The layers that take part in RAIL-KD for one pair of models.

    Attributes:
        pool: teacher layers (0-based, sorted) that draws are made from.
        student: student layers (0-based, sorted) that are mapped; draw r maps
            ``student[i]`` to the i-th smallest drawn teacher layer.
    """

    pool: tuple[int, ...]
    student: tuple[int, ...]


def rail_layers(config: RAILKDConfig, num_teacher: int, num_student: int) -> RAILLayers:
    """The teacher pool and the mapped student layers for these layer counts (pure; used by
    both :meth:`RAILKD.check` and the constructor).

    With ``include_last_layer`` the pool defaults to 0..n-1 and students layers 0..m-1 are
    mapped; without it, 0..n-2 and 0..m-2. An explicit ``teacher_layers`` must then hold the
    teacher's last layer (n-1) exactly when ``include_last_layer`` is True, so the two last
    layers are both in or both out.

    Raises:
        SpecError: ``method.teacher_layers`` names a layer the teacher lacks, holds (or lacks)
            the teacher's last layer against ``include_last_layer``, or is smaller than the
            number of mapped student layers; ``student.num_layers`` when the last layer is
            excluded and the student has fewer than two layers.
    """
    n, m = num_teacher, num_student
    include = config.include_last_layer
    if not include and m < 2:
        raise SpecError(
            "student.num_layers",
            f"rail_kd with include_last_layer false maps student layers 0..m-2, and a student "
            f"with {m} layer has none to map; use a student with at least 2 layers or set "
            "include_last_layer true",
        )
    mapped = tuple(range(m if include else m - 1))
    if config.teacher_layers is not None:
        for k in config.teacher_layers:
            check_layer("method.teacher_layers", k, n, "teacher")
        pool_layers = tuple(config.teacher_layers)
        if include and n - 1 not in pool_layers:
            raise SpecError(
                "method.teacher_layers",
                f"the pool lacks the teacher's last layer {n - 1} while include_last_layer is "
                "true (the student's last layer is mapped); add it, or set include_last_layer "
                "false so that both last layers are left out",
            )
        if not include and n - 1 in pool_layers:
            raise SpecError(
                "method.teacher_layers",
                f"the pool holds the teacher's last layer {n - 1} while include_last_layer is "
                "false (the student's last layer is not mapped); remove it, or set "
                "include_last_layer true",
            )
    else:
        pool_layers = tuple(range(n if include else n - 1))
    if len(pool_layers) < len(mapped):
        which = "all" if include else "all but the last"
        raise SpecError(
            "method.teacher_layers",
            f"{len(mapped)} student layers are mapped but only {len(pool_layers)} teacher "
            f"layers can be drawn ({list(pool_layers)}; by default {which} of the teacher's "
            f"{n}); name more, or use a student with fewer layers",
        )
    return RAILLayers(pool=pool_layers, student=mapped)


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

    config_cls = RAILKDConfig
    config: RAILKDConfig
    needs = Needs(hidden_states=True)

    @classmethod
    def check(
        cls,
        config: MethodConfig,
        teacher: ModelShape,
        student: ModelShape,
        training: TrainingSpec,
    ) -> None:
        """Check the layer pool against the models (allocates nothing).

        Raises:
            SpecError: a non-transformer student (``student``) or teacher (``teacher``), or a
                pool that does not fit (see :func:`rail_layers`).
        """
        super().check(config, teacher, student, training)
        if not teacher.transformer:
            raise SpecError("teacher", "rail_kd needs a transformer teacher")
        rail_layers(config_as(config, RAILKDConfig), teacher.num_layers, student.num_layers)

    def __init__(self, config: MethodConfig, teacher: ModelShape, student: ModelShape) -> None:
        """Fix the pool, build the projections and make draw 0.

        Raises:
            SpecError: the pool does not fit the models (see :func:`rail_layers`).
        """
        super().__init__(config, teacher, student)
        c = self.config
        n, m = teacher.num_layers, student.num_layers
        layers = rail_layers(c, n, m)
        self.pool: list[int] = list(layers.pool)
        self.student_layers: list[int] = list(layers.student)
        self._shapes = (m, n)
        u, d_s, d_t = c.projection_size, student.hidden_size, teacher.hidden_size
        k = len(self.student_layers)
        if c.mode == "layerwise":
            self.projections = torch.nn.ModuleDict(
                {
                    "student": torch.nn.ModuleList([linear_projection(d_s, u) for _ in range(k)]),
                    "teacher": torch.nn.ModuleList([linear_projection(d_t, u) for _ in self.pool]),
                }
            )
        else:
            self.projections = torch.nn.ModuleDict(
                {"student": linear_projection(k * d_s, u), "teacher": linear_projection(k * d_t, u)}
            )
        self.seed = c.seed if c.seed is not None else torch.initial_seed()
        self.layers: list[int] = []  # the current draw: teacher layer of student_layers[i]
        self.draw = -1
        self._redraw(0)

    @property
    def mapping(self) -> dict[int, int]:
        """The current draw as {student layer: teacher layer} (0-based)."""
        return dict(zip(self.student_layers, self.layers, strict=True))

    def _redraw(self, draw: int) -> None:
        if draw != self.draw:
            self.layers = draw_teacher_layers(self.pool, len(self.student_layers), self.seed, draw)
            self.draw = draw

    def extra_state(self) -> dict[str, Any]:
        """The current draw (its number and teacher layers; both follow from the seed)."""
        return {"draw": self.draw, "layers": list(self.layers)}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the current draw."""
        self.draw, self.layers = int(state["draw"]), [int(i) for i in state["layers"]]

    def start_step(self, epoch: int, step: int) -> None:
        """Draw new teacher layers at the start of each epoch, or every N steps."""
        every = self.config.redraw_every_steps
        self._redraw(epoch - 1 if every is None else step // every)

    def param_groups(self) -> list[ParamGroup]:
        """The projections (student and teacher sides), trained with the student at the
        stage's LR, without weight decay."""
        return [ParamGroup("projections", [self.projections])]

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
            ValueError: no teacher outputs or hidden states, or the layer counts differ from
                those the method was built for.
        """
        t_out = teacher_outputs(teacher, "rail_kd")
        s_states, t_states = paired_states(student, t_out, "rail_kd", self._shapes)
        c = self.config
        h_s = [pool(s_states[j], attention_mask, c.pooling) for j in self.student_layers]
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
        kd = kd_loss(student.logits, t_out.logits, c.temperature)
        rail = rail_loss(s_proj, t_proj)
        total = c.ce_weight * ce + c.kd_weight * kd + c.rail_weight * rail
        parts = {"ce": ce.detach(), "kd": kd.detach(), "rail": rail.detach()}
        return LossResult(total=total, parts=parts)


register("rail_kd", RAILKD)
