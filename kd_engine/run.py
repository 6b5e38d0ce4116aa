"""Run one job spec end to end: data, teacher, student, training, evaluation, export.

This is what a worker calls; it knows nothing of HTTP, databases or queues. Reference
resolution (which local directory a model reference means) is the caller's: it passes
``teacher_path`` and a ``resolve`` function for dataset files.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import PreTrainedModel

from kd_engine import names, registry
from kd_engine.checkpoint import (
    Checkpointer,
    CheckpointPolicy,
    FinishedHop,
    Resume,
    load_checkpoint,
    spec_hash,
)
from kd_engine.contracts import METRICS_SCHEMA_VERSION, JobMetrics, Progress
from kd_engine.data import TransferSet, load_eval_sets, load_transfer_set, relabel
from kd_engine.data.batching import encode, encode_corpus
from kd_engine.data.corpus import load_corpus
from kd_engine.data.loading import PathResolver, resolve_regression
from kd_engine.data.split_artifact import write_split_file
from kd_engine.errors import SpecError
from kd_engine.evaluation import count_parameters, task_metrics, weights_bytes
from kd_engine.export import save_student, write_json
from kd_engine.hops import HopRun, Job, hop_model, run_hop
from kd_engine.latency import ROUNDS, SPREAD_LIMIT, interleaved_latency
from kd_engine.methods.chain import ChainMethod, plan_hops
from kd_engine.models.loading import (
    REGRESSION_OUTPUT,
    classifier_label_names,
    is_sequence_classifier,
    load_classifier,
    load_tokenizer,
    read_config,
    teacher_task,
)
from kd_engine.onnx_export import export_report
from kd_engine.ranks import current as current_rank
from kd_engine.report_html import write_report
from kd_engine.reports import evaluate_sets, split_diagnostics, teacher_match
from kd_engine.spec import JobSpec, PretrainedStudent
from kd_engine.teacher_cache import (
    CacheStore,
    cache_key,
    eligible,
    load_or_build,
    off_report,
    weights_hash,
)
from kd_engine.trainer import (
    TrainHooks,
    TrainResult,
    pick_device,
    seed_everything,
    selection_metric,
)
from kd_engine.validation import (
    ModelConfigs,
    base_encoder_reason,
    check_models,
    check_teacher_labels,
)

METRICS_FILE = names.METRICS_FILE
LOG_FILE = names.LOG_FILE
REPORT_SKIPPED = "export.report is false"
"""``metrics.json``'s ``report["skipped"]`` of a job that writes no report."""


@dataclass(frozen=True)
class RunResult:
    """The metrics written to ``metrics.json`` and the output directory."""

    metrics: dict[str, Any]
    out_dir: Path


def _label_names(
    spec: JobSpec, uses_teacher: bool, teacher_cfg: dict[str, object], data: TransferSet
) -> list[str]:
    """The class order the student uses: the teacher's when it is a classifier. A regression
    job has one output, named as the teacher's (``LABEL_0`` for a base encoder).

    Raises:
        SpecError: a base-encoder teacher for a method that learns from it (``teacher``), or
            a classifier teacher whose labels are not the dataset's (``dataset.source``);
            the messages of :mod:`kd_engine.validation`, as at submit.
    """
    if not is_sequence_classifier(teacher_cfg):
        if uses_teacher:
            raise SpecError("teacher", base_encoder_reason(spec.teacher, spec.method.name))
        return list(REGRESSION_OUTPUT) if data.regression else data.label_names
    names = classifier_label_names(teacher_cfg)
    if data.regression:
        return names if len(names) == 1 else list(REGRESSION_OUTPUT)
    check_teacher_labels(names, data.label_names)
    return names


def _student_config(spec: JobSpec, student_path: Path | str | None) -> dict[str, object] | None:
    """A pretrained student's ``config.json`` (None for any other student).

    Raises:
        SpecError: a pretrained student without a local path (``student.model``).
    """
    if not isinstance(spec.student, PretrainedStudent):
        return None
    if student_path is None:
        raise SpecError("student.model", "no local path was given for the pretrained student")
    return read_config(student_path)


def _tagged(records: list[dict[str, object]], hop: str, many: bool) -> list[dict[str, object]]:
    """``records`` with the hop's name added when the job trains several models."""
    return [{**r, "hop": hop} for r in records] if many else list(records)


def _speed(
    metrics: dict[str, Any],
    models: dict[str, PreTrainedModel],
    data: Any,
    pad_id: int,
    device: torch.device,
) -> None:
    """Time the student (and the teacher) interleaved (:mod:`kd_engine.latency`): each
    model's block gets its median ``latency_s_batch1`` / ``latency_s_batch32`` and
    ``metrics["latency"]`` every figure's median, min, max, spread and ``reliable`` flag, and
    the per-round speed-up."""
    timed = interleaved_latency(models, data, pad_id, device)
    for name in models:
        for key, block in timed.items():
            figure = block[name]
            assert isinstance(figure, dict)
            metrics[name][f"latency_s_{key}"] = figure["median"]
    metrics["latency"] = {
        "protocol": "interleaved",
        "rounds": {f"batch{b}": r for b, (r, _, _) in ROUNDS.items()},
        "batches_per_round": {f"batch{b}": n for b, (_, n, _) in ROUNDS.items()},
        "spread_limit": SPREAD_LIMIT,
        **timed,
    }


def _write_report(
    metrics: dict[str, Any], out_dir: Path, log: Callable[[dict[str, object]], None]
) -> dict[str, Any]:
    """Write ``report.html`` (:func:`kd_engine.report_html.write_report`) from the finished
    metrics; returns ``metrics.json``'s ``report``: ``file``, ``bytes`` and ``seconds``, or
    ``error`` (logged as a warning and added to ``metrics["warnings"]``): a report that cannot
    be drawn never fails the job.

    Raises:
        pydantic.ValidationError: ``metrics`` breaks :class:`~kd_engine.contracts.JobMetrics`
            (a bug of the writer, not a report problem).
    """
    typed = JobMetrics.model_validate(metrics)
    started = time.perf_counter()
    try:
        path = write_report(typed, out_dir)
    except Exception as e:  # the report is a convenience; the student is the job's result
        message = f"the report was not written: {type(e).__name__}: {e}"
        metrics["warnings"].append(message)
        log({"event": "warning", "message": message})
        return {"error": message}
    seconds = time.perf_counter() - started
    return {"file": path.name, "bytes": path.stat().st_size, "seconds": round(seconds, 3)}


def _onnx(
    student: PreTrainedModel,
    job: Job,
    warnings: list[str],
    log: Callable[[dict[str, object]], None],
) -> dict[str, Any]:
    """``metrics.json``'s ``onnx`` block (:func:`kd_engine.onnx_export.export_report`):
    ``model.onnx`` (and ``model.int8.onnx``) written into the output directory. Its warnings
    join ``warnings`` and the log."""

    def warn(message: str) -> None:
        warnings.append(message)
        log({"event": "warning", "message": message})

    return export_report(
        student,
        job.test_enc,
        job.pad_id,
        job.out_dir,
        job.spec.export,
        job.spec.training.eval_batch_size,
        warn,
    )


def _data_parallel(
    student: PreTrainedModel, log: Callable[[dict[str, object]], None]
) -> dict[str, Any] | None:
    """On a rank of a data-parallel run, ``metrics.json``'s ``data_parallel`` block: ``ranks``
    (the world size) and ``same_weights``, whether every rank ended with the same student
    (:func:`~kd_engine.teacher_cache.weights_hash`, gathered: a collective); a difference is a
    logged warning. None outside such a run."""
    ranks = current_rank()
    if ranks is None:
        return None
    same = len(set(ranks.gather(weights_hash(student)))) == 1
    if not same:
        log({"event": "warning", "message": "the data-parallel ranks ended with different weights"})
    return {"ranks": ranks.world_size, "same_weights": same}


def _ensemble(logits: list[torch.Tensor]) -> torch.Tensor:
    """Logits (N, C) of an ensemble: log of the members' mean softmax probabilities (Born-Again
    Networks' ensemble of generations); the mean output for one-output regression."""
    if logits[0].shape[-1] == 1:
        return torch.stack(logits).mean(0)
    return torch.stack([x.softmax(-1) for x in logits]).mean(0).log()


def _finished_hops(job: Job, resume: Resume) -> tuple[PreTrainedModel | None, list[HopRun]]:
    """The hops a checkpoint had finished: their runs, and the last one's model (rebuilt from
    the checkpoint's weights: the next hop's teacher in a chain), or None."""
    runs = [HopRun(TrainResult(**f.result), f.test_logits, f.report) for f in resume.finished]
    job.teacher_taught = resume.teacher_taught
    if resume.previous is None or not runs:
        return None, runs
    hop = job.hops[len(runs) - 1]
    model = hop_model(job, hop)
    model.load_state_dict(resume.previous)
    return model, runs


CACHE_STAGE = "teacher cache"
"""The progress stage while the teacher cache is built."""
CACHE_PROGRESS_UPDATES = 20
"""About how many progress reports a teacher cache build makes."""


def _teacher_cache(
    job: Job,
    store: CacheStore | None,
    directory: Path,
    log: Callable[[dict[str, object]], None],
    progress: Callable[[Progress], None] = lambda p: None,
) -> dict[str, Any]:
    """Set ``job.teacher_cache`` when the job uses one; returns ``metrics.json``'s report.
    While it is built (the teacher's forward passes over the transfer set, minutes on a
    large one), ``progress`` gets stage ``teacher cache`` with ``stage_step`` of
    ``stage_steps`` batches, about :data:`CACHE_PROGRESS_UPDATES` times."""
    spec = job.spec
    if not spec.training.teacher_cache:
        return off_report("training.teacher_cache is false")
    taught = [
        h
        for h in job.hops
        if h.teacher == "job" and registry.get(h.method.name).method_cls.needs.teacher
    ]
    if not any(eligible(registry.get(h.method.name).method_cls) for h in taught):
        return off_report("no model of this job learns from the teacher's logits alone")
    if len(set(job.train_enc.ids)) != len(job.train_enc):  # ids could not address the rows
        return off_report("the transfer set's example ids are not unique")
    key = cache_key(
        job.teacher, job.train_enc, job.tokenizer, spec.training.max_seq_length, job.device
    )

    def on_batch(done: int, total: int) -> None:
        if done == 1:
            log(
                {
                    "event": "stage",
                    "stage": CACHE_STAGE,
                    "message": f"computing the teacher's logits on {len(job.train_enc)} "
                    f"examples ({total} batches) once; the training stages reuse them",
                }
            )
        if done == 1 or done == total or done % max(1, total // CACHE_PROGRESS_UPDATES) == 0:
            progress(Progress(CACHE_STAGE, 0, 0, 0, {}, stage_step=done, stage_steps=total))

    cache = load_or_build(
        directory,
        key,
        job.teacher,
        job.train_enc,
        spec.training.eval_batch_size,
        job.pad_id,
        job.device,
        store,
        on_batch,
    )
    job.teacher_cache = cache
    if cache.warning:
        log({"event": "warning", "message": cache.warning})
    log({"event": "teacher_cache", **cache.report()})
    return cache.report()


def run_job(
    spec: JobSpec,
    teacher_path: Path | str,
    resolve: PathResolver,
    out_dir: Path,
    hooks: TrainHooks | None = None,
    student_path: Path | str | None = None,
    generator_path: Path | str | None = None,
    checkpoints: CheckpointPolicy | None = None,
    resume_from: Path | None = None,
    teacher_cache_store: CacheStore | None = None,
) -> RunResult:
    """Train and export the student of ``spec`` into ``out_dir``.

    A job trains one model per hop (:func:`kd_engine.methods.chain.plan_hops`): one for a
    single-model method, several for a chain (``takd``, ``born_again``, ``teacher_free_self``),
    each taught by the job's teacher, the previous hop's model, or nobody. The last hop's model
    is the exported student; each earlier one is written as ``<hop name>.tar.gz`` (a
    transformers directory ``<hop name>/``).

    Writes ``split.json`` first (the rows of each split and eval set:
    :mod:`kd_engine.data.split_artifact`), then the student (config.json, model.safetensors,
    tokenizer files), ``model.onnx`` (and ``model.int8.onnx``) as the spec's ``export`` asks
    (:mod:`kd_engine.onnx_export`; a failed export is a warning and ``metrics.json``'s ``onnx``
    says why, never a failed job), ``metrics.json`` (the student's metrics, ``onnx``, and
    ``hops``: one report per hop; a classification job also has ``calibration``,
    ``confusion_matrix`` and, with a teacher, ``teacher_kl``:
    :func:`kd_engine.reports.split_diagnostics`), ``report.html`` (the same numbers with plots,
    one self-contained page: :mod:`kd_engine.report_html`; ``metrics.json``'s ``report`` has
    its size and seconds, or the ``error`` that kept it from being written, which does not
    fail the job) and ``train_log.jsonl`` (one JSON record per progress event and epoch).
    ``student_path`` is the local checkpoint (or hub id) of a
    ``pretrained`` student, ``generator_path`` that of the masked-LM generator named by the
    method's ``generator`` setting (MATE-KD and its family). A method with a ``corpus`` setting
    (``minimax_knn``) gets that unlabelled corpus, read with ``resolve`` like a dataset file and
    encoded like the transfer set. An augmentation method also writes
    ``augmented_samples.jsonl`` (original and augmented texts).

    ``checkpoints`` makes the loop write checkpoints (:mod:`kd_engine.checkpoint`) and call
    ``hooks.on_checkpoint`` with each; ``hooks.should_pause`` then pauses the job (a ``pause``
    checkpoint, then :class:`~kd_engine.checkpoint.Paused`). ``resume_from`` is a local
    checkpoint directory written by a run of the same spec: the run continues from it (finished
    hops are not retrained) and ends with the same student, metrics and artifacts as an
    uninterrupted run (bit for bit on the CPU). ``out_dir`` may be fresh.

    On a rank of a data-parallel run (:mod:`kd_engine.ranks`) every rank trains; ranks other
    than 0 return after the last hop with empty metrics (rank 0 evaluates, exports and writes
    ``out_dir``'s files; only it writes checkpoints).

    With ``training.teacher_cache`` and a hop whose method is
    :func:`~kd_engine.teacher_cache.eligible` taught by the job's teacher, the teacher's logits
    on the transfer set are computed once before training (or read from
    ``teacher_cache_store``, and kept there when built) and served to the loop by example id;
    ``metrics.json``'s ``teacher_cache`` says ``hit``, ``built``, ``rebuilt`` or ``off`` (with
    the reason) and the build's seconds.

    Raises:
        ValueError: a problem with the job a user can fix (message names it), or
            ``resume_from`` is not a checkpoint of this spec.
        kd_engine.trainer.Cancelled: the job was cancelled through ``hooks.should_stop``.
        kd_engine.checkpoint.Paused: the job paused through ``hooks.should_pause``.
    """
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    hooks = hooks or TrainHooks()
    out_dir.mkdir(parents=True, exist_ok=True)
    log_path = out_dir / LOG_FILE
    user_log, user_progress = hooks.log, hooks.on_progress

    def log(record: dict[str, object]) -> None:
        with log_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")
        user_log(record)

    def stage(name: str, hop: int = 0, num_hops: int = 0) -> None:
        user_progress(Progress(name, 0, 0, 0, {}, hop=hop, num_hops=num_hops))
        log({"event": "stage", "stage": name})

    hooks = TrainHooks(
        user_progress, hooks.should_stop, log, hooks.every, hooks.on_checkpoint, hooks.should_pause
    )
    device = pick_device(spec.training.device)
    stage("prepare")
    method_cls = registry.get(spec.method.name).method_cls
    teacher_cfg = read_config(teacher_path)
    student_cfg = _student_config(spec, student_path)
    regression = resolve_regression(spec.dataset.task, teacher_task(teacher_cfg))
    data = load_transfer_set(spec.dataset, resolve, regression)
    names = _label_names(spec, method_cls.needs.teacher, teacher_cfg, data)
    data = relabel(data, names)
    # Read before training, so that a bad eval set fails the job at once.
    eval_sets = load_eval_sets(spec.dataset, resolve, data.label_names, data.regression)
    write_split_file(out_dir, spec.dataset, data, eval_sets)
    tokenizer = load_tokenizer(teacher_path)
    pad_id = int(tokenizer.pad_token_id or 0)
    # A new classifier head and a fresh student are drawn at random: seed first, so that
    # training.seed fixes them too (not only the training loop).
    seed_everything(spec.training.seed)
    teacher = load_classifier(teacher_path, names)
    # The worker's re-check: the one check the API ran at submit, on the models it has now
    # (the loaded teacher's config, with the job's labels); the method's fit included.
    checked = check_models(
        spec, ModelConfigs(teacher.config.to_dict(), student_cfg), num_labels=len(names)
    )
    teacher_shape, planned = checked.teacher, checked.student
    assert teacher_shape is not None and planned is not None  # both configs were given
    hops = plan_hops(spec.method, teacher_shape, planned)
    max_len = spec.training.max_seq_length
    job = Job(
        spec=spec,
        hops=hops,
        names=names,
        tokenizer=tokenizer,
        pad_id=pad_id,
        device=device,
        teacher=teacher,
        student_path=student_path,
        train_enc=encode(data.train, tokenizer, max_len),
        dev_enc=encode(data.dev, tokenizer, max_len),
        test_enc=encode(data.test, tokenizer, max_len),
        hooks=hooks,
        stage=stage,
        out_dir=out_dir,
        generator_path=str(generator_path) if generator_path is not None else None,
    )
    corpus_ref = getattr(spec.method, "corpus", None)
    if isinstance(corpus_ref, str):
        job.corpus = encode_corpus(
            load_corpus(
                corpus_ref,
                getattr(spec.method, "corpus_text_column", "text"),
                resolve,
                getattr(spec.method, "max_corpus_examples", None),
                spec.dataset.split_seed,
            ),
            tokenizer,
            max_len,
        )
        log({"event": "corpus", "source": corpus_ref, "rows": len(job.corpus)})
    eval_encs = {name: encode(ex, tokenizer, max_len) for name, ex in eval_sets.items()}
    task = "regression" if data.regression else "classification"
    log(
        {
            "event": "data",
            **data.sizes(),
            "task": task,
            "labels": data.label_names,
            "eval_sets": {name: len(enc) for name, enc in eval_encs.items()},
            "device": str(device),
        }
    )
    if len(hops) > 1:
        log({"event": "hops", "hops": [h.name for h in hops]})

    with tempfile.TemporaryDirectory(prefix="teacher-cache-") as cache_dir:
        # The cache is held in memory once loaded or built: its directory can go at once.
        cache_report = _teacher_cache(job, teacher_cache_store, Path(cache_dir), log, user_progress)

    runs: list[HopRun] = []
    student: PreTrainedModel | None = None
    first = 0
    if resume_from is not None:
        resume = load_checkpoint(resume_from, spec, len(hops))
        job.resume, first = resume, resume.hop - 1
        student, runs = _finished_hops(job, resume)
        resume.restore_out_dir(out_dir)
        log({"event": "resumed", "checkpoint": resume.path.name, "step": resume.loop.step})
    if checkpoints is not None:
        job.checkpointer = Checkpointer(
            policy=checkpoints,
            spec_hash=spec_hash(spec),
            tokenizer=tokenizer,
            out_dir=out_dir,
            num_hops=len(hops),
            finished=list(job.resume.finished) if job.resume is not None else [],
            previous=student,
            teacher_taught=job.teacher_taught,
        )
    for index in range(first, len(hops)):
        # The previous hop's model teaches this one; the one before it is released.
        previous = (student, runs[-1]) if student is not None else None
        student, run = run_hop(job, index, previous)
        runs.append(run)
        if job.checkpointer is not None:
            job.checkpointer.finished.append(
                FinishedHop(dataclasses.asdict(run.result), run.test_logits, run.report)
            )
            job.checkpointer.previous = student
            job.checkpointer.teacher_taught = job.teacher_taught
    assert student is not None  # a plan has at least one hop
    parallel, ranks = _data_parallel(student, log), current_rank()
    if ranks is not None and not ranks.is_main:  # evaluation and export are rank 0's
        return RunResult(metrics={}, out_dir=out_dir)
    final = runs[-1]
    result, many = final.result, len(hops) > 1

    s_logits = final.test_logits
    metrics: dict[str, Any] = {
        "schema_version": METRICS_SCHEMA_VERSION,
        "method": spec.method.name,
        "task": task,
        "labels": data.label_names,
        "data": data.sizes(),
        "device": str(device),
        "epochs": [
            r
            for h, run in zip(hops, runs, strict=True)
            for r in _tagged(run.result.history, h.name, many)
        ],
        "stages": [
            r
            for h, run in zip(hops, runs, strict=True)
            for r in _tagged(run.result.stages, h.name, many)
        ],
        "selection_metric": selection_metric(spec.training, result.best_dev)
        if result.best_dev
        else spec.training.selection_metric,
        "best_epoch": result.best_epoch,
        "best_step": result.best_step,
        "best_stage": result.best_stage,
        "best_dev": result.best_dev,
        "train_seconds": sum(run.result.seconds for run in runs),
        "warnings": [
            f"{h.name}: {w}" if many else w
            for h, run in zip(hops, runs, strict=True)
            for w in run.result.warnings
        ],
        "trained": "teacher" if spec.method.name == "finetune" else "student",
        "test": final.report["test"],
        "student": {"parameters": count_parameters(student)},
        "hops": [run.report for run in runs],
        "teacher_cache": cache_report,
    }
    if parallel is not None:
        metrics["data_parallel"] = parallel
    if issubclass(method_cls, ChainMethod) and method_cls.ensemble:
        metrics["ensemble"] = {
            "members": [h.name for h in hops],
            "test": task_metrics(_ensemble([r.test_logits for r in runs]), job.test_enc.labels),
        }
    t_logits = job.teacher_logits() if job.teacher_taught else None
    if t_logits is not None:
        metrics["teacher_test"] = task_metrics(t_logits, job.test_enc.labels)
        metrics.update(teacher_match(s_logits, t_logits))
        metrics["teacher"] = {"parameters": count_parameters(teacher)}
        teacher_bytes = weights_bytes(Path(teacher_path))
        if teacher_bytes:  # a teacher stored as safetensors (not pytorch_model.bin)
            metrics["teacher"]["bytes"] = teacher_bytes
    timed = {"student": student} if t_logits is None else {"student": student, "teacher": teacher}
    if spec.export.latency:
        _speed(metrics, timed, job.test_enc, pad_id, device)
    # ECE, KL(teacher || student) and the confusion matrices (classification only).
    metrics.update(split_diagnostics(s_logits, t_logits, job.test_enc.labels, names))
    if eval_encs:
        metrics["eval_sets"] = evaluate_sets(
            student,
            teacher if job.teacher_taught else None,
            eval_encs,
            spec.training.eval_batch_size,
            pad_id,
            device,
        )

    stage("export")
    save_student(student, tokenizer, out_dir)
    metrics["student"]["bytes"] = weights_bytes(out_dir)
    metrics["onnx"] = _onnx(student, job, metrics["warnings"], log)
    # Last: the report reads every block of the metrics (add new ones above this line).
    metrics["report"] = (
        _write_report(metrics, out_dir, log) if spec.export.report else {"skipped": REPORT_SKIPPED}
    )
    JobMetrics.model_validate(metrics)  # the contract every reader relies on
    write_json(out_dir / METRICS_FILE, metrics)
    log({"event": "done", "test": metrics["test"]})
    return RunResult(metrics=metrics, out_dir=out_dir)
