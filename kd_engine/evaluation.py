"""Metrics (classification: accuracy, macro-F1, Matthews correlation, calibration error,
confusion matrix; regression: Pearson, Spearman, MSE; teacher agreement and KL divergence),
size and latency."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, matthews_corrcoef
from transformers import PreTrainedModel

from kd_engine import names
from kd_engine.data.batching import Encoded, batches, collate

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The tensors of a batch a transformers encoder takes, moved to ``device``."""
    return {k: v.to(device) for k, v in batch.items() if k in MODEL_INPUTS}


@torch.inference_mode()
def predict_logits(
    model: PreTrainedModel,
    data: Encoded,
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> torch.Tensor:
    """Logits (N, C) of ``model`` on every row of ``data``, in order, as float32 on the CPU."""
    was_training = model.training
    model.eval()
    out = [
        model(**model_inputs(b, device)).logits.float().cpu()
        for b in batches(data, batch_size, pad_id)
    ]
    model.train(was_training)
    return torch.cat(out)


CLASSIFICATION_METRICS = names.CLASSIFICATION_METRICS
REGRESSION_METRICS = names.REGRESSION_METRICS  # selectable; "mse" is reported too (lower = better)


def classification_metrics(logits: torch.Tensor, labels: Sequence[int | float]) -> dict[str, float]:
    """accuracy, macro_f1 and mcc (Matthews correlation) of argmax(logits) against labels.

    Args:
        logits: (N, C), C >= 2.
        labels: N class ids in [0, C).
    """
    preds = logits.argmax(-1).tolist()
    return {
        "accuracy": float(accuracy_score(labels, preds)),
        "macro_f1": float(f1_score(labels, preds, average="macro", zero_division=0)),
        "mcc": float(matthews_corrcoef(labels, preds)),
    }


def _correlation(value: float) -> float:
    # Undefined (NaN) when either side is constant, e.g. a student that predicts one value:
    # reported as 0.0, no linear or rank relation, so it can still be compared and selected on.
    return 0.0 if math.isnan(value) else value


def regression_metrics(
    predictions: torch.Tensor, targets: Sequence[int | float]
) -> dict[str, float]:
    """pearson (Pearson's r), spearman (Spearman's rho) and mse of one output against targets:
    the GLUE STS-B metrics (Wang et al. 2019, "GLUE", Table 1: Pearson/Spearman correlation),
    computed with ``scipy.stats``, plus the mean squared error (squared label units).

    A correlation that is undefined (a constant prediction or constant targets) is 0.0.

    Args:
        predictions: (N, 1) or (N,).
        targets: N real targets.

    Raises:
        ValueError: the sizes differ, or fewer than 2 examples.
    """
    pred = predictions.reshape(-1).double()
    gold = torch.tensor([float(t) for t in targets], dtype=torch.float64)
    if pred.shape != gold.shape or len(gold) < 2:
        raise ValueError(
            f"regression metrics need as many predictions ({pred.numel()}) as targets "
            f"({len(gold)}), at least 2"
        )
    p, g = pred.numpy(), gold.numpy()
    constant = bool((p == p[0]).all() or (g == g[0]).all())
    return {
        "pearson": 0.0 if constant else _correlation(float(pearsonr(p, g)[0])),
        "spearman": 0.0 if constant else _correlation(float(spearmanr(p, g)[0])),
        "mse": float(((pred - gold) ** 2).mean()),
    }


def task_metrics(logits: torch.Tensor, labels: Sequence[int | float]) -> dict[str, float]:
    """The metrics of the job's task, from the logits' width: one column is regression
    (:func:`regression_metrics`: pearson, spearman, mse), more is classification
    (:func:`classification_metrics`: accuracy, macro_f1, mcc).

    Args:
        logits: (N, C).
        labels: N class ids (C >= 2) or N real targets (C = 1).

    Raises:
        ValueError: logits are not 2-D.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, C), got {tuple(logits.shape)}")
    if logits.shape[1] == 1:
        return regression_metrics(logits, labels)
    return classification_metrics(logits, labels)


def metric_fits_task(metric: str, regression: bool) -> bool:
    """Whether ``metric`` can select checkpoints of a job of that task: accuracy, macro_f1, mcc
    for classification; pearson, spearman for regression."""
    return metric in (REGRESSION_METRICS if regression else CLASSIFICATION_METRICS)


def agreement(logits_a: torch.Tensor, logits_b: torch.Tensor) -> float:
    """Fraction of examples on which two classifiers predict the same class.

    Args:
        logits_a, logits_b: (N, C), C >= 2.

    Raises:
        ValueError: one-output (regression) logits; use :func:`mean_abs_diff`.
    """
    if logits_a.ndim == 2 and logits_a.shape[-1] == 1:
        raise ValueError("agreement is for classifiers; use mean_abs_diff for one output")
    return float((logits_a.argmax(-1) == logits_b.argmax(-1)).float().mean())


def mean_abs_diff(outputs_a: torch.Tensor, outputs_b: torch.Tensor) -> float:
    """mean_n |a_n - b_n| of two regression models' outputs (N, 1), in label units: how close
    the student stays to the teacher where :func:`agreement` has no class to compare.

    Raises:
        ValueError: the shapes differ.
    """
    if outputs_a.shape != outputs_b.shape:
        raise ValueError(f"shapes differ: {tuple(outputs_a.shape)} and {tuple(outputs_b.shape)}")
    return float((outputs_a.double() - outputs_b.double()).abs().mean())


ECE_BINS = 15
"""Bins of :func:`expected_calibration_error` (Guo et al. 2017 use M = 15)."""


def expected_calibration_error(
    logits: torch.Tensor, labels: Sequence[int | float], n_bins: int = ECE_BINS
) -> float:
    """Expected calibration error of a classifier, equal-width bins (Guo, Pleiss, Sun and
    Weinberger 2017, "On Calibration of Modern Neural Networks", ICML, eq. 3):

        ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|

    where the confidence of an example is its largest softmax probability (temperature 1),
    B_m holds the examples whose confidence lies in ((m-1)/M, m/M], acc(B_m) is the fraction of
    them predicted right (argmax = label) and conf(B_m) their mean confidence. 0 is perfectly
    calibrated, at most 1; empty bins add nothing.

    Args:
        logits: (N, C), C >= 2.
        labels: N class ids in [0, C).
        n_bins: M, the number of bins.

    Raises:
        ValueError: logits are not (N, C) with C >= 2 and N > 0, the sizes differ, or
            n_bins < 1.
    """
    if logits.ndim != 2 or logits.shape[1] < 2 or len(logits) == 0:
        raise ValueError(f"ECE needs logits (N, C) with C >= 2, got {tuple(logits.shape)}")
    if len(labels) != len(logits) or n_bins < 1:
        raise ValueError(f"ECE needs one label per row ({len(labels)} != {len(logits)}) and bins")
    probs = logits.double().softmax(-1)
    confidence, predicted = probs.max(-1)
    correct = (predicted == torch.tensor([int(y) for y in labels])).double()
    inner = torch.linspace(0.0, 1.0, n_bins + 1, dtype=torch.float64)[1:-1]
    # right=False: index m-1 for (m-1)/M < confidence <= m/M.
    index = torch.bucketize(confidence, inner, right=False)
    n = len(labels)
    total = 0.0
    for m in range(n_bins):
        in_bin = index == m
        size = int(in_bin.sum())
        if size:
            gap = correct[in_bin].mean() - confidence[in_bin].mean()
            total += size / n * abs(float(gap))
    return total


def kl_teacher_student(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> float:
    """KL(teacher || student) at temperature 1, in nats, averaged over the examples:

        (1/N) sum_n sum_c p_t(c|x_n) (log p_t(c|x_n) - log p_s(c|x_n)),  p = softmax(logits)

    (Hinton, Vinyals and Dean 2015, "Distilling the Knowledge in a Neural Network": the
    divergence of the student's distribution from the teacher's soft targets). 0 when the two
    distributions are equal; how far the student is from imitating the teacher, beyond the
    argmax that :func:`agreement` compares.

    Args:
        teacher_logits, student_logits: (N, C), C >= 2, the same examples in the same order.

    Raises:
        ValueError: the shapes differ or C < 2.
    """
    if teacher_logits.shape != student_logits.shape or teacher_logits.ndim != 2:
        raise ValueError(
            f"shapes differ: {tuple(teacher_logits.shape)} and {tuple(student_logits.shape)}"
        )
    if teacher_logits.shape[1] < 2:
        raise ValueError("KL divergence is for classifiers; use mean_abs_diff for one output")
    log_t = teacher_logits.double().log_softmax(-1)
    log_s = student_logits.double().log_softmax(-1)
    return float((log_t.exp() * (log_t - log_s)).sum(-1).mean())


def confusion(logits: torch.Tensor, labels: Sequence[int | float]) -> list[list[int]]:
    """Confusion matrix (C, C) of argmax(logits) against labels: row i = true class i, column
    j = predicted class j, entry = number of examples (``sklearn.metrics.confusion_matrix``
    with every class listed, so a class absent from both sides is a row and column of 0).

    Args:
        logits: (N, C), C >= 2.
        labels: N class ids in [0, C).
    """
    preds = logits.argmax(-1).tolist()
    classes = list(range(logits.shape[1]))
    matrix = confusion_matrix([int(y) for y in labels], preds, labels=classes)
    return [[int(v) for v in row] for row in matrix]


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters."""
    return sum(p.numel() for p in model.parameters())


def weights_bytes(model_dir: Path) -> int:
    """Bytes of the ``*.safetensors`` files in a saved model directory."""
    return sum(p.stat().st_size for p in model_dir.glob("*.safetensors"))


Inputs = TypeVar("Inputs")


def median_seconds_per_example(
    forward: Callable[[Inputs], object],
    prepare: Callable[[dict[str, torch.Tensor]], Inputs],
    data: Encoded,
    batch_size: int,
    pad_id: int,
    n_batches: int = 20,
    warmup: int = 10,
    synchronize: Callable[[], None] | None = None,
) -> float:
    """Median wall-clock seconds per example of ``forward`` at ``batch_size``: the measuring
    protocol of :func:`latency_per_example`, for any runtime (PyTorch, onnxruntime).

    Batch ``i`` holds rows ``(i * batch_size + j) % len(data)``, j < ``batch_size`` (real
    examples, wrapping around a small split), padded to its own longest sequence
    (:func:`~kd_engine.data.batching.collate`) and turned into the runtime's inputs by
    ``prepare`` outside the timed region; ``warmup`` untimed batches come first, then
    ``n_batches`` timed ones. ``synchronize`` (a device barrier, e.g. CUDA's) is called
    before and after each timed call.

    Raises:
        ValueError: ``data`` is empty or ``n_batches`` < 1.
    """
    n = len(data)
    if n == 0 or n_batches < 1:
        raise ValueError(f"latency needs examples and timed batches (got {n}, {n_batches})")
    times = []
    for i in range(warmup + n_batches):
        rows = [(i * batch_size + j) % n for j in range(batch_size)]
        inputs = prepare(collate(data, rows, pad_id))
        if synchronize is not None:
            synchronize()
        start = time.perf_counter()
        forward(inputs)
        if synchronize is not None:
            synchronize()
        if i >= warmup:
            times.append((time.perf_counter() - start) / batch_size)
    return statistics.median(times)


@torch.inference_mode()
def latency_per_example(
    model: PreTrainedModel,
    data: Encoded,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    n_batches: int = 20,
    warmup: int = 10,
) -> float:
    """Median wall-clock seconds per example of a forward pass at ``batch_size``.

    Times ``n_batches`` consecutive batches of real examples (after ``warmup`` untimed ones),
    each padded to its own longest sequence (:func:`median_seconds_per_example`).
    """
    model.eval()
    return median_seconds_per_example(
        lambda inputs: model(**inputs),
        lambda batch: model_inputs(batch, device),
        data,
        batch_size,
        pad_id,
        n_batches,
        warmup,
        torch.cuda.synchronize if device.type == "cuda" else None,
    )
