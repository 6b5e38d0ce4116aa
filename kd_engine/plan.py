"""A job's effective plan: the stages it will run, with where each of their settings comes from.

A method's recipe may set a stage's length, learning rate, warm-up or schedule itself
(``mate_kd``'s ``method.epochs`` and ``method.learning_rate``, TinyBERT's two stages ...);
``training.*`` then plays no part for that stage. :func:`plan_job` shows, before anything runs,
each stage of each hop with its ``epochs`` (or fixed ``steps``), ``learning_rate``,
``warmup_ratio`` and ``schedule``, and for every value the spec fields it comes from and
whether the user set them (``user``), the method's recipe did (``recipe``: a method setting
left at its default, or a value fixed in the recipe's code) or a training default did
(``default``). :func:`overridden_training_fields` lists the ``training.*`` settings a user set
that no stage uses (the API refuses them, naming the method setting to use instead).

Where a value comes from is found by perturbation: the stages are planned again with each
numeric method setting and each of the four ``training`` settings changed, and a stage value
that changes came from that setting. Pure: configs and shapes only, nothing is allocated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from kd_engine import registry
from kd_engine.methods.chain import ChainMethod, Hop, plan_hops

if TYPE_CHECKING:
    from kd_engine.methods.base import MethodConfig
    from kd_engine.models.shapes import ModelShape
    from kd_engine.spec import JobSpec, TrainingSpec
    from kd_engine.stages import Stage

Source = Literal["user", "recipe", "default"]
"""Where a planned value comes from: a setting the user gave, the method's recipe (a method
setting left at its default, or a value fixed in the method's code), or a ``training`` default."""

STAGE_SETTINGS = ("epochs", "learning_rate", "warmup_ratio", "schedule")
"""The ``training`` settings a stage may take over from the job (or set itself)."""


@dataclass(frozen=True)
class PlannedValue:
    """One setting of a planned stage.

    Attributes:
        value: the value the stage will use (epochs, steps, LR, warm-up fraction, schedule).
        source: see :data:`Source`.
        fields: the spec fields it is computed from (``method.epochs``,
            ``training.learning_rate``; two for a product such as Annealing-KD's stage I
            length ``method.tau_max`` x ``method.epochs_per_temperature``; none for a value
            fixed in the recipe's code).
    """

    value: int | float | str
    source: Source
    fields: tuple[str, ...] = ()


@dataclass(frozen=True)
class PlannedStage:
    """One stage of a planned job.

    Attributes:
        hop: the model the stage trains (``student``; a chain's ``assistant_1`` ...).
        method: the method that trains the hop.
        name: the stage's name as progress shows it.
        epochs: its length in passes over the transfer set (None for a stage of fixed steps).
        steps: its length in optimiser steps when fixed by a setting (None when it follows
            the number of training examples, which the plan does not know).
        max_steps: ``training.max_steps`` (the per-stage cap), or None.
        learning_rate, warmup_ratio, schedule: its optimiser settings.
    """

    hop: str
    method: str
    name: str
    epochs: PlannedValue | None
    steps: PlannedValue | None
    max_steps: int | None
    learning_rate: PlannedValue
    warmup_ratio: PlannedValue
    schedule: PlannedValue


@dataclass(frozen=True)
class JobPlan:
    """The effective plan of a job: its stages, in order, and notes about it.

    Attributes:
        stages: every stage of every hop, in training order.
        notes: warnings about the plan (a ``training.max_steps`` that cuts a stage of fixed
            steps short).
    """

    stages: list[PlannedStage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The plan as JSON-ready data (values as dicts with ``value``, ``source``,
        ``fields``)."""

        def value(v: PlannedValue | None) -> dict[str, Any] | None:
            if v is None:
                return None
            return {"value": v.value, "source": v.source, "fields": list(v.fields)}

        return {
            "stages": [
                {
                    "hop": s.hop,
                    "method": s.method,
                    "name": s.name,
                    "epochs": value(s.epochs),
                    "steps": value(s.steps),
                    "max_steps": s.max_steps,
                    "learning_rate": value(s.learning_rate),
                    "warmup_ratio": value(s.warmup_ratio),
                    "schedule": value(s.schedule),
                }
                for s in self.stages
            ],
            "notes": list(self.notes),
        }


def method_stages(config: MethodConfig, training: TrainingSpec) -> list[Stage]:
    """The stages of a single-model method, from its settings alone (no model is built).

    A method's :meth:`~kd_engine.methods.base.Method.stages` reads only its settings and the
    training settings, so it is called on an instance whose constructor (which builds the
    method's modules) did not run.
    """
    cls = registry.get(config.name).method_cls
    method = cls.__new__(cls)
    method.config = config
    method.stage = None
    return method.stages(training)


Planned = list[tuple[Hop, list["Stage"]]]


def _hops(
    config: MethodConfig, teacher: ModelShape | None, student: ModelShape | None
) -> list[Hop]:
    cls = registry.get(config.name).method_cls
    if issubclass(cls, ChainMethod):
        if teacher is None or student is None:
            raise ValueError(f"{config.name} plans its models from the teacher's shape")
        return plan_hops(config, teacher, student)
    return [Hop("student", None, _NO_SHAPE, config, "job" if cls.needs.teacher else "none")]


def _planned(
    config: MethodConfig,
    training: TrainingSpec,
    teacher: ModelShape | None,
    student: ModelShape | None,
) -> Planned:
    return [(hop, method_stages(hop.method, training)) for hop in _hops(config, teacher, student)]


def _values(planned: Planned) -> list[tuple[object, ...]]:
    return [
        (s.epochs, s.steps, s.learning_rate, s.warmup_ratio, s.schedule)
        for _, stages in planned
        for s in stages
    ]


def _changed(value: object) -> object | None:
    """A different value of the same kind (None for a setting not perturbed: bools, strings
    other than a schedule, lists, None)."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 0.5 if value else 0.25
    if value in ("linear", "constant"):
        return "constant" if value == "linear" else "linear"
    return None


def _sources(
    spec: JobSpec, teacher: ModelShape | None, student: ModelShape | None, base: Planned
) -> dict[tuple[int, int], list[str]]:
    """(stage index, value index) -> the spec fields whose change changes that value."""
    found: dict[tuple[int, int], list[str]] = {}
    reference = _values(base)
    method, training = spec.method, spec.training
    perturbations: list[tuple[str, MethodConfig, TrainingSpec]] = []
    for name in type(method).model_fields:
        new = _changed(getattr(method, name))
        if new is not None and name != "name":
            changed = method.model_copy(update={name: new})
            perturbations.append((f"method.{name}", changed, training))
    for name in STAGE_SETTINGS:
        new = _changed(getattr(training, name))
        changed_training = training.model_copy(update={name: new})
        perturbations.append((f"training.{name}", method, changed_training))
    for name, new_method, new_training in perturbations:
        try:
            values = _values(_planned(new_method, new_training, teacher, student))
        except (ValueError, TypeError):
            continue  # a change the method refuses: not a stage setting
        if len(values) != len(reference):
            continue  # a setting that adds or removes stages (not a stage value)
        for i, (old, new_row) in enumerate(zip(reference, values, strict=True)):
            for j, (a, b) in enumerate(zip(old, new_row, strict=True)):
                if a != b:
                    found.setdefault((i, j), []).append(name)
    return found


def _explicit(spec: JobSpec, name: str) -> bool:
    section, _, key = name.partition(".")
    model = spec.method if section == "method" else spec.training
    return key in model.model_fields_set


def _value(spec: JobSpec, value: Any, fields: list[str], fallback: str | None) -> PlannedValue:
    """A stage value with its source: from ``fields`` when some setting feeds it, else from
    ``fallback`` (the training setting a stage value of None falls back to), else fixed in the
    recipe."""
    if fields:
        if any(_explicit(spec, f) for f in fields):
            source: Source = "user"
        elif all(f.startswith("training.") for f in fields):
            source = "default"
        else:
            source = "recipe"
        return PlannedValue(value, source, tuple(fields))
    if fallback is not None:
        source = "user" if _explicit(spec, fallback) else "default"
        return PlannedValue(value, source, (fallback,))
    return PlannedValue(value, "recipe")


def plan_job(
    spec: JobSpec, teacher: ModelShape | None = None, student: ModelShape | None = None
) -> JobPlan:
    """The job's effective plan (see the module's docstring).

    Args:
        spec: the job spec as the user sent it (its explicitly set fields decide ``user``).
        teacher, student: the models' shapes; a chain method (``takd``, ``born_again`` ...)
            needs them to plan its hops, a single-model method does not.

    Raises:
        ValueError: a chain method without the shapes; ``kd_engine.errors.SpecError`` when a
            chain's models do not fit.
    """
    base = _planned(spec.method, spec.training, teacher, student)
    sources = _sources(spec, teacher, student, base)
    training = spec.training
    cap = training.max_steps
    plan = JobPlan()
    index = 0
    for hop, stages in base:
        for stage in stages:
            fed = {j: sources.get((index, j), []) for j in range(5)}
            epochs = steps = None
            if stage.epochs is not None:
                epochs = _value(spec, stage.epochs, fed[0], None)
            if stage.steps is not None:
                steps = _value(spec, stage.steps, fed[1], None)
                if cap is not None and stage.steps > cap:
                    plan.notes.append(
                        f"stage {stage.name!r} ({hop.name}) is cut from {stage.steps} to "
                        f"{cap} steps by training.max_steps"
                    )
            lr, warmup, schedule = stage.learning_rate, stage.warmup_ratio, stage.schedule
            plan.stages.append(
                PlannedStage(
                    hop=hop.name,
                    method=hop.method.name,
                    name=stage.name,
                    epochs=epochs,
                    steps=steps,
                    max_steps=cap,
                    learning_rate=_value(
                        spec,
                        training.learning_rate if lr is None else lr,
                        fed[2],
                        "training.learning_rate" if lr is None else None,
                    ),
                    warmup_ratio=_value(
                        spec,
                        training.warmup_ratio if warmup is None else warmup,
                        fed[3],
                        "training.warmup_ratio" if warmup is None else None,
                    ),
                    schedule=_value(
                        spec,
                        training.schedule if schedule is None else schedule,
                        fed[4],
                        "training.schedule" if schedule is None else None,
                    ),
                )
            )
            index += 1
    return plan


def overridden_training_fields(spec: JobSpec, plan: JobPlan) -> dict[str, list[str]]:
    """The ``training`` settings among :data:`STAGE_SETTINGS` that the user set explicitly but
    that no stage of ``plan`` uses (the recipe sets its own), each with the method settings
    that set that value instead (may be empty: a value fixed in the recipe's code)."""
    out: dict[str, list[str]] = {}
    for name in STAGE_SETTINGS:
        if name not in spec.training.model_fields_set:
            continue
        key = f"training.{name}"
        attr = name
        values = [getattr(s, attr) for s in plan.stages]
        if any(v is not None and key in v.fields for v in values):
            continue
        instead: list[str] = []
        for v in values:
            for f in v.fields if v is not None else ():
                if f.startswith("method.") and f not in instead:
                    instead.append(f)
        out[key] = instead
    return out


_NO_SHAPE: Any = None
"""A single-model hop's shape, which planning its stages never reads."""
