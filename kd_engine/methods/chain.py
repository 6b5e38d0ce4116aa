"""Methods that train several models in one job: a chain of hops.

A hop trains one model with a single-model method (``vanilla_kd``, ``finetune``); its teacher
is the job's teacher, the previous hop's model, or none. ``takd`` (teacher -> assistants ->
student), ``born_again`` (generations of the teacher's architecture) and ``teacher_free_self``
(a CE run that then teaches a fresh copy) are chains. A single-model method is a chain of one
hop (:func:`plan_hops`), so :func:`kd_engine.run.run_job` has one code path.

Planning is pure: hops carry the *shapes* of their models, so a chain's :meth:`ChainMethod.check`
validates every hop with the hop method's own check before anything is allocated (the API calls
it before queueing a job).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

from kd_engine import registry
from kd_engine.methods.base import LossResult, Method, MethodConfig, StepOutputs

if TYPE_CHECKING:
    from kd_engine.models.shapes import ModelShape
    from kd_engine.spec import TrainingSpec
    from kd_engine.students_spec import StudentSpec

TeacherSource = Literal["job", "previous", "none"]
"""Where a hop's teacher comes from: the job's ``teacher``, the previous hop's model (its best
dev checkpoint), or no teacher (a ``finetune`` hop)."""


@dataclass(frozen=True)
class Hop:
    """One model a job trains.

    Attributes:
        name: the model's name in progress, logs, ``metrics.json`` (``hops[].name``) and, for an
            intermediate hop, its artifact (``<name>.tar.gz``): ``assistant_1``,
            ``generation_2``, ``self_teacher``, ``student``.
        student: the spec the model is built from; None means the job's ``student`` spec.
        shape: the model's shape (as planned from the spec, before any weights exist).
        method: the single-model method that trains it (``vanilla_kd``, ``finetune``, ...).
        teacher: where its teacher comes from (:data:`TeacherSource`).
        reinit_seed: None, or the model is not built from a student spec but is the job
            teacher's architecture with every weight drawn anew, after seeding with
            ``training.seed + reinit_seed`` (``born_again``'s ``init: random``).
    """

    name: str
    student: StudentSpec | None
    shape: ModelShape
    method: MethodConfig
    teacher: TeacherSource
    reinit_seed: int | None = None


def hop_teacher_shape(hops: list[Hop], index: int, teacher: ModelShape) -> ModelShape:
    """The shape of hop ``index``'s teacher: the previous hop's model or the job's teacher (also
    for a hop without a teacher: every method is bound to a teacher shape)."""
    if hops[index].teacher == "previous":
        if index == 0:
            raise ValueError(f"hop {hops[index].name!r}: the first hop has no previous model")
        return hops[index - 1].shape
    return teacher


def plan_hops(config: MethodConfig, teacher: ModelShape, student: ModelShape) -> list[Hop]:
    """The hops of a job: a chain method's own plan, else one hop that trains the job's student
    with the method (its teacher the job's teacher if the method uses one). Pure.

    Raises:
        kd_engine.errors.SpecError: a chain whose models do not fit (names the field).
    """
    cls = registry.get(config.name).method_cls
    if issubclass(cls, ChainMethod):
        return cls.hops(config, teacher, student)
    return [Hop("student", None, student, config, "job" if cls.needs.teacher else "none")]


class ChainMethod(Method):
    """A method that trains a chain of models, each with a single-model method.

    Subclasses define :meth:`hops`. ``needs.teacher`` says whether any hop learns from the
    job's teacher (so the job's teacher must be a fine-tuned classifier); ``ensemble`` asks
    :func:`kd_engine.run.run_job` to also evaluate the mean of every hop's softmax output on the
    test split (Born-Again Networks' ensemble of generations).

    Built alone (:func:`kd_engine.registry.build`), a chain holds each hop's method bound to the
    hop's shapes (:attr:`hop_methods`); it has no loss of its own: ``run_job`` trains hop by hop.
    """

    ensemble: ClassVar[bool] = False

    def __init__(self, config: MethodConfig, teacher: ModelShape, student: ModelShape) -> None:
        """Plan the hops and build each hop's method (call :meth:`check` first)."""
        super().__init__(config, teacher, student)
        self.plan = self.hops(self.config, teacher, student)
        self.hop_methods: list[Method] = [
            registry.get(hop.method.name).method_cls(
                hop.method, hop_teacher_shape(self.plan, i, teacher), hop.shape
            )
            for i, hop in enumerate(self.plan)
        ]

    @classmethod
    @abstractmethod
    def hops(cls, config: MethodConfig, teacher: ModelShape, student: ModelShape) -> list[Hop]:
        """The chain's hops, in training order; the last one trains the job's student. Pure.

        Raises:
            kd_engine.errors.SpecError: the chain's models do not fit (names the field).
        """

    @classmethod
    def check(
        cls,
        config: MethodConfig,
        teacher: ModelShape,
        student: ModelShape,
        training: TrainingSpec,
    ) -> None:
        """Check the chain's own rules (in :meth:`hops`) and every hop with its method's check;
        allocates nothing.

        Raises:
            kd_engine.errors.SpecError: a hop does not fit (names the field).
        """
        super().check(config, teacher, student, training)
        plan = cls.hops(config, teacher, student)
        for i, hop in enumerate(plan):
            registry.check(hop.method, hop_teacher_shape(plan, i, teacher), hop.shape, training)

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        """A chain has no loss of its own; each hop's method (:attr:`hop_methods`) has one.

        Raises:
            TypeError: always.
        """
        raise TypeError(
            f"{self.config.name} trains a chain of models: run_job trains each hop with its own "
            "method (see hop_methods)"
        )
