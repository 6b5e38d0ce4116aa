"""Rules of the job lifecycle: what may be submitted, cancelled, downloaded."""

from __future__ import annotations

import logging
import uuid
from contextvars import ContextVar
from pathlib import Path
from typing import Any

from celery import Celery
from sqlalchemy.orm import Session

from api import (
    checkpoints,
    dependencies,
    events,
    files,
    idempotency,
    quotas,
    refs,
    repository,
    tenants,
)
from api.db import FINISHED, Artifact, Job, JobCheckpoint, utcnow
from api.errors import Conflict, InvalidSpec, NotFound, Unavailable
from api.queue import BrokerUnavailable, enqueue
from api.settings import Settings
from api.storage import InvalidKey, StorageError, artifact_storage, join_key
from kd_engine import memory, registry
from kd_engine.checkpoint import STUDENT_DIR
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

log = logging.getLogger("distillery.api")


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
"""True while :func:`submit` validates a spec: a ``job:`` reference to an unfinished job (see
:data:`PENDING_DEPENDENCY`) is then accepted like a hub id, its checks left for the release."""


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
            return None  # a dependency: checked when it succeeds (api.dependencies)
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
    uses_teacher = registry.get(spec.method.name).method_cls.needs.teacher
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
    uses_teacher = registry.get(spec.method.name).method_cls.needs.teacher
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
    session: Session, spec: JobSpec, settings: Settings, tenant_id: str
) -> None:
    """Every check of a spec's references and files at submit: datasets, corpus, teacher
    (with the student, generator, fit, memory and task checks) and the dataset files' content.
    Run again by :func:`api.dependencies.release_waiting` once a waiting job's dependencies
    have succeeded (then with no reference deferred).

    Raises:
        InvalidSpec: naming the field and the reason.
    """
    _check_dataset(session, spec, settings, tenant_id)
    _check_corpus(session, spec, settings, tenant_id)
    _check_teacher(session, spec, settings, tenant_id)
    _check_dataset_files(session, spec, settings, tenant_id)


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


SUBMIT_ROUTE = "POST /v1/jobs"
NOT_QUEUED = "the job could not be queued"
"""How the ``error`` of a job the broker never took starts (see :func:`submit`)."""


def submit(
    session: Session,
    celery: Celery,
    settings: Settings,
    spec: JobSpec,
    *,
    tenant_id: str,
    idempotency_key: str | None = None,
    name: str | None = None,
    metadata: dict[str, str] | None = None,
) -> tuple[Job, bool]:
    """Validate references, check the tenant's quotas, persist a queued job of ``tenant_id``,
    commit, then enqueue it (holding no database connection while the broker is waited for).
    With an ``idempotency_key`` already used for the same spec, the earlier job is returned
    instead and nothing is created; returns the job and whether it is that earlier one
    (replayed). ``name`` and ``metadata`` (validated by :mod:`api.job_labels`) are stored on
    the job and count in the idempotency check like the spec.

    A job the broker did not take is kept as failed (its ``error`` starts with
    :data:`NOT_QUEUED`) and keeps its idempotency key: a retry with the same key and spec
    returns that same job, queued again (:func:`_queue_again`), rather than a new one. A
    submit that stored nothing (it failed before its commit) left no key behind either, so its
    retry creates the job.

    Raises:
        InvalidSpec: a reference does not exist (or is another tenant's job) or does not fit
            the method; the idempotency key was used with another spec (422).
        QuotaExceeded: the tenant has its maximum of active jobs or of stored bytes (429).
        Unavailable: the broker is down or did not answer within
            ``settings.broker_publish_timeout_s``; the job is kept as failed with that reason
            (503, ``details.job_id`` names it), never left queued without a message.
    """
    stored_spec = spec_to_store(spec)
    labels = {k: v for k, v in (("name", name), ("metadata", metadata)) if v}
    request_sha256 = idempotency.body_sha256({**stored_spec, **labels})
    if idempotency_key is not None:
        earlier = idempotency.find(
            session,
            tenant_id,
            SUBMIT_ROUTE,
            idempotency_key,
            request_sha256,
            settings.idempotency_ttl_s,
        )
        if earlier is not None:
            return _replay(session, celery, settings, earlier, tenant_id), True
    pending = dependencies.check_references(session, spec, tenant_id)
    token = _DEFERRING.set(bool(pending))
    try:
        validate_references(session, spec, settings, tenant_id)
    finally:
        _DEFERRING.reset(token)
    plan = job_plan(session, spec, settings, tenant_id)
    planned: dict[str, Any] = {"plan": plan.as_dict()} if plan is not None else {}

    def create() -> str:
        quotas.check_active_jobs(session, tenant_id, settings)
        quotas.check_stored_bytes(session, tenant_id, settings)
        job_id = str(uuid.uuid4())
        row = repository.create_job(
            session,
            job_id,
            spec.method.name,
            stored_spec,
            tenant_id=tenant_id,
            queue=settings.queue,
        )
        row.name, row.labels = name, metadata or None
        if pending:
            row.status = "waiting"
            session.flush()
            dependencies.add_dependencies(session, job_id, pending)
            events.record(
                session,
                job_id,
                "waiting",
                f"{spec.method.name} job waiting for job {', '.join(pending)} to succeed",
                data={"method": spec.method.name, "depends_on": pending, **planned},
            )
            return job_id
        events.record(
            session,
            job_id,
            "queued",
            f"{spec.method.name} job queued",
            data={"method": spec.method.name, **planned},
        )
        return job_id

    outcome = idempotency.create_once(
        session,
        tenant_id=tenant_id,
        route=SUBMIT_ROUTE,
        key=idempotency_key,
        request_sha256=request_sha256,
        ttl_s=settings.idempotency_ttl_s,
        create=create,
    )
    job = get(session, outcome.resource_id, tenant_id=tenant_id)
    if outcome.replayed:
        return job, True
    if job.status == "waiting":  # not sent; released here if its dependency just finished
        dependencies.release_waiting(session, settings, celery, only=[job.id])
        return get(session, job.id, tenant_id=tenant_id), False
    _send(session, celery, settings, job)
    return job, False


def _send(session: Session, celery: Celery, settings: Settings, job: Job) -> None:
    """Enqueue the queued ``job``; the session's transaction is ended first, so that no
    database connection is held while the broker is waited for (up to
    ``settings.broker_publish_timeout_s``, however many submits wait at once).

    Raises:
        Unavailable: the broker did not take it; the job is then failed with a reason that
            starts with :data:`NOT_QUEUED` (503).
    """
    session.commit()  # nothing pending: returns the connection to the pool (rows stay loaded)
    try:
        enqueue(celery, job.id, job.queue, settings.broker_publish_timeout_s)
    except BrokerUnavailable as e:
        repository.transition(
            session,
            job.id,
            ("queued",),
            "failed",
            error=f"{NOT_QUEUED} (broker unavailable: {e}); submit it again with the same "
            "Idempotency-Key (or without one)",
            finished_at=utcnow(),
        )
        events.record(
            session,
            job.id,
            "failed",
            "the broker is unavailable; the job was not queued",
            level="error",
            data={"not_queued": True},
        )
        session.commit()
        raise Unavailable(
            f"the broker is unavailable; job {job.id} was not queued (it is failed): submit "
            "again, with the same Idempotency-Key to queue this same job",
            details={"job_id": job.id},
        ) from None


def _never_queued(job: Job) -> bool:
    """Whether ``job`` failed because the broker never took it (it never ran)."""
    return (
        job.status == "failed"
        and job.started_at is None
        and (job.error or "").startswith(NOT_QUEUED)
    )


def _replay(
    session: Session, celery: Celery, settings: Settings, job_id: str, tenant_id: str
) -> Job:
    """The job an earlier request with the same idempotency key created; queued again when the
    broker never took it (:func:`_queue_again`)."""
    job = get(session, job_id, tenant_id=tenant_id)
    if _never_queued(job):
        return _queue_again(session, celery, settings, job, tenant_id)
    return job


def _queue_again(
    session: Session, celery: Celery, settings: Settings, job: Job, tenant_id: str
) -> Job:
    """Queue again a job of ``tenant_id`` that failed because the broker never took it (a
    retry of its submit with the same idempotency key): failed -> queued under the tenant's
    quotas, a ``queued`` event, then sent. A concurrent retry that queued it first wins (the
    job is returned as it is).

    Raises:
        QuotaExceeded: the tenant has its maximum of active jobs or of stored bytes (429).
        Unavailable: the broker still does not take it (503); it is failed again.
    """
    try:
        tenants.lock_tenant(session, tenant_id)
        quotas.check_active_jobs(session, tenant_id, settings)
        quotas.check_stored_bytes(session, tenant_id, settings)
        if not repository.transition(
            session, job.id, ("failed",), "queued", error=None, finished_at=None
        ):
            session.rollback()
            return get(session, job.id, tenant_id=tenant_id)
        events.record(
            session,
            job.id,
            "queued",
            "queued again by a retry of its submit with the same Idempotency-Key",
            data={"method": job.method, "idempotent_retry": True},
        )
        session.commit()
    except BaseException:
        session.rollback()
        raise
    session.refresh(job)
    _send(session, celery, settings, job)
    return job


def get(session: Session, job_id: str, *, tenant_id: str) -> Job:
    """The job of ``tenant_id``, as stored (reading never changes it: a job whose worker was
    lost is re-queued or failed by the reconciler, :mod:`worker.reconciler`).

    Raises:
        NotFound: no such job, or another tenant's (the same answer).
    """
    job = repository.get_tenant_job(session, job_id, tenant_id=tenant_id)
    if job is None:
        raise NotFound(f"no job {job_id!r}")
    return job


def cancel(
    session: Session,
    job_id: str,
    *,
    tenant_id: str,
    settings: Settings | None = None,
    celery: Celery | None = None,
) -> Job:
    """Cancel a job of ``tenant_id``: waiting, queued or paused -> cancelled at once (with
    ``settings`` and ``celery``, the jobs waiting for it then fail naming it); running or
    pausing -> cancelling (the worker stops within a few steps); cancelling stays as it is.

    Raises:
        NotFound: no such job (or another tenant's).
        Conflict: the job had already finished (succeeded, failed or cancelled) before this
            request.
    """
    job = get(session, job_id, tenant_id=tenant_id)
    now = utcnow()
    was = job.status
    if repository.transition(
        session, job_id, ("waiting", "queued", "paused"), "cancelled", finished_at=now
    ):
        where = was if was in ("waiting", "paused") else "queued"
        events.record(session, job_id, "cancelled", f"cancelled while {where}")
        session.commit()
        if settings is not None and celery is not None:
            dependencies.release_after(session, settings, celery, job_id)
        session.refresh(job)
        return job
    if repository.transition(session, job_id, ("running", "pausing"), "cancelling"):
        events.record(session, job_id, "cancelling", "cancel requested; the worker stops soon")
        session.commit()
        session.refresh(job)
        return job
    session.rollback()
    session.refresh(job)
    if job.status in FINISHED:
        raise Conflict(f"job {job_id} has already {_finished_verb(job.status)}; nothing to cancel")
    return job


def _finished_verb(status: str) -> str:
    return "been cancelled" if status == "cancelled" else status


def delete(session: Session, settings: Settings, job_id: str, *, tenant_id: str) -> None:
    """Delete a finished job: its row, its artifact rows and its artifact directory.

    Raises:
        NotFound: no such job (or another tenant's).
        Conflict: the job is queued, running or cancelling (cancel it first), or its model is
            named as ``job:<id>`` by a job that has not finished (the message names it).
    """
    job = get(session, job_id, tenant_id=tenant_id)
    if job.status not in FINISHED:
        raise Conflict(
            f"job {job_id} is {job.status}; cancel it first (POST /v1/jobs/{job_id}/cancel) and "
            "delete it once it has finished"
        )
    users = repository.jobs_using_model(session, job_id)
    if users:
        raise Conflict(
            f"the model of job {job_id} is used by unfinished job(s) {', '.join(users)} "
            f"(as job:{job_id}); delete it once they have finished"
        )
    if not repository.delete_finished(session, job_id):
        session.rollback()
        raise Conflict(f"job {job_id} changed while it was being deleted; try again")
    session.commit()
    remove_artifacts(settings, job_id)


def remove_artifacts(settings: Settings, job_id: str) -> None:
    """Remove a job's artifacts from the artifact store (nothing if it has none). A failure is
    logged, not raised: the row is already gone and the files can be removed by hand."""
    try:
        artifact_storage(settings).delete_prefix(refs.job_key(job_id))
    except (OSError, StorageError):
        log.exception("job %s: could not remove its artifacts", job_id)


def artifacts(session: Session, job_id: str, *, tenant_id: str) -> list[Artifact]:
    """The stored files of a job of ``tenant_id`` (empty until it succeeds).

    Raises:
        NotFound: no such job (or another tenant's).
    """
    get(session, job_id, tenant_id=tenant_id)
    return repository.list_artifacts(session, job_id)


def artifact_key(
    session: Session, settings: Settings, job_id: str, name: str, *, tenant_id: str
) -> str:
    """The storage key of one artifact of a job of ``tenant_id``; only names recorded for the
    job are served.

    Raises:
        NotFound: no such job (or another tenant's) or no such file (or it is gone from the
            store).
    """
    known = {a.name for a in artifacts(session, job_id, tenant_id=tenant_id)}
    if name not in known:
        raise NotFound(f"job {job_id} has no artifact {name!r}")
    store = artifact_storage(settings)
    try:
        key = join_key(job_id, name)
    except InvalidKey:
        raise NotFound(f"job {job_id} has no artifact {name!r}") from None
    if not store.exists(key):
        raise NotFound(f"artifact {name!r} of job {job_id} is missing from the store")
    return key


def pause(session: Session, job_id: str, *, tenant_id: str) -> Job:
    """Pause a job of ``tenant_id``: queued -> paused at once (its queued task is skipped
    when a worker receives it); running -> pausing (the worker writes a ``pause`` checkpoint
    at its next check, then sets it paused and is free for other jobs).

    Raises:
        NotFound: no such job (or another tenant's).
        Conflict: the job is in any other status (``details.status`` names it).
    """
    job = get(session, job_id, tenant_id=tenant_id)
    if repository.transition(session, job_id, ("queued",), "paused"):
        events.record(session, job_id, "paused", "paused while queued; resume it to queue it again")
    elif repository.transition(session, job_id, ("running",), "pausing"):
        events.record(
            session, job_id, "pausing", "pause requested; the worker checkpoints and stops soon"
        )
    else:
        session.rollback()
        session.refresh(job)
        raise Conflict(
            f"job {job_id} is {job.status}; only a queued or running job can be paused",
            details={"status": job.status},
        )
    session.commit()
    session.refresh(job)
    return job


def resume(
    session: Session, celery: Celery, settings: Settings, job_id: str, *, tenant_id: str
) -> Job:
    """Resume a paused job of ``tenant_id``: paused -> queued, and queued again on the broker;
    the worker that claims it continues from its newest checkpoint (from the start when it
    has none, e.g. paused while queued).

    Raises:
        NotFound: no such job (or another tenant's).
        Conflict: the job is not paused (``details.status`` names its status).
        Unavailable: the broker is down; the job stays paused (503).
    """
    job = get(session, job_id, tenant_id=tenant_id)
    if not repository.transition(session, job_id, ("paused",), "queued"):
        session.rollback()
        session.refresh(job)
        raise Conflict(
            f"job {job_id} is {job.status}; only a paused job can be resumed",
            details={"status": job.status},
        )
    events.record(
        session, job_id, "queued", "resumed by request; queued again", data={"resume": True}
    )
    session.commit()
    try:
        enqueue(celery, job_id, job.queue)  # the queue its memory was checked for
    except BrokerUnavailable:
        if repository.transition(session, job_id, ("queued",), "paused"):
            events.record(
                session,
                job_id,
                "paused",
                "the broker is unavailable; the job was not queued and stays paused",
                level="warning",
            )
        session.commit()
        raise Unavailable(
            "the broker is unavailable; the job stays paused, resume it again later"
        ) from None
    session.refresh(job)
    return job


def job_checkpoints(session: Session, job_id: str, *, tenant_id: str) -> list[JobCheckpoint]:
    """The checkpoints of a job of ``tenant_id``, oldest first.

    Raises:
        NotFound: no such job (or another tenant's).
    """
    get(session, job_id, tenant_id=tenant_id)
    return checkpoints.list_checkpoints(session, job_id)


def checkpoint_student_files(
    session: Session, settings: Settings, job_id: str, name: str, *, tenant_id: str
) -> list[tuple[str, str]]:
    """``(key, relative path)`` of each stored file of the ``student/`` folder of checkpoint
    ``name`` of a job of ``tenant_id``, sorted.

    Raises:
        NotFound: no such job (or another tenant's), no such checkpoint, or its files are gone.
    """
    get(session, job_id, tenant_id=tenant_id)
    row = checkpoints.get_checkpoint(session, job_id, name)
    if row is None:
        raise NotFound(f"job {job_id} has no checkpoint {name!r}")
    prefix = join_key(checkpoints.checkpoint_key(job_id, name), STUDENT_DIR)
    keys = artifact_storage(settings).list_keys(prefix)
    if not keys:
        raise NotFound(f"checkpoint {name!r} of job {job_id} is missing from the store")
    return [(k, k.removeprefix(prefix + "/")) for k in keys]
