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
from api.db import Artifact, Job, JobCheckpoint, utcnow
from api.errors import Conflict, NotFound, Unavailable
from api.job_status import FINISHED, PENDING_DEPENDENCY, JobStatus
from api.queue import BrokerUnavailable, enqueue
from api.settings import Settings
from api.storage import InvalidKey, StorageError, artifact_storage, join_key
from kd_engine import registry
from kd_engine.checkpoint import STUDENT_DIR
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

log = logging.getLogger("distillery.api")


def scheme_of_or_none(ref: str) -> str | None:
    """The scheme of ``ref``, or None when it has no known one (refused later, by name)."""
    try:
        return scheme_of(ref)
    except ValueError:
        return None


_DEFERRING: ContextVar[bool] = ContextVar("distillery_deferring", default=False)
"""True while :func:`submit` validates a spec: a ``job:`` reference to an unfinished job (see
:data:`api.job_status.PENDING_DEPENDENCY`) is then accepted like a hub id, its checks left for
the release."""


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
            return None  # a dependency: checked when it succeeds (api.dependencies)
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
    session: Session, spec: JobSpec, settings: Settings, tenant_id: str
) -> ModelConfigs:
    """The one check of a job at submit: the datasets and corpus it names, its models' configs
    read once (:func:`model_configs`) and checked by :func:`kd_engine.validation.check_models`
    (the check the worker runs again, with the queue's memory budget and the student-size rule
    on top), then the dataset files' content. Run again by
    :func:`api.dependencies.release_waiting` once a waiting job's dependencies have succeeded
    (then with no reference deferred). Returns the configs it read (for the plan).

    Raises:
        SpecError: naming the field and the reason.
    """
    _check_dataset(session, spec, settings, tenant_id)
    _check_corpus(session, spec, settings, tenant_id)
    configs = model_configs(session, spec, settings, tenant_id)
    policy = SubmitPolicy(settings.queue, settings.queue_memory_bytes.get(settings.queue))
    check_models(spec, configs, policy)
    _check_dataset_files(spec, settings, configs.teacher)
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
        SpecError: a reference does not exist (or is another tenant's job) or does not fit
            the method (422).
        SpecError: the idempotency key was used with another spec (422).
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
        configs = validate_references(session, spec, settings, tenant_id)
    finally:
        _DEFERRING.reset(token)
    plan = job_plan(spec, configs)
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
            status=JobStatus.WAITING if pending else JobStatus.QUEUED,
        )
        row.name, row.labels = name, metadata or None
        if pending:
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
    if job.status == JobStatus.WAITING:  # not sent; released here if its dependency just finished
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
            (JobStatus.QUEUED,),
            JobStatus.FAILED,
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
        job.status == JobStatus.FAILED
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
            session,
            job.id,
            (JobStatus.FAILED,),
            JobStatus.QUEUED,
            error=None,
            finished_at=None,
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
        session,
        job_id,
        (JobStatus.WAITING, JobStatus.QUEUED, JobStatus.PAUSED),
        JobStatus.CANCELLED,
        finished_at=now,
    ):
        where = was if was in (JobStatus.WAITING, JobStatus.PAUSED) else JobStatus.QUEUED
        events.record(session, job_id, "cancelled", f"cancelled while {where}")
        session.commit()
        if settings is not None and celery is not None:
            dependencies.release_after(session, settings, celery, job_id)
        session.refresh(job)
        return job
    if repository.transition(
        session, job_id, (JobStatus.RUNNING, JobStatus.PAUSING), JobStatus.CANCELLING
    ):
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
    return "been cancelled" if status == JobStatus.CANCELLED else status


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
    if repository.transition(session, job_id, (JobStatus.QUEUED,), JobStatus.PAUSED):
        events.record(session, job_id, "paused", "paused while queued; resume it to queue it again")
    elif repository.transition(session, job_id, (JobStatus.RUNNING,), JobStatus.PAUSING):
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
    if not repository.transition(session, job_id, (JobStatus.PAUSED,), JobStatus.QUEUED):
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
        if repository.transition(session, job_id, (JobStatus.QUEUED,), JobStatus.PAUSED):
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
