"""teacher_free (Tf-KD_reg): the virtual teacher and both KD variants by hand, the method's loss,
its fit checks, and a tiny real job whose teacher is a base encoder (no teacher is run)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from kd_engine import registry
from kd_engine.errors import SpecError
from kd_engine.losses.virtual_teacher import virtual_teacher_distribution, virtual_teacher_kd
from kd_engine.methods.base import StepOutputs
from kd_engine.methods.teacher_free import TeacherFree, TeacherFreeConfig
from kd_engine.models.shapes import ModelShape
from kd_engine.run import run_job
from kd_engine.spec import JobSpec, TrainingSpec
from tests.checks import NO_EXTRAS, check_classification_metrics

SHAPE = ModelShape(num_layers=2, hidden_size=8, num_labels=3, num_heads=2)
STUDENT = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
LABELS = [0, 2]
MASK = torch.ones(2, 3, dtype=torch.long)


def softmax(row: list[float]) -> list[float]:
    exps = [math.exp(v) for v in row]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def virtual(label: int, a: float, c: int = 3) -> list[float]:
    return [a if k == label else (1 - a) / (c - 1) for k in range(c)]


def hand_paper(a: float, tau: float) -> float:
    """tau^2 KL(p^d ** (1/tau) normalised || softmax(z_s / tau)), batch mean."""
    total = 0.0
    for row, y in zip(STUDENT, LABELS, strict=True):
        root = [p ** (1 / tau) for p in virtual(y, a)]
        target = [r / sum(root) for r in root]
        total += kl(target, softmax([v / tau for v in row]))
    return tau**2 * total / len(STUDENT)


def hand_code(a: float, tau: float) -> float:
    """KL(softmax(p^d / tau) || softmax(z_s)), summed, / (B * C)."""
    total = 0.0
    for row, y in zip(STUDENT, LABELS, strict=True):
        target = softmax([p / tau for p in virtual(y, a)])
        total += kl(target, softmax(row))
    return total / (len(STUDENT) * 3)


def hand_ce() -> float:
    return -sum(math.log(softmax(r)[y]) for r, y in zip(STUDENT, LABELS, strict=True)) / 2


def test_virtual_teacher_distribution_by_hand() -> None:
    got = virtual_teacher_distribution(torch.tensor([0, 2]), 3, 0.9)
    assert torch.allclose(got, torch.tensor([[0.9, 0.05, 0.05], [0.05, 0.05, 0.9]]))
    with pytest.raises(ValueError, match="at least 2"):
        virtual_teacher_distribution(torch.tensor([0]), 1, 0.9)
    with pytest.raises(ValueError, match="correct_prob"):
        virtual_teacher_distribution(torch.tensor([0]), 3, 1.0)
    with pytest.raises(ValueError, match="class ids"):
        virtual_teacher_distribution(torch.tensor([3]), 3, 0.9)


@pytest.mark.parametrize(("a", "tau"), [(0.9, 1.0), (0.9, 2.0), (0.99, 20.0)])
def test_paper_variant_by_hand(a: float, tau: float) -> None:
    got = virtual_teacher_kd(torch.tensor(STUDENT), torch.tensor(LABELS), a, tau, "paper")
    # float32: tau^2 = 400 magnifies the rounding of the small KL at tau 20.
    assert float(got) == pytest.approx(hand_paper(a, tau), rel=1e-4)


def test_paper_variant_at_tau_one_is_kl_to_the_virtual_teacher() -> None:
    # tau = 1: KL(p^d || softmax(z_s)) itself, e.g. for row 0: p^d = (0.9, 0.05, 0.05).
    expected = sum(
        kl(virtual(y, 0.9), softmax(row)) for row, y in zip(STUDENT, LABELS, strict=True)
    )
    got = virtual_teacher_kd(torch.tensor(STUDENT), torch.tensor(LABELS), 0.9, 1.0, "paper")
    assert float(got) == pytest.approx(expected / 2, rel=1e-5)


@pytest.mark.parametrize(("a", "tau"), [(0.9, 1.0), (0.99, 20.0)])
def test_authors_code_variant_by_hand(a: float, tau: float) -> None:
    got = virtual_teacher_kd(torch.tensor(STUDENT), torch.tensor(LABELS), a, tau, "authors_code")
    assert float(got) == pytest.approx(hand_code(a, tau), rel=1e-5)


def test_authors_code_target_is_almost_uniform() -> None:
    """What the docs claim: C = 2, a = 0.99, T = 20 gives 0.512 on the gold class."""
    # A student that outputs the code's target exactly has zero loss.
    target = torch.softmax(torch.tensor([[0.99, 0.01]]) / 20, dim=1)
    assert float(target[0, 0]) == pytest.approx(0.5122, abs=1e-4)
    got = virtual_teacher_kd(target.log(), torch.tensor([0]), 0.99, 20.0, "authors_code")
    assert float(got) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("variant", ["paper", "authors_code"])
def test_method_loss_mixes_ce_and_kd(variant: str) -> None:
    config = TeacherFreeConfig(
        alpha=0.3, temperature=2.0, correct_prob=0.9, multiplier=5.0, variant=variant
    )
    method = registry.build(config, SHAPE, SHAPE, TrainingSpec())
    assert isinstance(method, TeacherFree)
    assert not method.needs.teacher
    kd = hand_paper(0.9, 2.0) if variant == "paper" else hand_code(0.9, 2.0)
    res = method.loss(StepOutputs(torch.tensor(STUDENT)), None, torch.tensor(LABELS), MASK)
    assert float(res.total) == pytest.approx(0.7 * hand_ce() + 0.3 * 5.0 * kd, rel=1e-5)
    assert res.parts == {
        "ce": pytest.approx(hand_ce(), rel=1e-5),
        "kd": pytest.approx(kd, rel=1e-5),
    }


def test_defaults_are_the_authors_loss_and_one_config() -> None:
    """Issue 23: the default is the authors' Tf-KD_reg (``loss_kd_regularization``) with their
    base_resnet18 config (reg_alpha 0.1, reg_temperature 20, multiplier 100), a = 0.99."""
    c = TeacherFreeConfig()
    assert (c.alpha, c.temperature, c.correct_prob, c.multiplier, c.variant) == (
        0.1,
        20.0,
        0.99,
        100.0,
        "authors_code",
    )
    method = registry.build(c, SHAPE, SHAPE, TrainingSpec())
    logits, labels = torch.tensor(STUDENT), torch.tensor(LABELS)
    out = method.loss(StepOutputs(logits), None, labels, MASK)
    # By hand: KLDivLoss()(log_softmax(z_s), softmax(p^d / 20)) * 100, no T^2.
    kd = 0.0
    for row, y in zip(STUDENT, LABELS, strict=True):
        target = softmax([p / 20 for p in virtual(y, 0.99)])
        kd += kl(target, softmax(row))
    kd /= len(STUDENT) * 3
    assert float(out.total) == pytest.approx(0.9 * hand_ce() + 0.1 * 100.0 * kd, rel=1e-5)
    with pytest.raises(ValidationError):
        TeacherFreeConfig(correct_prob=1.0)
    with pytest.raises(ValidationError):
        TeacherFreeConfig(variant="other")  # type: ignore[arg-type]


def test_a_stored_spec_of_the_old_default_keeps_its_meaning() -> None:
    """Specs are stored with every setting written out: a job submitted with the old default
    (``paper``, multiplier 1) still reads as ``paper``."""
    stored = {"name": "teacher_free", "alpha": 0.1, "temperature": 20.0, "correct_prob": 0.99}
    old = TeacherFreeConfig.model_validate({**stored, "multiplier": 1.0, "variant": "paper"})
    method = registry.build(old, SHAPE, SHAPE, TrainingSpec())
    out = method.loss(StepOutputs(torch.tensor(STUDENT)), None, torch.tensor(LABELS), MASK)
    assert float(out.parts["kd"]) == pytest.approx(hand_paper(0.99, 20.0), rel=1e-4)


def test_regression_and_a_weak_gold_class_are_rejected() -> None:
    regression = ModelShape(num_layers=2, hidden_size=8, num_labels=1, num_heads=2)
    with pytest.raises(SpecError) as info:
        registry.check(TeacherFreeConfig(), regression, regression, TrainingSpec())
    assert info.value.field == "method.name"
    with pytest.raises(SpecError) as info:
        registry.check(TeacherFreeConfig(correct_prob=0.3), SHAPE, SHAPE, TrainingSpec())
    assert info.value.field == "method.correct_prob"
    registry.check(TeacherFreeConfig(correct_prob=0.34), SHAPE, SHAPE, TrainingSpec())


def no_files(ref: str) -> Path:
    raise ValueError(f"no file references in this test: {ref!r}")


def test_a_job_runs_with_a_base_encoder_as_its_teacher(tmp_path: Path, minilm_path: Path) -> None:
    """No teacher forward pass: the base MiniLM (no classifier head) is only the tokenizer and
    the student's initial weights."""
    spec = JobSpec.model_validate(
        {
            "teacher": "builtin:minilm-l6",
            "student": {"type": "from_teacher", "num_layers": 1},
            "method": {"name": "teacher_free", "temperature": 4.0, "alpha": 0.5},
            "dataset": {
                "source": "builtin:rotten_tomatoes",
                "max_train_examples": 32,
                "max_eval_examples": 16,
            },
            "training": {"epochs": 1, "batch_size": 16, "max_seq_length": 16, "device": "cpu"},
            "export": NO_EXTRAS,
        }
    )
    result = run_job(spec, minilm_path, no_files, tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    metrics = result.metrics
    assert metrics["method"] == "teacher_free"
    assert "teacher_test" not in metrics  # the base encoder was never run
    [evaluation] = metrics["epochs"]
    assert set(evaluation["train_losses"]) == {"loss", "ce", "kd"}
    dev_correct = evaluation["dev"]["accuracy"] * metrics["data"]["dev"]
    assert dev_correct == pytest.approx(round(dev_correct))  # a count of the dev examples
    check_classification_metrics(metrics, 16)  # no teacher: no agreement, no teacher matrix
