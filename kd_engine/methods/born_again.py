"""``born_again``: Furlanello et al., ICML 2018, "Born Again Neural Networks".

K generations of the teacher's architecture: generation 1 learns from the job's teacher,
generation k from generation k - 1 (its best dev checkpoint); the exported student is the last
generation, the earlier ones are artifacts, and the ensemble of all generations (the mean of
their softmax outputs, the paper's BANE) is evaluated on the test split as well.

Initialisation (``init``): the paper starts each generation as "a new identical model
initialised from a different random seed". ``random`` (the default when the job gives no
``student``): each generation is the teacher's architecture (its config) with every weight
drawn anew by the architecture's own initialiser, generation k seeded with
``training.seed + k - 1``. ``student`` (the default when the job gives a ``student``, and what
every job submitted before 2026-12-07 stored): each generation is built from the job's
``student`` spec, which must have the teacher's shape: a ``pretrained`` base encoder of that
shape (the encoder the teacher was fine-tuned from: pre-training kept, head new),
``from_teacher`` keeping every layer (an exact copy of the teacher, head included: at tau = 1
the KD loss starts near 0 and the generations barely move) or ``fresh`` with the teacher's
sizes. :func:`resolve_init` makes the choice when a job spec is read.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from kd_engine.errors import SpecError
from kd_engine.methods.base import MethodConfig, config_as
from kd_engine.methods.chain import ChainMethod, Hop
from kd_engine.methods.vanilla_kd import VanillaKDConfig
from kd_engine.models.shapes import ModelShape
from kd_engine.registry import register


class BornAgainConfig(MethodConfig):
    """Settings of ``born_again``.

    Attributes:
        generations: K, the students trained one after another (the teacher is generation 0).
            Default 3: the paper's DenseNet/ResNet sequences report BAN generations 1-3, and the
            most used reimplementation (nocotan/born_again_neuralnet, ``--n_gen 3``) runs 3.
            Paper details are from our reading; its body text was not retrievable to re-check.
        alpha: weight of the KD term (1 - alpha weighs CE on the gold labels). Default 1.0: the
            paper's basic BAN objective is the cross-entropy to the teacher's output
            distribution only; nocotan's reimplementation uses CE + KD with alpha 0.9.
        temperature: tau of the KD term. Default 1.0: the paper matches the teacher's softmax
            (no temperature); nocotan uses 20.
        init: how each generation starts (module doc): ``random`` (the teacher's
            architecture, randomly initialised, seed ``training.seed + k - 1``) or
            ``student`` (the job's ``student`` spec). In a job spec, left out it is
            ``student`` when the job gives a ``student`` and ``random`` otherwise
            (:func:`resolve_init`).
    """

    name: Literal["born_again"] = "born_again"
    generations: int = Field(3, ge=1, le=10)
    alpha: float = Field(1.0, ge=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0, le=100.0)
    init: Literal["random", "student"] = "random"


def resolve_init(data: Any) -> Any:
    """A raw job spec (a dict, as submitted or as stored) with ``method.init`` of a
    ``born_again`` method filled in when it is left out: ``student`` if the spec gives a
    ``student`` (a job that names its student gets it; every spec stored before ``init``
    existed has one written out, so old jobs keep their meaning), else ``random``. Anything
    else is returned unchanged.
    """
    if not isinstance(data, dict):
        return data
    method = data.get("method")
    if not isinstance(method, dict) or method.get("name") != "born_again" or "init" in method:
        return data
    init = "student" if data.get("student") is not None else "random"
    return {**data, "method": {**method, "init": init}}


def same_architecture(teacher: ModelShape, student: ModelShape) -> bool:
    """Whether a student has the teacher's shape (layers, width, heads, a transformer)."""
    return (
        student.transformer
        and student.num_layers == teacher.num_layers
        and student.hidden_size == teacher.hidden_size
        and student.num_heads == teacher.num_heads
    )


class BornAgain(ChainMethod):
    """Generations of the teacher's architecture, each taught by the previous one."""

    config_cls = BornAgainConfig
    config: BornAgainConfig
    ensemble = True

    @classmethod
    def hops(cls, config: MethodConfig, teacher: ModelShape, student: ModelShape) -> list[Hop]:
        """``generation_1`` .. ``generation_K``, each vanilla KD (``alpha``, ``temperature``)
        from the one before, the first from the job's teacher; with ``init`` ``random`` each
        is the teacher's architecture re-initialised (seed offset k - 1), with ``student``
        each is built from the job's student.

        Raises:
            SpecError: ``student`` when ``init`` is ``student`` and the student does not have
                the teacher's shape.
        """
        c = config_as(config, BornAgainConfig)
        kd = VanillaKDConfig(alpha=c.alpha, temperature=c.temperature)
        if c.init == "random":
            return [
                Hop(
                    f"generation_{k}",
                    None,
                    teacher,
                    kd,
                    "job" if k == 1 else "previous",
                    reinit_seed=k - 1,
                )
                for k in range(1, c.generations + 1)
            ]
        if not same_architecture(teacher, student):
            kind = "transformer" if student.transformer else "non-transformer"
            raise SpecError(
                "student",
                "born_again trains generations of the teacher's architecture: the student must "
                f"have the teacher's shape ({teacher.num_layers} layers, hidden size "
                f"{teacher.hidden_size}, {teacher.num_heads} heads); this one is a {kind} with "
                f"{student.num_layers} layers, hidden size {student.hidden_size}, "
                f"{student.num_heads} heads. Leave student out (each generation is then the "
                "teacher's architecture, randomly initialised), or give a pretrained base "
                'encoder of the teacher\'s shape or {"type": "from_teacher"} (every layer)',
            )
        return [
            Hop(f"generation_{k}", None, student, kd, "job" if k == 1 else "previous")
            for k in range(1, c.generations + 1)
        ]


register("born_again", BornAgain)
