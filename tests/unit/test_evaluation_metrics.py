"""Metrics against hand-computed values; prediction, size and latency helpers."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from kd_engine.data.batching import Encoded
from kd_engine.evaluation import (
    agreement,
    classification_metrics,
    count_parameters,
    latency_per_example,
    model_inputs,
    predict_logits,
    weights_bytes,
)
from kd_engine.models.student import fresh_student
from kd_engine.spec import FreshStudent

CPU = torch.device("cpu")


def one_hot(preds: list[int], n_classes: int) -> torch.Tensor:
    logits = torch.zeros(len(preds), n_classes)
    logits[torch.arange(len(preds)), torch.tensor(preds)] = 5.0
    return logits


def test_three_class_metrics_by_hand() -> None:
    labels = [0, 0, 1, 1, 2, 2]
    preds = [0, 1, 1, 1, 2, 0]
    m = classification_metrics(one_hot(preds, 3), labels)
    assert m["accuracy"] == pytest.approx(4 / 6)
    # Per class (precision, recall): 0 (1/2, 1/2), 1 (2/3, 1), 2 (1, 1/2).
    f1 = [2 * p * r / (p + r) for p, r in [(1 / 2, 1 / 2), (2 / 3, 1.0), (1.0, 1 / 2)]]
    assert m["macro_f1"] == pytest.approx(sum(f1) / 3)
    assert m["macro_f1"] == pytest.approx((0.5 + 0.8 + 2 / 3) / 3)
    # Multiclass MCC: (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)),
    # c = 4 correct, s = 6, predicted counts p = (2, 3, 1), true counts t = (2, 2, 2).
    c, s, p, t = 4, 6, [2, 3, 1], [2, 2, 2]
    mcc = (c * s - sum(a * b for a, b in zip(p, t, strict=True))) / math.sqrt(
        (s**2 - sum(a * a for a in p)) * (s**2 - sum(b * b for b in t))
    )
    assert m["mcc"] == pytest.approx(mcc)
    assert m["mcc"] == pytest.approx(12 / math.sqrt(528))


def test_binary_metrics_by_hand() -> None:
    labels = [1, 1, 0, 0]
    preds = [1, 0, 0, 0]
    m = classification_metrics(one_hot(preds, 2), labels)
    tp, tn, fp, fn = 1, 2, 0, 1
    assert m["accuracy"] == pytest.approx(0.75)
    f1_pos = 2 * tp / (2 * tp + fp + fn)
    f1_neg = 2 * tn / (2 * tn + fn + fp)
    assert m["macro_f1"] == pytest.approx((f1_pos + f1_neg) / 2)
    mcc = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert m["mcc"] == pytest.approx(mcc)
    assert m["mcc"] == pytest.approx(1 / math.sqrt(3))


def test_perfect_and_constant_predictions() -> None:
    labels = [0, 1, 2, 1]
    perfect = classification_metrics(one_hot(labels, 3), labels)
    assert perfect == {"accuracy": 1.0, "macro_f1": 1.0, "mcc": 1.0}
    constant = classification_metrics(one_hot([1, 1, 1, 1], 3), labels)
    assert constant["accuracy"] == pytest.approx(0.5)
    assert constant["mcc"] == 0.0
    # Only class 1 is ever predicted: F1 2/3 for it, 0 for the other two.
    assert constant["macro_f1"] == pytest.approx((2 / 3) / 3)


def test_metrics_use_the_argmax_of_real_valued_logits() -> None:
    logits = torch.tensor([[0.1, 0.2], [-3.0, -4.0], [10.0, 10.5]])
    assert classification_metrics(logits, [1, 0, 0])["accuracy"] == pytest.approx(2 / 3)


def test_agreement() -> None:
    a = one_hot([0, 1, 0, 1], 2)
    b = one_hot([0, 1, 1, 1], 2)
    assert agreement(a, b) == pytest.approx(0.75)
    assert agreement(a, a * 3 - 1) == 1.0
    assert agreement(one_hot([0, 0], 2), one_hot([1, 1], 2)) == 0.0


def test_count_parameters_and_weights_bytes(tmp_path: Path) -> None:
    assert count_parameters(torch.nn.Linear(3, 2)) == 8
    (tmp_path / "model.safetensors").write_bytes(b"x" * 100)
    (tmp_path / "extra.safetensors").write_bytes(b"x" * 20)
    (tmp_path / "config.json").write_bytes(b"{}" * 50)
    assert weights_bytes(tmp_path) == 120


def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    spec = FreshStudent(num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32)
    return fresh_student(spec, vocab_size=50, label_names=["a", "b", "c"], max_positions=32)


def tiny_data() -> Encoded:
    seqs = [[1, *range(5, 5 + n), 2] for n in (3, 0, 7, 1, 4)]
    return Encoded(seqs, None, [0, 1, 2, 0, 1], list(range(5)))


def test_predict_logits_is_padding_invariant_and_ordered() -> None:
    model = tiny_model().train()
    data = tiny_data()
    batched = predict_logits(model, data, 3, 0, CPU)
    single = predict_logits(model, data, 1, 0, CPU)
    assert batched.shape == (5, 3)
    assert batched.dtype == torch.float32
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-5)
    assert model.training  # restored
    with torch.no_grad():
        model.eval()
        direct = model(input_ids=torch.tensor([data.input_ids[2]])).logits
    torch.testing.assert_close(batched[2:3], direct, rtol=1e-5, atol=1e-5)


def test_model_inputs_drops_labels_and_ids() -> None:
    batch = {
        "input_ids": torch.ones(1, 2),
        "attention_mask": torch.ones(1, 2),
        "labels": torch.zeros(1),
        "example_ids": torch.zeros(1),
    }
    assert set(model_inputs(batch, CPU)) == {"input_ids", "attention_mask"}


def test_latency_per_example_is_positive() -> None:
    seconds = latency_per_example(tiny_model(), tiny_data(), 2, 0, CPU, n_batches=3, warmup=1)
    assert 0.0 < seconds < 1.0
