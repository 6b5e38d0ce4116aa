"""Checks of a job's metrics.json that hold for any model, however little it trained, and
that a wrong count, a metric over the wrong split or a swapped model would break (unlike
``0 <= accuracy <= 1``). Used by the unit, integration and end-to-end tests."""

from __future__ import annotations

from typing import Any

import pytest

NO_EXTRAS: dict[str, bool] = {"onnx": False, "latency": False, "report": False}
"""The ``export`` of a test job that is not about the ONNX export, latency or the report: none
of the three (about 7 s of CPU less per tiny job on 2 cores). They are checked where they are
the subject: tests/unit/test_onnx_export.py, test_latency.py, test_report.py, test_run_job.py
and the first distillation of tests/e2e/test_e2e.py."""


def check_accuracy(test: dict[str, Any], matrix: list[list[int]], examples: int) -> None:
    """``test["accuracy"]`` is the confusion ``matrix``'s diagonal over its ``examples`` rows
    (rows true class, columns predicted), and the matrix counts exactly ``examples``."""
    assert sum(map(sum, matrix)) == examples, matrix
    correct = sum(row[i] for i, row in enumerate(matrix))
    assert test["accuracy"] == pytest.approx(correct / examples, abs=1e-6), (test, matrix)


def check_agreement(
    agreement: float,
    examples: int,
    student_accuracy: float,
    teacher_accuracy: float,
    student_matrix: list[list[int]] | None = None,
    teacher_matrix: list[list[int]] | None = None,
) -> None:
    """``agreement`` (fraction of ``examples`` where student and teacher predict the same
    class) is a whole number of examples, and at most what the accuracies allow: two models
    that agree on a fraction a differ in accuracy by at most 1 - a. With both confusion
    matrices, an example counts as agreed only where both put a prediction of the same true
    class in the same column: a <= sum_ij min(S_ij, T_ij) / examples."""
    agreed = agreement * examples
    assert agreed == pytest.approx(round(agreed), abs=1e-6), (agreement, examples)
    assert abs(student_accuracy - teacher_accuracy) <= 1.0 - agreement + 1e-6, (
        agreement,
        student_accuracy,
        teacher_accuracy,
    )
    if student_matrix is not None and teacher_matrix is not None:
        most = sum(
            min(s, t)
            for s_row, t_row in zip(student_matrix, teacher_matrix, strict=True)
            for s, t in zip(s_row, t_row, strict=True)
        )
        assert round(agreed) <= most, (agreement, student_matrix, teacher_matrix)


def check_classification_metrics(m: dict[str, Any], examples: int) -> None:
    """A classification job's metrics.json: the student's test accuracy (and the teacher's,
    with a teacher) match their confusion matrices over the ``examples`` test rows, and the
    teacher agreement fits both (:func:`check_accuracy`, :func:`check_agreement`)."""
    matrices = m["confusion_matrix"]
    check_accuracy(m["test"], matrices["student"], examples)
    if "teacher" not in matrices:
        assert "teacher_agreement" not in m
        return
    check_accuracy(m["teacher_test"], matrices["teacher"], examples)
    check_agreement(
        m["teacher_agreement"],
        examples,
        m["test"]["accuracy"],
        m["teacher_test"]["accuracy"],
        matrices["student"],
        matrices["teacher"],
    )
