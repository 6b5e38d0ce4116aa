"""Validation of a job's references at submit: the datasets, corpus, teacher, student and
generator a spec names exist, belong to the tenant, and fit the method (labels, vocabulary,
layers, memory budget); the effective plan of its stages.

:func:`validate_references` runs at submit (:func:`core.service.submit`) and again when a
waiting job's dependencies have succeeded (:func:`core.dependencies.release_waiting`).
"""

from __future__ import annotations

from contextvars import ContextVar
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session

from core import (
    events,
    files,
    refs,
    repository,
)
from core.job_status import PENDING_DEPENDENCY, JobStatus
from core.settings import Settings
from kd_engine import registry
from kd_engine.data.builtins import BUILTIN_EVAL_ONLY, BUILTIN_LABELS
from kd_engine.data.checks import check_corpus_file, check_dataset_files
from kd_engine.data.corpus import check_corpus_reference
from kd_engine.data.loading import resolve_regression
from kd_engine.errors import SpecError
from kd_engine.methods.chain import ChainMethod
from kd_engine.models.loading import (
    classifier_label_names,
    read_config,
    teacher_task,
)
from kd_engine.models.shapes import ModelShape, planned_student_shape, shape_from_config
from kd_engine.plan import JobPlan, overridden_training_fields, plan_job
from kd_engine.references import scheme_of
from kd_engine.spec import (
    DatasetSpec,
    JobSpec,
    PretrainedStudent,
)
from kd_engine.validation import ModelConfigs, SubmitPolicy, check_models


def scheme_of_or_none(ref: str) -> str | None:
    """The scheme of ``ref``, or None when it has no known one (refused later, by name)."""
    try:
        return scheme_of(ref)
    except ValueError:
        return None


_DEFERRING: ContextVar[bool] = ContextVar("distillery_deferring", default=False)
"""True while :func:`validate_references` runs with ``defer_pending`` (a submit): a ``job:``
reference to an unfinished job (see :data:`PENDING_DEPENDENCY`) is then accepted like a hub id,
its checks left for the release."""


def _model_config(
    session: Session, ref: str, settings: Settings, field: str, tenant_id: str
) -> dict[str, object] | None:
    """The config.json of a model reference (None for a hub id, which the worker checks).
    A ``job:`` reference must name a succeeded job of ``tenant_id``, a ``file-<id>`` one an
    uploaded model of ``tenant_id``; another tenant's job or file is refused exactly like a
    missing one.

    Raises:
        SpecError: naming ``field``: an unknown (or another tenant's) or unfinished job, a
            path outside the root, no checkpoint.
    """
    if scheme_of_or_none(ref) == "file-":
        files.check_reference(session, ref, field, "model", tenant_id)
    if ref.startswith("job:"):
        other = repository.get_tenant_job(session, ref.removeprefix("job:"), tenant_id=tenant_id)
        if other is None:
            raise SpecError(field, f"{ref!r}: no such job")
        if other.status in PENDING_DEPENDENCY and _DEFERRING.get():
            return None  # a dependency: checked when it succeeds (core.dependencies)
        if other.status != JobStatus.SUCCEEDED:
            raise SpecError(
                field, f"{ref!r} is {other.status}; a model reference needs a succeeded job"
            )
    try:
        location = refs.model_location(ref, settings)
        return read_config(location) if isinstance(location, Path) else None
    except SpecError:
        raise
    except ValueError as e:
        raise SpecError(field, str(e)) from None


def model_configs(
    session: Session, spec: JobSpec, settings: Settings, tenant_id: str
) -> ModelConfigs:
    """The config.json of each model ``spec`` names, each read once (:func:`_model_config`):
    the teacher, the method's generator and (when the teacher's is known) a pretrained
    student.

    Raises:
        SpecError: naming ``teacher``, ``method.generator`` or ``student.model``.
    """
    teacher = _model_config(session, spec.teacher, settings, "teacher", tenant_id)
    ref = getattr(spec.method, "generator", None)
    generator = (
        _model_config(session, ref, settings, "method.generator", tenant_id)
        if isinstance(ref, str)
        else None
    )
    student = None
    if teacher is not None and isinstance(spec.student, PretrainedStudent):
        student = _model_config(session, spec.student.model, settings, "student.model", tenant_id)
    return ModelConfigs(teacher, student, generator)


def _check_dataset(session: Session, spec: JobSpec, settings: Settings, tenant_id: str) -> None:
    ds = spec.dataset
    checks: list[tuple[str, str | None]] = [
        ("source", ds.source),
        ("dev_source", ds.dev_source),
        ("test_source", ds.test_source),
    ]
    checks += [(f"eval_sets.{n}.source", es.source) for n, es in enumerate(ds.eval_sets)]
    for field, ref in checks:
        if ref is None:
            continue
        eval_set = field.startswith("eval_sets.")
        try:
            if scheme_of(ref) == "builtin:":
                if field in ("dev_source", "test_source"):
                    raise ValueError("built-in datasets have fixed splits")
                name = ref.removeprefix("builtin:")
                if eval_set and ref == ds.source:
                    raise ValueError(
                        f"{ref!r} is the job's own dataset (its test split is evaluated already)"
                    )
                if name in BUILTIN_EVAL_ONLY and not eval_set:
                    raise ValueError(
                        f"built-in {name!r} is for evaluation only; name it in dataset.eval_sets"
                    )
                known = sorted([*BUILTIN_LABELS, *(BUILTIN_EVAL_ONLY if eval_set else ())])
                if name not in known:
                    raise ValueError(
                        f"unknown built-in dataset {name!r}; built-ins: {', '.join(known)}"
                    )
            else:
                if scheme_of(ref) == "file-":
                    files.check_reference(session, ref, f"dataset.{field}", "dataset", tenant_id)
                refs.dataset_file(ref, settings)  # its content: _check_dataset_files
        except SpecError:
            raise
        except ValueError as e:
            raise SpecError(f"dataset.{field}", str(e)) from None


def _check_corpus(session: Session, spec: JobSpec, settings: Settings, tenant_id: str) -> None:
    """The unlabelled corpus a method names (``minimax_knn``'s ``method.corpus``): a built-in
    corpus, or a file under the data root like a dataset source.

    Raises:
        SpecError: naming ``method.corpus``.
    """
    ref = getattr(spec.method, "corpus", None)
    if not isinstance(ref, str):
        return
    try:
        check_corpus_reference(ref)
        if scheme_of(ref) == "file-":
            files.check_reference(session, ref, "method.corpus", "dataset", tenant_id)
        if scheme_of(ref) != "builtin:":
            path = refs.dataset_file(ref, settings)
            text_column = str(getattr(spec.method, "corpus_text_column", "text"))
            check_corpus_file(
                path, text_column, ref.removeprefix("file://"), settings.dataset_check_rows
            )
    except SpecError:
        raise
    except ValueError as e:
        raise SpecError("method.corpus", str(e)) from None


def _check_dataset_files(
    spec: JobSpec, settings: Settings, config: dict[str, object] | None
) -> None:
    """Read every dataset file of the job (:func:`check_dataset_files`, at most
    ``settings.dataset_check_rows`` rows each): columns, encoding, malformed lines, labels
    against each other and against a classifier teacher's (``config``, its config.json; None
    for a hub teacher, whose labels are left to the worker), the split sizes. Runs after the
    cheaper checks.

    Raises:
        SpecError: naming the field (``dataset.source``, ``dataset.label_column``,
            ``dataset.eval_sets.N.label_column``, ...), the file and the line.
    """
    ds = spec.dataset
    files = [ds.source, ds.dev_source, ds.test_source, *(es.source for es in ds.eval_sets)]
    if all(ref is None or scheme_of(ref) == "builtin:" for ref in files):
        return  # built-ins only: checked by name
    t_task = teacher_task(config) if config is not None else None
    if config is not None:
        regression = resolve_regression(ds.task, t_task)
    else:
        regression = None if ds.task == "auto" else ds.task == "regression"
    labels = classifier_label_names(config) if config and t_task == "classification" else None
    check_dataset_files(
        ds,
        lambda ref: refs.dataset_file(ref, settings),
        labels,
        regression,
        settings.dataset_check_rows,
    )


def validate_references(
    session: Session,
    spec: JobSpec,
    settings: Settings,
    tenant_id: str,
    *,
    defer_pending: bool = False,
) -> ModelConfigs:
    """The one check of a job at submit: the datasets and corpus it names, its models' configs
    read once (:func:`model_configs`) and checked by :func:`kd_engine.validation.check_models`
    (the check the worker runs again, with the queue's memory budget and the student-size rule
    on top), then the dataset files' content. Run again by
    :func:`core.dependencies.release_waiting` once a waiting job's dependencies have succeeded
    (then with no reference deferred). Returns the configs it read (for the plan).

    With ``defer_pending`` (a submit whose spec names unfinished jobs as ``job:<id>``), a
    reference to a job still :data:`PENDING_DEPENDENCY` is accepted like a hub id, its checks
    left for the release.

    Raises:
        SpecError: naming the field and the reason.
    """
    token = _DEFERRING.set(defer_pending)
    try:
        _check_dataset(session, spec, settings, tenant_id)
        _check_corpus(session, spec, settings, tenant_id)
        configs = model_configs(session, spec, settings, tenant_id)
        policy = SubmitPolicy(settings.queue, settings.queue_memory_bytes.get(settings.queue))
        check_models(spec, configs, policy)
        _check_dataset_files(spec, settings, configs.teacher)
    finally:
        _DEFERRING.reset(token)
    return configs


def ignored_dataset_fields(ds: DatasetSpec) -> dict[str, str]:
    """The ``dataset`` settings that the job would ignore, each with why: with a built-in
    ``source`` its columns and split fractions (built-ins have fixed columns and splits);
    ``test_fraction`` beside a ``test_source``; ``dev_fraction`` beside a ``dev_source``.
    (``split_seed`` is never ignored: it also seeds the subsets.)"""
    out: dict[str, str] = {}
    if scheme_of_or_none(ds.source) == "builtin:":
        why = "a built-in dataset has fixed columns and splits"
        for name in ("text_column", "text_pair_column", "label_column"):
            out[name] = why
        out["dev_fraction"] = out["test_fraction"] = why
        return out
    if ds.test_source is not None:
        out["test_fraction"] = "dataset.test_source is the test split (nothing is split off)"
    if ds.dev_source is not None:
        out["dev_fraction"] = "dataset.dev_source is the dev split (nothing is split off)"
    return out


def spec_to_store(spec: JobSpec) -> dict[str, Any]:
    """The spec as stored and shown (JSON), without the ``dataset`` settings it ignores
    (:func:`ignored_dataset_fields`), so that it never shows a setting that played no part.

    Raises:
        SpecError: such a setting was given explicitly (naming ``dataset.<name>``): it would
            be ignored, so it is refused rather than silently dropped; likewise a ``student``
            beside ``born_again``'s ``init: random`` (naming ``student``).
    """
    if getattr(spec.method, "init", None) == "random" and "student" in spec.model_fields_set:
        raise SpecError(
            "student",
            "born_again with method.init 'random' trains every generation from a random "
            "initialisation of the teacher's architecture and ignores the student: leave "
            "student out, or set method.init to 'student'",
        )
    ignored = ignored_dataset_fields(spec.dataset)
    for name, why in ignored.items():
        if name in spec.dataset.model_fields_set:
            raise SpecError(
                f"dataset.{name}", f"{why}; this setting would be ignored: leave it out"
            )
    stored = spec.model_dump(mode="json")
    for name in ignored:
        stored["dataset"].pop(name, None)
    return stored


def _plan_shapes(spec: JobSpec, configs: ModelConfigs) -> tuple[ModelShape, ModelShape] | None:
    """The teacher's and the student's shapes a chain method plans its hops from (None when a
    model is known only to the worker: a hub id, a job not finished yet)."""
    config = configs.teacher
    if config is None:
        return None
    if isinstance(spec.student, PretrainedStudent) and configs.student is None:
        return None
    teacher = shape_from_config(config, len(classifier_label_names(config)) or 2)
    return teacher, planned_student_shape(spec.student, teacher, configs.student)


def job_plan(spec: JobSpec, configs: ModelConfigs) -> JobPlan | None:
    """The job's effective plan (:func:`kd_engine.plan.plan_job`): every stage with its length,
    learning rate, warm-up and schedule and where each comes from; ``configs`` are those
    :func:`validate_references` read. None for a chain method whose models are not known yet
    (a hub teacher, a ``job:`` teacher not finished), or for settings whose stages cannot be
    planned (refused by the method's check).

    Raises:
        SpecError: a ``training`` setting the user set that no stage uses (the method's
            recipe sets its own), naming it and the method setting to use instead.
    """
    shapes: tuple[ModelShape, ModelShape] | None = None
    if issubclass(registry.get(spec.method.name).method_cls, ChainMethod):
        shapes = _plan_shapes(spec, configs)
        if shapes is None:
            return None
    try:
        plan = plan_job(spec, *(shapes or (None, None)))
    except SpecError:
        raise
    except ValueError:
        # Stages the method's own check refuses (that check runs where the teacher is known;
        # for a hub or pending teacher the worker runs it and fails the job naming the field).
        return None
    for field, instead in overridden_training_fields(spec, plan).items():
        name = spec.method.name
        use = (
            f"set {' and '.join(instead)} instead"
            if instead
            else "its recipe fixes this value: leave it out"
        )
        raise SpecError(
            field,
            f"{name} does not use {field}: its recipe sets this for every stage (the submit "
            f"answer's plan shows each stage's values; docs/methods.md); {use}",
            {"method_settings": instead},
        )
    return plan


def stored_plan(session: Session, job_id: str) -> dict[str, Any] | None:
    """The plan computed when job ``job_id`` was submitted (kept in its first event), or
    None (a job submitted before plans existed, or a chain planned without its models)."""
    for event in events.list_events(session, job_id, limit=2):
        plan = (event.data or {}).get("plan")
        if isinstance(plan, dict):
            return plan
    return None
