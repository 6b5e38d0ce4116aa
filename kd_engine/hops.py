"""One hop of a job: build its student, train it with the hop's method, evaluate it, and keep
an intermediate model as an artifact. A single-model method is one hop; a chain (``takd``,
``born_again``, ``teacher_free_self``) is several (:mod:`kd_engine.methods.chain`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_engine import registry
from kd_engine.augment.samples import SAMPLES_FILE, decode_samples, write_samples
from kd_engine.checkpoint import Checkpointer, Resume
from kd_engine.contracts import Progress
from kd_engine.data.batching import Encoded
from kd_engine.evaluation import count_parameters, predict_logits, task_metrics
from kd_engine.export import save_archive
from kd_engine.methods.base import Resources
from kd_engine.methods.chain import Hop
from kd_engine.models.loading import load_classifier
from kd_engine.models.shapes import ModelShape, shape_from_config
from kd_engine.models.student import (
    cut_pretrained,
    fresh_student,
    reinitialised,
    resolve_layers,
    student_from_teacher,
)
from kd_engine.models.text_students import bilstm_student, cnn_student
from kd_engine.reports import teacher_match
from kd_engine.spec import (
    BiLSTMStudent,
    CNNStudent,
    FromTeacherStudent,
    JobSpec,
    PretrainedStudent,
    StudentSpec,
)
from kd_engine.teacher_cache import TeacherCache, eligible
from kd_engine.trainer import TrainHooks, TrainResult, seed_everything, train


def build_student(
    spec: StudentSpec, teacher: PreTrainedModel, names: list[str], student_path: Path | str | None
) -> PreTrainedModel:
    """A student built from ``spec``; ``teacher`` (the job's) gives layers, vocabulary and word
    embeddings, ``student_path`` the checkpoint of a ``pretrained`` spec."""
    if isinstance(spec, FromTeacherStudent):
        n_teacher = int(teacher.config.num_hidden_layers)
        return student_from_teacher(teacher, resolve_layers(spec, n_teacher))
    if isinstance(spec, PretrainedStudent):
        if student_path is None:
            raise ValueError("student.model: no local path was given for the pretrained student")
        student = load_classifier(student_path, names)
        s_vocab, t_vocab = int(student.config.vocab_size), int(teacher.config.vocab_size)
        if s_vocab != t_vocab:
            raise ValueError(
                f"student.model: its vocabulary ({s_vocab} tokens) differs from the teacher's "
                f"({t_vocab}); a pretrained student must share the teacher's tokenizer"
            )
        # PKD-style: keep the chosen (default: first k) layers of its own encoder; the head
        # stays the new one load_classifier drew (seeded by training.seed).
        return cut_pretrained(student, spec)
    if isinstance(spec, BiLSTMStudent | CNNStudent):
        # Cross-architecture students read the teacher's token ids: their word embeddings start
        # as a copy of the teacher's.
        words = teacher.get_input_embeddings().weight
        if not isinstance(words, torch.Tensor):
            raise ValueError("student: the teacher has no word-embedding matrix to start from")
        pad = int(teacher.config.pad_token_id or 0)
        if isinstance(spec, BiLSTMStudent):
            return bilstm_student(
                words, names, spec.hidden_size, spec.num_layers, spec.dropout, pad
            )
        return cnn_student(
            words, names, list(spec.kernel_sizes), spec.num_filters, spec.dropout, pad
        )
    return fresh_student(
        spec,
        vocab_size=int(teacher.config.vocab_size),
        label_names=names,
        max_positions=int(teacher.config.max_position_embeddings),
    )


def hop_model(job: Job, hop: Hop) -> PreTrainedModel:
    """The model hop ``hop`` starts from (the caller seeds the RNG first): the teacher's
    architecture with every weight drawn anew when ``hop.reinit_seed`` is set
    (:func:`kd_engine.models.student.reinitialised`), else built from the hop's student spec
    (the job's when the hop has none)."""
    if hop.reinit_seed is not None:
        return reinitialised(job.teacher)
    return build_student(hop.student or job.spec.student, job.teacher, job.names, job.student_path)


def hop_student_report(job: Job, hop: Hop) -> dict[str, Any]:
    """How the hop's model started, for ``hops[].student`` of ``metrics.json``: the student
    spec, or ``{"type": "random", "architecture": <teacher's model type>, "seed": <seed>}``
    for a re-initialised copy of the teacher's architecture."""
    if hop.reinit_seed is not None:
        return {
            "type": "random",
            "architecture": str(job.teacher.config.model_type),
            "seed": job.spec.training.seed + hop.reinit_seed,
        }
    return (hop.student or job.spec.student).model_dump(mode="json")


@dataclass
class Job:
    """What every hop of a job shares: the spec, the encoded data, the job's teacher (layers,
    vocabulary and word embeddings of every student; the KD teacher of hops that name it) and
    the hooks (already writing the training log)."""

    spec: JobSpec
    hops: list[Hop]
    names: list[str]
    tokenizer: PreTrainedTokenizerBase
    pad_id: int
    device: torch.device
    teacher: PreTrainedModel
    student_path: Path | str | None
    train_enc: Encoded
    dev_enc: Encoded
    test_enc: Encoded
    hooks: TrainHooks
    stage: Callable[..., None]
    out_dir: Path
    teacher_test_logits: torch.Tensor | None = None
    teacher_taught: bool = False
    generator_path: str | None = None
    corpus: Encoded | None = None
    checkpointer: Checkpointer | None = None
    resume: Resume | None = None
    teacher_cache: TeacherCache | None = None

    def shape(self, model: PreTrainedModel) -> ModelShape:
        """The shape of a built model (for the method bound to it)."""
        return shape_from_config(model.config.to_dict(), len(self.names))

    def predict(self, model: PreTrainedModel) -> torch.Tensor:
        """Test logits (N, C) of ``model`` (moved to the job's device)."""
        model.to(self.device)  # type: ignore[arg-type]
        bs = self.spec.training.eval_batch_size
        return predict_logits(model, self.test_enc, bs, self.pad_id, self.device)

    def teacher_logits(self) -> torch.Tensor:
        """The job's teacher's test logits (computed once)."""
        if self.teacher_test_logits is None:
            self.teacher_test_logits = self.predict(self.teacher)
        return self.teacher_test_logits


@dataclass
class HopRun:
    """A trained hop: its training result, test logits and report (its model is returned next
    to it, and kept only while the next hop needs it as its teacher)."""

    result: TrainResult
    test_logits: torch.Tensor
    report: dict[str, Any]


def _hop_prefix(hops: list[Hop], index: int) -> str:
    """``hop 2/3 assistant_2: `` before stage names of a multi-model job ('' for one model)."""
    if len(hops) == 1:
        return ""
    return f"hop {index + 1}/{len(hops)} {hops[index].name}: "


def _hop_hooks(job: Job, index: int) -> TrainHooks:
    """The job's hooks for hop ``index``: progress names the hop (stage prefix, ``hop`` and
    ``num_hops``); log records of a multi-model job carry ``hop`` (the hop's name)."""
    hooks, n, prefix = job.hooks, len(job.hops), _hop_prefix(job.hops, index)

    def on_progress(p: Progress) -> None:
        hooks.on_progress(replace(p, stage=prefix + p.stage, hop=index + 1, num_hops=n))

    def log(record: dict[str, object]) -> None:
        hooks.log(record if n == 1 else {**record, "hop": job.hops[index].name})

    return TrainHooks(
        on_progress, hooks.should_stop, log, hooks.every, hooks.on_checkpoint, hooks.should_pause
    )


def run_hop(
    job: Job, index: int, previous: tuple[PreTrainedModel, HopRun] | None
) -> tuple[PreTrainedModel, HopRun]:
    """Build hop ``index``'s student, train it with the hop's method (the trainer runs the
    method's stages) and evaluate it on the test split; an intermediate hop's model is also
    written as an artifact, ``<hop name>.tar.gz``.

    With ``job.checkpointer`` the hop's training writes checkpoints; with ``job.resume`` of
    this hop it continues from that checkpoint.

    Raises:
        kd_engine.errors.SpecError: the built models do not fit the hop's method.
        kd_engine.trainer.Cancelled: the job was cancelled.
        kd_engine.checkpoint.Paused: the job paused.
    """
    hop, spec, n = job.hops[index], job.spec, len(job.hops)
    prefix = _hop_prefix(job.hops, index)
    if hop.reinit_seed is not None:  # the teacher's architecture, drawn with the hop's own seed
        seed_everything(spec.training.seed + hop.reinit_seed)
        student = hop_model(job, hop)
        seed_everything(spec.training.seed)  # training itself is seeded as for any hop
    else:
        if index:  # the first hop's student is drawn as a single-model job's; later re-seeded
            seed_everything(spec.training.seed)
        student = hop_model(job, hop)
    hop_teacher = {
        "job": job.teacher,
        "previous": previous[0] if previous is not None else None,
        "none": None,
    }[hop.teacher]
    method = registry.build(
        hop.method, job.shape(hop_teacher or job.teacher), job.shape(student), spec.training
    )
    kd_teacher = hop_teacher if method.needs.teacher else None
    job.teacher_taught |= kd_teacher is job.teacher
    tokenizer = job.tokenizer
    method.bind(
        Resources(
            student=student,
            teacher=kd_teacher,
            device=job.device,
            pad_id=job.pad_id,
            mask_id=tokenizer.mask_token_id,
            special_ids=frozenset(int(i) for i in tokenizer.all_special_ids),
            generator_path=job.generator_path,
            corpus=job.corpus,
            training=spec.training,
        )
    )
    if job.checkpointer is not None:
        job.checkpointer.hop = index + 1
    resume = job.resume
    result = train(
        student,
        kd_teacher,
        method,
        job.train_enc,
        job.dev_enc,
        spec.training,
        job.pad_id,
        job.device,
        _hop_hooks(job, index),
        checkpointer=job.checkpointer,
        resume=resume.loop if resume is not None and resume.hop == index + 1 else None,
        teacher_cache=job.teacher_cache if kd_teacher is job.teacher and eligible(method) else None,
    )

    job.stage(prefix + "evaluate", hop=index + 1, num_hops=n)
    test_logits = job.predict(student)
    teacher_name = None  # the teacher this hop learnt from, as named in the hop reports
    if kd_teacher is job.teacher:
        teacher_name = "teacher"
    elif kd_teacher is not None:
        teacher_name = job.hops[index - 1].name
    report: dict[str, Any] = {
        "name": hop.name,
        "index": index + 1,
        "method": hop.method.model_dump(mode="json"),
        "student": hop_student_report(job, hop),
        "teacher": teacher_name,
        "stages": result.stages,
        "best_epoch": result.best_epoch,
        "best_step": result.best_step,
        "best_stage": result.best_stage,
        "best_dev": result.best_dev,
        "train_seconds": result.seconds,
        "warnings": result.warnings,
        "test": task_metrics(test_logits, job.test_enc.labels),
        "parameters": count_parameters(student),
        "artifact": None,
    }
    if kd_teacher is job.teacher:
        report.update(teacher_match(test_logits, job.teacher_logits()))
    elif kd_teacher is not None and previous is not None:
        report.update(teacher_match(test_logits, previous[1].test_logits))
    method_report = method.report()
    if method_report:
        report["method_report"] = method_report
        _hop_hooks(job, index).log({"event": "method_report", **method_report})
    samples = method.augmentation_samples()
    if samples:
        name = SAMPLES_FILE if n == 1 else f"{hop.name}.{SAMPLES_FILE}"
        write_samples(job.out_dir / name, decode_samples(samples, job.tokenizer))
        report["augmented_samples"] = name
    if index < n - 1:
        job.stage(prefix + "export", hop=index + 1, num_hops=n)
        archive = save_archive(student, job.tokenizer, job.out_dir, hop.name)
        report["artifact"] = archive.name
    return student, HopRun(result, test_logits, report)
