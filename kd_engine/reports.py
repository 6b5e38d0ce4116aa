"""What a job reports beside its test metrics: teacher agreement, calibration, KL divergence
to the teacher, confusion matrices, extra evaluation sets and the student's retention of the
teacher's scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from transformers import PreTrainedModel

from kd_engine.data.batching import Encoded
from kd_engine.evaluation import (
    CLASSIFICATION_METRICS,
    ECE_BINS,
    REGRESSION_METRICS,
    agreement,
    confusion,
    expected_calibration_error,
    kl_teacher_student,
    mean_abs_diff,
    predict_logits,
    task_metrics,
)

# Metrics where higher is better: the ones a retention (student / teacher) is reported for.
RETAINED_METRICS = (*CLASSIFICATION_METRICS, *REGRESSION_METRICS)


def retention(student: dict[str, float], teacher: dict[str, float]) -> dict[str, float | None]:
    """student / teacher per higher-is-better metric; None where the teacher's score is <= 0
    (a ratio would not mean retention)."""
    return {
        k: (student[k] / teacher[k] if teacher[k] > 0 else None)
        for k in RETAINED_METRICS
        if k in student and k in teacher
    }


def teacher_match(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> dict[str, float]:
    """How closely the student follows its teacher on the same examples (N, C) logits:
    ``teacher_agreement`` (fraction of equal argmax classes) for classification, or
    ``teacher_mean_abs_diff`` (mean |z_s - z_t|, label units) for one-output regression."""
    if student_logits.shape[-1] == 1:
        return {"teacher_mean_abs_diff": mean_abs_diff(student_logits, teacher_logits)}
    return {"teacher_agreement": agreement(student_logits, teacher_logits)}


def split_diagnostics(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    labels: Sequence[int | float],
    names: list[str],
) -> dict[str, Any]:
    """``metrics.json``'s calibration, KL and confusion blocks for a classification job's test
    split; ``{}`` for one-output regression (none of them apply).

    Returns ``calibration`` (``student_ece``, ``teacher_ece`` with a teacher, ``bins``:
    :func:`~kd_engine.evaluation.expected_calibration_error`), ``teacher_kl`` (with a teacher:
    mean KL(teacher || student) at T=1 in nats, :func:`~kd_engine.evaluation.kl_teacher_student`)
    and ``confusion_matrix`` (``labels`` in class order, ``student`` and with a teacher
    ``teacher``: (C, C) counts, rows true, columns predicted).

    Args:
        student_logits, teacher_logits: (N, C) on the same examples; ``teacher_logits`` None
            for a job without a teacher.
        labels: N class ids.
        names: the C class names.
    """
    if student_logits.shape[-1] == 1:
        return {}
    calibration: dict[str, Any] = {
        "student_ece": expected_calibration_error(student_logits, labels),
        "bins": ECE_BINS,
    }
    matrices: dict[str, Any] = {"labels": list(names), "student": confusion(student_logits, labels)}
    out: dict[str, Any] = {"calibration": calibration, "confusion_matrix": matrices}
    if teacher_logits is not None:
        calibration["teacher_ece"] = expected_calibration_error(teacher_logits, labels)
        matrices["teacher"] = confusion(teacher_logits, labels)
        out["teacher_kl"] = kl_teacher_student(teacher_logits, student_logits)
    return out


def evaluate_sets(
    student: PreTrainedModel,
    teacher: PreTrainedModel | None,
    sets: dict[str, Encoded],
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> dict[str, dict[str, Any]]:
    """``metrics.json``'s ``eval_sets``: per set, its size, the student's and (when a teacher is
    given) the teacher's metrics and the retention."""
    out: dict[str, dict[str, Any]] = {}
    for name, enc in sets.items():
        s_metrics = task_metrics(
            predict_logits(student, enc, batch_size, pad_id, device), enc.labels
        )
        entry: dict[str, Any] = {"examples": len(enc), "student": s_metrics}
        if teacher is not None:
            t_logits = predict_logits(teacher, enc, batch_size, pad_id, device)
            entry["teacher"] = task_metrics(t_logits, enc.labels)
            entry["retention"] = retention(s_metrics, entry["teacher"])
        out[name] = entry
    return out
