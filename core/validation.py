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
from core.errors import InvalidSpec
from core.settings import Settings
from kd_engine import memory, registry
from kd_engine.data.builtins import BUILTIN_EVAL_ONLY, BUILTIN_LABELS, BUILTIN_REGRESSION
from kd_engine.data.checks import check_corpus_file, check_dataset_files
from kd_engine.data.corpus import check_corpus_reference
from kd_engine.data.loading import resolve_regression
from kd_engine.errors import SpecError
from kd_engine.evaluation import metric_fits_task
from kd_engine.methods.chain import ChainMethod
from kd_engine.models.loading import (
    SUPPORTED_MODEL_TYPES,
    classifier_label_names,
    is_sequence_classifier,
    read_config,
    teacher_task,
)
from kd_engine.models.shapes import ModelShape, planned_student_shape, shape_from_config
from kd_engine.plan import JobPlan, overridden_training_fields, plan_job
from kd_engine.references import scheme_of
from kd_engine.spec import (
    DatasetSpec,
    FreshStudent,
    FromTeacherStudent,
    JobSpec,
    PretrainedStudent,
)


def scheme_of_or_none(ref: str) -> str | None:
    """The scheme of ``ref``, or None when it has no known one (refused later, by name)."""
    try:
        return scheme_of(ref)
    except ValueError:
        return None


PENDING_DEPENDENCY = ("waiting", "queued", "running", "pausing", "paused")
"""Statuses of a job that another job may name as ``job:<id>`` before it has finished (the new
job then waits for it); ``cancelling``, ``failed`` and ``cancelled`` jobs are refused."""

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
        InvalidSpec: an unknown (or another tenant's) or unfinished job, a path outside the
            root, no checkpoint.
    """
    if scheme_of_or_none(ref) == "file-":
        files.check_reference(session, ref, field, "model", tenant_id)
    if ref.startswith("job:"):
        other = repository.get_tenant_job(session, ref.removeprefix("job:"), tenant_id=tenant_id)
        if other is None:
            raise InvalidSpec(f"{ref!r}: no such job", field)
        if other.status in PENDING_DEPENDENCY and _DEFERRING.get():
            return None  # a dependency: checked when it succeeds (core.dependencies)
        if other.status != "succeeded":
            raise InvalidSpec(
                f"{ref!r} is {other.status}; a model reference needs a succeeded job", field
            )
    try:
        location = refs.model_location(ref, settings)
        return read_config(location) if isinstance(location, Path) else None
    except ValueError as e:
        raise InvalidSpec(str(e), field) from None


def _student_config(
    session: Session,
    spec: JobSpec,
    settings: Settings,
    teacher_config: dict[str, object],
    tenant_id: str,
) -> dict[str, object] | None:
    """The config of a pretrained student, checked to share the teacher's vocabulary and to
    have the layers its ``layers`` / ``num_layers`` choose (None for a hub student).

    Raises:
        InvalidSpec: naming ``student.model``, ``student.layers`` or ``student.num_layers``.
    """
    if not isinstance(spec.student, PretrainedStudent):
        return None
    config = _model_config(session, spec.student.model, settings, "student.model", tenant_id)
    if config is None:
        return None
    if config.get("vocab_size") != teacher_config.get("vocab_size"):
        raise InvalidSpec(
            f"its vocabulary ({config.get('vocab_size')} tokens) differs from the teacher's "
            f"({teacher_config.get('vocab_size')}); a pretrained student must share the "
            "teacher's tokenizer",
            "student.model",
        )
    try:  # only its chosen layers are checked here (the label count plays no part)
        planned_student_shape(spec.student, shape_from_config(teacher_config, 2), config)
    except ValueError as e:
        field, _, reason = str(e).partition(": ")
        raise InvalidSpec(reason or str(e), field if reason else "student") from None
    return config


def _check_generator(
    session: Session,
    spec: JobSpec,
    settings: Settings,
    teacher_config: dict[str, object] | None,
    tenant_id: str,
) -> None:
    """``method.generator`` of an augmentation method (any method whose settings have a
    ``generator``): a known reference (a ``job:`` one to a succeeded job) and, when its
    config.json is readable here, a masked LM (``architectures`` names a ``*ForMaskedLM``
    class) with the teacher's vocabulary. A hub generator is checked by the worker.

    Raises:
        InvalidSpec: naming ``method.generator``.
    """
    ref = getattr(spec.method, "generator", None)
    if not isinstance(ref, str):
        return
    field = "method.generator"
    config = _model_config(session, ref, settings, field, tenant_id)
    if config is None:
        return
    archs = config.get("architectures")
    if not isinstance(archs, list) or not any(str(a).endswith("ForMaskedLM") for a in archs):
        raise InvalidSpec(
            f"{ref!r} is not a masked-LM checkpoint (its config's architectures: {archs}); "
            "the generator must be one (e.g. BertForMaskedLM), or leave method.generator "
            "unset to build one from the teacher",
            field,
        )
    if teacher_config is not None and config.get("vocab_size") != teacher_config.get("vocab_size"):
        raise InvalidSpec(
            f"its vocabulary ({config.get('vocab_size')} tokens) differs from the teacher's "
            f"({teacher_config.get('vocab_size')}); the generator must share the teacher's "
            "tokenizer",
            field,
        )


def _check_teacher(session: Session, spec: JobSpec, settings: Settings, tenant_id: str) -> None:
    config = _model_config(session, spec.teacher, settings, "teacher", tenant_id)
    _check_generator(session, spec, settings, config, tenant_id)
    if config is None:
        return
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise InvalidSpec(
            f"{spec.teacher!r} is a {config.get('model_type')} model; teachers must be one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (BiLSTM and CNN students cannot teach)",
            "teacher",
        )
    uses_teacher = registry.get(spec.method.name).method_cls.uses_teacher
    classifier = is_sequence_classifier(config)
    if uses_teacher and not classifier:
        raise InvalidSpec(
            f"{spec.teacher!r} is a base encoder, not a fine-tuned sequence classifier; "
            f"{spec.method.name} needs one: run a finetune job and use job:<its id>",
            "teacher",
        )
    n_layers = int(str(config.get("num_hidden_layers", 0)))
    student = spec.student
    if isinstance(student, FromTeacherStudent) and n_layers:
        if student.layers is not None and max(student.layers) >= n_layers:
            bad = max(student.layers)
            raise InvalidSpec(
                f"index {bad} is out of range: the teacher has {n_layers} layers "
                f"(0..{n_layers - 1})",
                "student.layers",
            )
        if student.num_layers is not None and student.num_layers > n_layers:
            raise InvalidSpec(
                f"{student.num_layers} is more than the teacher's {n_layers} layers",
                "student.num_layers",
            )
    student_config = _student_config(session, spec, settings, config, tenant_id)
    _check_fit(spec, config, student_config)
    _check_memory(spec, settings, config, student_config)
    _check_student_size(spec, config)
    _check_task(spec, config)


def _check_task(spec: JobSpec, config: dict[str, object]) -> None:
    """``dataset.task`` against the teacher and a built-in dataset; a built-in's labels (and
    those of built-in eval sets) against a classifier teacher's.

    Raises:
        InvalidSpec: naming ``dataset.task``, ``dataset.source`` or
            ``dataset.eval_sets.N.source``.
    """
    t_task = teacher_task(config)
    try:
        regression = resolve_regression(spec.dataset.task, t_task)
    except ValueError as e:
        raise InvalidSpec(str(e).removeprefix("dataset.task: "), "dataset.task") from None
    source = spec.dataset.source
    if scheme_of(source) == "builtin:":
        name = source.removeprefix("builtin:")
        builtin_regression = name in BUILTIN_REGRESSION
        if regression is not None and regression != builtin_regression:
            kinds = ("classification", "regression")
            field = "dataset.task" if spec.dataset.task != "auto" else "dataset.source"
            raise InvalidSpec(
                f"built-in {name!r} is a {kinds[builtin_regression]} dataset and the job is "
                f"{kinds[regression]} (teacher: {t_task or 'a base encoder'})",
                field,
            )
        regression = builtin_regression
    metric = spec.training.selection_metric
    if metric and regression is not None and not metric_fits_task(metric, regression):
        kind = "regression" if regression else "classification"
        raise InvalidSpec(
            f"{metric!r} is not a metric of a {kind} task; use "
            + ("'pearson' or 'spearman'" if regression else "'accuracy', 'macro_f1' or 'mcc'"),
            "training.selection_metric",
        )
    if t_task != "classification":
        return
    names = classifier_label_names(config)
    dataset_labels = BUILTIN_LABELS.get(source.removeprefix("builtin:"))
    builtin_source = source.startswith("builtin:") and dataset_labels is not None
    if builtin_source and sorted(names) != sorted(dataset_labels or []):
        raise InvalidSpec(
            f"the teacher's labels {names} do not match the dataset's labels {dataset_labels}",
            "dataset.source",
        )
    for n, es in enumerate(spec.dataset.eval_sets):
        if scheme_of(es.source) != "builtin:":
            continue  # a file's labels: _check_dataset_files
        name = es.source.removeprefix("builtin:")
        if name in BUILTIN_EVAL_ONLY:
            labels = BUILTIN_LABELS["rotten_tomatoes"]  # mapped from the ratings
        else:
            labels = BUILTIN_LABELS.get(name, [])
        if name in BUILTIN_REGRESSION or any(x not in names for x in labels):
            raise InvalidSpec(
                f"its labels {labels or '(regression scores)'} are not the teacher's labels "
                f"{names}",
                f"dataset.eval_sets.{n}.source",
            )


def _check_fit(
    spec: JobSpec,
    teacher_config: dict[str, object],
    student_config: dict[str, object] | None,
) -> None:
    """Let the method check its fit to the real model shapes (422 naming the field if not).
    A pure check on shapes: nothing is allocated."""
    labels = classifier_label_names(teacher_config) or ["?", "?"]
    teacher = shape_from_config(teacher_config, len(labels))
    if isinstance(spec.student, PretrainedStudent) and student_config is None:
        return  # a hub student: its shape is known only to the worker
    try:
        student = planned_student_shape(spec.student, teacher, student_config)
        registry.check(spec.method, teacher, student, spec.training)
    except SpecError as e:
        raise InvalidSpec(e.reason, e.field) from None


def _check_student_size(spec: JobSpec, teacher_config: dict[str, object]) -> None:
    """Refuse a ``fresh`` student with more parameters than its teacher (both counted from the
    configs, nothing allocated) unless ``student.allow_larger_than_teacher`` is true.

    Raises:
        InvalidSpec: naming ``student.allow_larger_than_teacher``, with both parameter counts
            (also in ``details``: ``student_parameters``, ``teacher_parameters``).
    """
    student = spec.student
    if not isinstance(student, FreshStudent) or student.allow_larger_than_teacher:
        return
    labels = len(classifier_label_names(teacher_config)) or 2
    try:
        ours = memory.student_size(student, teacher_config, None, labels).parameters
    except ValueError:
        return  # a shape problem: reported by the fit check
    theirs = memory.teacher_size(teacher_config, labels).parameters
    if ours <= theirs:
        return
    raise InvalidSpec(
        f"this fresh student has {ours:,} parameters, more than its teacher's {theirs:,}: it "
        "would be slower and larger than the model it learns from. Make it smaller "
        "(student.num_layers, student.hidden_size, student.intermediate_size) or set "
        "student.allow_larger_than_teacher to true",
        "student.allow_larger_than_teacher",
        {"student_parameters": ours, "teacher_parameters": theirs},
    )


def _check_memory(
    spec: JobSpec,
    settings: Settings,
    teacher_config: dict[str, object],
    student_config: dict[str, object] | None,
) -> None:
    """The job's training memory estimate (:mod:`kd_engine.memory`) against the budget of the
    queue it is sent to (``settings.queue_memory_bytes``; a queue without one is not checked).

    Raises:
        InvalidSpec: over the budget, naming ``training.batch_size``, ``student`` or
            ``teacher``; ``details`` has ``estimate_bytes``, ``parameter_bytes``,
            ``activation_bytes``, ``limit_bytes`` and ``queue``.
    """
    limit = settings.queue_memory_bytes.get(settings.queue)
    if limit is None:
        return
    if isinstance(spec.student, PretrainedStudent) and student_config is None:
        return  # a hub student: its size is known only to the worker
    labels = len(classifier_label_names(teacher_config)) or 2
    uses_teacher = registry.get(spec.method.name).method_cls.uses_teacher
    try:
        student = memory.student_size(spec.student, teacher_config, student_config, labels)
    except ValueError:
        return  # a shape problem: reported by the fit check
    estimate = memory.estimate_training_memory(
        memory.teacher_size(teacher_config, labels),
        student,
        spec.training.batch_size,
        spec.training.max_seq_length,
        spec.training.eval_batch_size,
        teacher_forward=uses_teacher,
    )
    over = memory.over_budget(estimate, limit, settings.queue)
    if over is None:
        return
    field, reason = over
    raise InvalidSpec(
        reason,
        field,
        {
            "estimate_bytes": estimate.total_bytes,
            "parameter_bytes": estimate.parameter_bytes,
            "activation_bytes": estimate.activation_bytes,
            "limit_bytes": limit,
            "queue": settings.queue,
        },
    )


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
        except ValueError as e:
            raise InvalidSpec(str(e), f"dataset.{field}") from None


def _check_corpus(session: Session, spec: JobSpec, settings: Settings, tenant_id: str) -> None:
    """The unlabelled corpus a method names (``minimax_knn``'s ``method.corpus``): a built-in
    corpus, or a file under the data root like a dataset source.

    Raises:
        InvalidSpec: naming ``method.corpus``.
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
    except SpecError as e:
        raise InvalidSpec(e.reason, e.field) from None
    except ValueError as e:
        raise InvalidSpec(str(e), "method.corpus") from None


def _check_dataset_files(
    session: Session, spec: JobSpec, settings: Settings, tenant_id: str
) -> None:
    """Read every dataset file of the job (:func:`check_dataset_files`, at most
    ``settings.dataset_check_rows`` rows each): columns, encoding, malformed lines, labels
    against each other and against a classifier teacher's, the split sizes. Runs after the
    cheaper checks; a hub teacher's labels are left to the worker.

    Raises:
        InvalidSpec: naming the field (``dataset.source``, ``dataset.label_column``,
            ``dataset.eval_sets.N.label_column``, ...), the file and the line.
    """
    ds = spec.dataset
    files = [ds.source, ds.dev_source, ds.test_source, *(es.source for es in ds.eval_sets)]
    if all(ref is None or scheme_of(ref) == "builtin:" for ref in files):
        return  # built-ins only: checked by name
    config = _model_config(session, spec.teacher, settings, "teacher", tenant_id)
    t_task = teacher_task(config) if config is not None else None
    if config is not None:
        try:
            regression = resolve_regression(ds.task, t_task)
        except ValueError as e:
            raise InvalidSpec(str(e).removeprefix("dataset.task: "), "dataset.task") from None
    else:
        regression = None if ds.task == "auto" else ds.task == "regression"
    labels = classifier_label_names(config) if config and t_task == "classification" else None
    try:
        check_dataset_files(
            ds,
            lambda ref: refs.dataset_file(ref, settings),
            labels,
            regression,
            settings.dataset_check_rows,
        )
    except SpecError as e:
        raise InvalidSpec(e.reason, e.field) from None


def validate_references(
    session: Session,
    spec: JobSpec,
    settings: Settings,
    tenant_id: str,
    *,
    defer_pending: bool = False,
) -> None:
    """Every check of a spec's references and files at submit: datasets, corpus, teacher
    (with the student, generator, fit, memory and task checks) and the dataset files' content.
    Run again by :func:`core.dependencies.release_waiting` once a waiting job's dependencies
    have succeeded (then with no reference deferred).

    With ``defer_pending`` (a submit whose spec names unfinished jobs as ``job:<id>``), a
    reference to a job still :data:`PENDING_DEPENDENCY` is accepted like a hub id, its checks
    left for the release.

    Raises:
        InvalidSpec: naming the field and the reason.
    """
    token = _DEFERRING.set(defer_pending)
    try:
        _check_dataset(session, spec, settings, tenant_id)
        _check_corpus(session, spec, settings, tenant_id)
        _check_teacher(session, spec, settings, tenant_id)
        _check_dataset_files(session, spec, settings, tenant_id)
    finally:
        _DEFERRING.reset(token)


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
        InvalidSpec: such a setting was given explicitly (naming ``dataset.<name>``): it would
            be ignored, so it is refused rather than silently dropped; likewise a ``student``
            beside ``born_again``'s ``init: random`` (naming ``student``).
    """
    if getattr(spec.method, "init", None) == "random" and "student" in spec.model_fields_set:
        raise InvalidSpec(
            "born_again with method.init 'random' trains every generation from a random "
            "initialisation of the teacher's architecture and ignores the student: leave "
            "student out, or set method.init to 'student'",
            "student",
        )
    ignored = ignored_dataset_fields(spec.dataset)
    for name, why in ignored.items():
        if name in spec.dataset.model_fields_set:
            raise InvalidSpec(
                f"{why}; this setting would be ignored: leave it out", f"dataset.{name}"
            )
    stored = spec.model_dump(mode="json")
    for name in ignored:
        stored["dataset"].pop(name, None)
    return stored


def _plan_shapes(
    session: Session, spec: JobSpec, settings: Settings, tenant_id: str
) -> tuple[ModelShape, ModelShape] | None:
    """The teacher's and the student's shapes a chain method plans its hops from (None when a
    model is known only to the worker: a hub id, a job not finished yet)."""
    token = _DEFERRING.set(True)
    try:
        config = _model_config(session, spec.teacher, settings, "teacher", tenant_id)
        if config is None:
            return None
        student_config = _student_config(session, spec, settings, config, tenant_id)
    finally:
        _DEFERRING.reset(token)
    if isinstance(spec.student, PretrainedStudent) and student_config is None:
        return None
    teacher = shape_from_config(config, len(classifier_label_names(config)) or 2)
    return teacher, planned_student_shape(spec.student, teacher, student_config)


def job_plan(session: Session, spec: JobSpec, settings: Settings, tenant_id: str) -> JobPlan | None:
    """The job's effective plan (:func:`kd_engine.plan.plan_job`): every stage with its length,
    learning rate, warm-up and schedule and where each comes from. None for a chain method
    whose models are not known yet (a hub teacher, a ``job:`` teacher not finished), or for
    settings whose stages cannot be planned (refused by the method's check).

    Raises:
        InvalidSpec: a ``training`` setting the user set that no stage uses (the method's
            recipe sets its own), naming it and the method setting to use instead.
    """
    shapes: tuple[ModelShape, ModelShape] | None = None
    if issubclass(registry.get(spec.method.name).method_cls, ChainMethod):
        shapes = _plan_shapes(session, spec, settings, tenant_id)
        if shapes is None:
            return None
    try:
        plan = plan_job(spec, *(shapes or (None, None)))
    except SpecError as e:
        raise InvalidSpec(e.reason, e.field) from None
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
        raise InvalidSpec(
            f"{name} does not use {field}: its recipe sets this for every stage (the submit "
            f"answer's plan shows each stage's values; docs/methods.md); {use}",
            field,
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
