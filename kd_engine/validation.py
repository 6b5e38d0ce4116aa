"""The one check of a job spec against its models: what the API runs at submit and the worker
runs again before it trains.

:func:`check_models` takes the spec and the ``config.json`` of each model it names, each read
once by the caller (the API from its references, the worker from its local copies), and
raises :class:`~kd_engine.errors.SpecError` naming the field and the reason: the teacher's
kind (a supported encoder; a fine-tuned classifier for a method that learns from it), the
student's layers and vocabulary, the generator, the method's fit to the shapes
(:func:`kd_engine.registry.check`), ``dataset.task`` and a built-in dataset's labels against
the teacher, and, at submit (:class:`SubmitPolicy`), the memory budget of the queue and the
fresh-student size rule. It returns the shapes it checked (:class:`CheckedModels`), which the
plan and the worker use as they are. Pure: reads no file, allocates no model.
"""

from __future__ import annotations

from dataclasses import dataclass

from kd_engine import memory, registry
from kd_engine.data.builtins import BUILTIN_EVAL_ONLY, BUILTIN_LABELS, BUILTIN_REGRESSION
from kd_engine.data.loading import resolve_regression
from kd_engine.errors import SpecError
from kd_engine.evaluation import metric_fits_task
from kd_engine.models.loading import (
    SUPPORTED_MODEL_TYPES,
    classifier_label_names,
    is_sequence_classifier,
    teacher_task,
)
from kd_engine.models.shapes import ModelShape, planned_student_shape, shape_from_config
from kd_engine.references import scheme_of
from kd_engine.spec import FreshStudent, FromTeacherStudent, JobSpec, PretrainedStudent

Config = dict[str, object]


@dataclass(frozen=True)
class ModelConfigs:
    """The ``config.json`` of each model a job names, read once by the caller; None where it
    is not known where the check runs (a hub id at submit, a ``job:`` model not finished
    yet, a pretrained student the spec does not have)."""

    teacher: Config | None
    student: Config | None = None
    generator: Config | None = None


@dataclass(frozen=True)
class SubmitPolicy:
    """The rules only the API applies at submit: the training memory estimate against the
    budget of the queue the job is sent to (``limit_bytes`` None: not checked) and the refusal
    of a fresh student larger than its teacher."""

    queue: str
    limit_bytes: int | None = None


@dataclass(frozen=True)
class CheckedModels:
    """What :func:`check_models` checked: the teacher's shape and the student's planned shape
    (None where a config was not known), and whether the job is a regression job (None: to be
    decided by the dataset's labels)."""

    teacher: ModelShape | None
    student: ModelShape | None
    regression: bool | None


def base_encoder_reason(teacher: str, method: str) -> str:
    """Why a base-encoder teacher cannot teach ``method`` (field ``teacher``)."""
    return (
        f"{teacher!r} is a base encoder, not a fine-tuned sequence classifier; {method} needs "
        "one: run a finetune job first and use job:<its id> as the teacher"
    )


def check_teacher_labels(teacher: list[str], dataset: list[str]) -> None:
    """A classifier teacher's labels against the dataset's (any order).

    Raises:
        SpecError: naming ``dataset.source``, with both lists.
    """
    if sorted(teacher) != sorted(dataset):
        raise SpecError(
            "dataset.source",
            f"the teacher's labels {teacher} do not match the dataset's labels {dataset}",
        )


def check_models(
    spec: JobSpec,
    configs: ModelConfigs,
    policy: SubmitPolicy | None = None,
    *,
    num_labels: int | None = None,
) -> CheckedModels:
    """Check ``spec`` against its models' configs (see the module docstring).

    Args:
        spec: the parsed job spec.
        configs: the models' ``config.json`` dicts (None: not known here; its checks are
            left to where it is).
        policy: the submit-time rules (the API's); None in the worker.
        num_labels: the number of outputs (the worker's, from the teacher and the data);
            default: the teacher's labels, 2 for a base encoder.

    Raises:
        SpecError: naming the field and the reason (``details`` for the memory budget and the
            student size).
    """
    _check_generator(spec, configs)
    config = configs.teacher
    if config is None:
        return CheckedModels(None, None, None if spec.dataset.task == "auto" else _task(spec))
    if config.get("model_type") not in SUPPORTED_MODEL_TYPES:
        raise SpecError(
            "teacher",
            f"{spec.teacher!r} is a {config.get('model_type')} model; teachers must be one of "
            f"{', '.join(SUPPORTED_MODEL_TYPES)} (BiLSTM and CNN students cannot teach)",
        )
    uses_teacher = registry.get(spec.method.name).method_cls.needs.teacher
    if uses_teacher and not is_sequence_classifier(config):
        raise SpecError("teacher", base_encoder_reason(spec.teacher, spec.method.name))
    n_layers = int(str(config.get("num_hidden_layers", 0)))
    student = spec.student
    if isinstance(student, FromTeacherStudent) and n_layers:
        if student.layers is not None and max(student.layers) >= n_layers:
            raise SpecError(
                "student.layers",
                f"index {max(student.layers)} is out of range: the teacher has {n_layers} "
                f"layers (0..{n_layers - 1})",
            )
        if student.num_layers is not None and student.num_layers > n_layers:
            raise SpecError(
                "student.num_layers",
                f"{student.num_layers} is more than the teacher's {n_layers} layers",
            )
    _check_student_config(spec, config, configs.student)
    labels = num_labels or len(classifier_label_names(config)) or 2
    teacher = shape_from_config(config, labels)
    planned: ModelShape | None = None
    if not isinstance(spec.student, PretrainedStudent) or configs.student is not None:
        planned = planned_student_shape(spec.student, teacher, configs.student)
        registry.check(spec.method, teacher, planned, spec.training)
    if policy is not None:
        _check_memory(spec, policy, config, configs.student, labels, uses_teacher)
        _check_student_size(spec, config, labels)
    regression = _check_task(spec, config)
    return CheckedModels(teacher, planned, regression)


def _task(spec: JobSpec) -> bool:
    return spec.dataset.task == "regression"


def _check_student_config(spec: JobSpec, teacher: Config, student: Config | None) -> None:
    """A pretrained student's config: the teacher's vocabulary, and the layers its ``layers``
    / ``num_layers`` choose (the label count plays no part).

    Raises:
        SpecError: naming ``student.model``, ``student.layers`` or ``student.num_layers``.
    """
    if not isinstance(spec.student, PretrainedStudent) or student is None:
        return
    if student.get("vocab_size") != teacher.get("vocab_size"):
        raise SpecError(
            "student.model",
            f"its vocabulary ({student.get('vocab_size')} tokens) differs from the teacher's "
            f"({teacher.get('vocab_size')}); a pretrained student must share the teacher's "
            "tokenizer",
        )
    planned_student_shape(spec.student, shape_from_config(teacher, 2), student)


def _check_generator(spec: JobSpec, configs: ModelConfigs) -> None:
    """``method.generator`` of an augmentation method, when its config is known: a masked LM
    (``architectures`` names a ``*ForMaskedLM`` class) with the teacher's vocabulary.

    Raises:
        SpecError: naming ``method.generator``.
    """
    ref = getattr(spec.method, "generator", None)
    config = configs.generator
    if not isinstance(ref, str) or config is None:
        return
    field = "method.generator"
    archs = config.get("architectures")
    if not isinstance(archs, list) or not any(str(a).endswith("ForMaskedLM") for a in archs):
        raise SpecError(
            field,
            f"{ref!r} is not a masked-LM checkpoint (its config's architectures: {archs}); "
            "the generator must be one (e.g. BertForMaskedLM), or leave method.generator "
            "unset to build one from the teacher",
        )
    teacher = configs.teacher
    if teacher is not None and config.get("vocab_size") != teacher.get("vocab_size"):
        raise SpecError(
            field,
            f"its vocabulary ({config.get('vocab_size')} tokens) differs from the teacher's "
            f"({teacher.get('vocab_size')}); the generator must share the teacher's "
            "tokenizer",
        )


def _check_task(spec: JobSpec, config: Config) -> bool | None:
    """``dataset.task`` against the teacher and a built-in dataset; a built-in's labels (and
    those of built-in eval sets) against a classifier teacher's. Returns whether the job is
    a regression job (None: decided by the labels of a dataset file).

    Raises:
        SpecError: naming ``dataset.task``, ``dataset.source``,
            ``training.selection_metric`` or ``dataset.eval_sets.N.source``.
    """
    t_task = teacher_task(config)
    regression = resolve_regression(spec.dataset.task, t_task)
    source = spec.dataset.source
    if scheme_of(source) == "builtin:":
        name = source.removeprefix("builtin:")
        builtin_regression = name in BUILTIN_REGRESSION
        if regression is not None and regression != builtin_regression:
            kinds = ("classification", "regression")
            raise SpecError(
                "dataset.task" if spec.dataset.task != "auto" else "dataset.source",
                f"built-in {name!r} is a {kinds[builtin_regression]} dataset and the job is "
                f"{kinds[regression]} (teacher: {t_task or 'a base encoder'})",
            )
        regression = builtin_regression
    metric = spec.training.selection_metric
    if metric and regression is not None and not metric_fits_task(metric, regression):
        kind = "regression" if regression else "classification"
        raise SpecError(
            "training.selection_metric",
            f"{metric!r} is not a metric of a {kind} task; use "
            + ("'pearson' or 'spearman'" if regression else "'accuracy', 'macro_f1' or 'mcc'"),
        )
    if t_task != "classification":
        return regression
    names = classifier_label_names(config)
    dataset_labels = BUILTIN_LABELS.get(source.removeprefix("builtin:"))
    if source.startswith("builtin:") and dataset_labels is not None:
        check_teacher_labels(names, dataset_labels)
    for n, es in enumerate(spec.dataset.eval_sets):
        if scheme_of(es.source) != "builtin:":
            continue  # a file's labels: kd_engine.data.checks
        name = es.source.removeprefix("builtin:")
        if name in BUILTIN_EVAL_ONLY:
            labels = BUILTIN_LABELS["rotten_tomatoes"]  # mapped from the ratings
        else:
            labels = BUILTIN_LABELS.get(name, [])
        if name in BUILTIN_REGRESSION or any(x not in names for x in labels):
            raise SpecError(
                f"dataset.eval_sets.{n}.source",
                f"its labels {labels or '(regression scores)'} are not the teacher's labels "
                f"{names}",
            )
    return regression


def _check_student_size(spec: JobSpec, teacher_config: Config, labels: int) -> None:
    """Refuse a ``fresh`` student with more parameters than its teacher (both counted from the
    configs, nothing allocated) unless ``student.allow_larger_than_teacher`` is true.

    Raises:
        SpecError: naming ``student.allow_larger_than_teacher``, with both parameter counts
            (also in ``details``: ``student_parameters``, ``teacher_parameters``).
    """
    student = spec.student
    if not isinstance(student, FreshStudent) or student.allow_larger_than_teacher:
        return
    try:
        ours = memory.student_size(student, teacher_config, None, labels).parameters
    except ValueError:
        return  # a shape problem: reported by the fit check
    theirs = memory.teacher_size(teacher_config, labels).parameters
    if ours <= theirs:
        return
    raise SpecError(
        "student.allow_larger_than_teacher",
        f"this fresh student has {ours:,} parameters, more than its teacher's {theirs:,}: it "
        "would be slower and larger than the model it learns from. Make it smaller "
        "(student.num_layers, student.hidden_size, student.intermediate_size) or set "
        "student.allow_larger_than_teacher to true",
        {"student_parameters": ours, "teacher_parameters": theirs},
    )


def _check_memory(
    spec: JobSpec,
    policy: SubmitPolicy,
    teacher_config: Config,
    student_config: Config | None,
    labels: int,
    uses_teacher: bool,
) -> None:
    """The job's training memory estimate (:mod:`kd_engine.memory`) against the queue's
    budget (none: not checked; a hub student's size is known only to the worker).

    Raises:
        SpecError: over the budget, naming ``training.batch_size``, ``student`` or
            ``teacher``; ``details`` has ``estimate_bytes``, ``parameter_bytes``,
            ``activation_bytes``, ``limit_bytes`` and ``queue``.
    """
    limit = policy.limit_bytes
    if limit is None:
        return
    if isinstance(spec.student, PretrainedStudent) and student_config is None:
        return
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
    over = memory.over_budget(estimate, limit, policy.queue)
    if over is None:
        return
    field, reason = over
    raise SpecError(
        field,
        reason,
        {
            "estimate_bytes": estimate.total_bytes,
            "parameter_bytes": estimate.parameter_bytes,
            "activation_bytes": estimate.activation_bytes,
            "limit_bytes": limit,
            "queue": policy.queue,
        },
    )
