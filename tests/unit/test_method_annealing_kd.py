"""annealing_kd: the temperature schedule, Phi(T) and the stage-I loss by hand, its two stages,
and a real two-stage training run (MiniLM, CPU) that hands the best stage-I weights to stage II
and shows the temperatures in progress."""

from __future__ import annotations

import dataclasses
import math
import warnings

import pytest
import torch
from pydantic import ValidationError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_engine import registry
from kd_engine.data import TransferSet
from kd_engine.data.batching import Encoded, encode
from kd_engine.errors import SpecError
from kd_engine.evaluation import predict_logits
from kd_engine.losses.annealing import annealing_factor, annealing_mse, annealing_temperature
from kd_engine.methods.annealing_kd import AnnealingKD, AnnealingKDConfig
from kd_engine.methods.base import StepOutputs
from kd_engine.models.shapes import ModelShape
from kd_engine.models.student import student_from_teacher
from kd_engine.spec import TrainingSpec
from kd_engine.trainer import Progress, TrainHooks, train

CPU = torch.device("cpu")
PAD = 0
SHAPE = ModelShape(num_layers=2, hidden_size=8, num_labels=2, num_heads=2)
STUDENT = [[1.0, 2.0], [0.0, -1.0]]
TEACHER = [[3.0, 0.0], [2.0, 2.0]]
LABELS = [1, 0]
MASK = torch.ones(2, 3, dtype=torch.long)


def build(**settings: object) -> AnnealingKD:
    method = registry.build(
        AnnealingKDConfig.model_validate(settings), SHAPE, SHAPE, TrainingSpec()
    )
    assert isinstance(method, AnnealingKD)
    return method


def out(logits: list[list[float]]) -> StepOutputs:
    return StepOutputs(logits=torch.tensor(logits))


# --- the schedule and the loss by hand ---------------------------------------------------------


def test_temperature_sequence_and_phi_by_hand() -> None:
    temps = [annealing_temperature(e, 3, 2) for e in range(1, 7)]
    assert temps == [3, 3, 2, 2, 1, 1]
    phis = [annealing_factor(t, 3) for t in temps]
    assert phis == pytest.approx([1 / 3, 1 / 3, 2 / 3, 2 / 3, 1.0, 1.0])
    # The authors' GLUE recipe: tau_max 7, 14 epochs, 2 per temperature.
    assert [annealing_temperature(e, 7, 2) for e in range(1, 15)] == [
        7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1,
    ]  # fmt: skip
    assert annealing_factor(7, 7) == pytest.approx(1 / 7)


def test_schedule_rejects_out_of_range_arguments() -> None:
    with pytest.raises(ValueError, match=r"outside 1\.\.6"):
        annealing_temperature(7, 3, 2)
    with pytest.raises(ValueError, match=r"outside 1\.\.6"):
        annealing_temperature(0, 3, 2)
    with pytest.raises(ValueError, match=">= 1"):
        annealing_temperature(1, 0, 2)
    with pytest.raises(ValueError, match=r"outside 1\.\.3"):
        annealing_factor(4, 3)


def test_annealing_mse_by_hand() -> None:
    # Phi = 2/3: targets (2, 0) and (4/3, 4/3); squared differences 1, 4, 16/9, 49/9, mean over
    # the 4 elements (batch x classes, F.mse_loss's 'mean').
    got = annealing_mse(torch.tensor(STUDENT), torch.tensor(TEACHER), 2 / 3)
    assert float(got) == pytest.approx((1 + 4 + 16 / 9 + 49 / 9) / 4)
    with pytest.raises(ValueError, match="differ in shape"):
        annealing_mse(torch.zeros(2, 2), torch.zeros(2, 3), 1.0)


def test_annealing_mse_gives_no_gradient_to_the_teacher() -> None:
    s = torch.tensor(STUDENT, requires_grad=True)
    t = torch.tensor(TEACHER, requires_grad=True)
    annealing_mse(s, t, 1.0).backward()
    assert t.grad is None
    # d/dz_s mean((z_s - z_t)^2) = 2 (z_s - z_t) / 4.
    assert s.grad is not None
    assert torch.allclose(s.grad, (torch.tensor(STUDENT) - torch.tensor(TEACHER)) / 2)


# --- the method ----------------------------------------------------------------------------------


def test_default_stages_are_the_authors_recipe() -> None:
    method = build()
    c = method.config
    assert (c.tau_max, c.epochs_per_temperature, c.stage_two_epochs) == (7, 2, 4)
    one, two = method.stages(TrainingSpec(epochs=3, learning_rate=5e-5, warmup_ratio=0.1))
    assert (one.epochs, one.learning_rate, one.warmup_ratio, one.schedule) == (
        14,
        2e-5,
        0.0,
        "linear",
    )
    assert (one.selects_best, one.restore_best, one.evaluates) == (False, True, True)
    assert (two.epochs, two.learning_rate, two.warmup_ratio, two.schedule) == (
        4,
        2e-5,
        0.0,
        "linear",
    )
    assert (two.selects_best, two.restore_best) == (True, False)
    assert one.trains is None and two.trains is None


def test_stage_lengths_and_rates_follow_the_settings() -> None:
    method = build(
        tau_max=3,
        epochs_per_temperature=2,
        stage_one_learning_rate=1e-4,
        stage_two_epochs=5,
        stage_two_learning_rate=3e-5,
    )
    one, two = method.stages(TrainingSpec())
    assert (one.epochs, one.learning_rate, two.epochs, two.learning_rate) == (6, 1e-4, 5, 3e-5)


def test_stage_one_loss_reads_the_temperature_from_the_epoch_in_the_stage() -> None:
    method = build(tau_max=3, epochs_per_temperature=2)
    stage_one = method.stages(TrainingSpec())[0]
    method.begin_stage(stage_one)
    assert method.stage_label() == "annealing T=3/3"
    # The stage's first step is in job epoch 5 (robust to stages before it): epoch 7 is its
    # third epoch, T = 2, Phi = 2/3.
    method.start_step(5, 40)
    assert method.stage_label() == "annealing T=3/3"
    method.start_step(7, 48)
    assert method.stage_label() == "annealing T=2/3"
    res = method.loss(out(STUDENT), out(TEACHER), torch.tensor(LABELS), MASK)
    assert float(res.total) == pytest.approx((1 + 4 + 16 / 9 + 49 / 9) / 4)
    assert res.parts == {"annealed_mse": pytest.approx((1 + 4 + 16 / 9 + 49 / 9) / 4)}
    method.start_step(10, 60)  # its sixth epoch: T = 1, the full teacher logits
    assert method.stage_label() == "annealing T=1/3"
    res = method.loss(out(STUDENT), out(TEACHER), torch.tensor(LABELS), MASK)
    assert float(res.total) == pytest.approx((4 + 4 + 4 + 9) / 4)
    with pytest.raises(ValueError, match="teacher"):
        method.loss(out(STUDENT), None, torch.tensor(LABELS), MASK)


def test_stage_two_is_ce_on_the_labels_only() -> None:
    method = build(tau_max=3, epochs_per_temperature=2)
    method.begin_stage(method.stages(TrainingSpec())[1])
    method.start_step(7, 50)
    assert method.stage_label() == "label fine-tuning"
    # Both rows: -log softmax(...)[gold] = log(1 + e^-1).
    expected = math.log(1 + math.exp(-1))
    res = method.loss(out(STUDENT), None, torch.tensor(LABELS), MASK)
    assert float(res.total) == pytest.approx(expected, rel=1e-6)
    with_teacher = method.loss(out(STUDENT), out(TEACHER), torch.tensor(LABELS), MASK)
    assert float(with_teacher.total) == pytest.approx(expected, rel=1e-6)


def test_settings_bounds_and_fit_check() -> None:
    with pytest.raises(ValidationError):
        AnnealingKDConfig(tau_max=0)
    with pytest.raises(ValidationError):
        AnnealingKDConfig(epochs_per_temperature=0)
    with pytest.raises(SpecError) as info:
        registry.check(
            AnnealingKDConfig(tau_max=70, epochs_per_temperature=3), SHAPE, SHAPE, TrainingSpec()
        )
    assert info.value.field == "method.epochs_per_temperature"
    registry.check(
        AnnealingKDConfig(tau_max=100, epochs_per_temperature=2), SHAPE, SHAPE, TrainingSpec()
    )


def test_schedule_warning_when_max_steps_cuts_stage_one() -> None:
    method = build(tau_max=3, epochs_per_temperature=2, stage_two_epochs=2)
    assert method.schedule_warnings([6 * 5, 2 * 5]) == []  # 5 steps per epoch, uncut
    assert method.schedule_warnings([7, 7]) != []  # max_steps 7 < 6 epochs of stage I
    [warning] = method.schedule_warnings([12, 10])
    assert "T=1" in warning


# --- a real training run -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def encoded(tokenizer: PreTrainedTokenizerBase, rotten_tomatoes: TransferSet) -> dict[str, Encoded]:
    return {
        "train": encode(rotten_tomatoes.train[:16], tokenizer, 16),
        "dev": encode(rotten_tomatoes.dev[:16], tokenizer, 16),
    }


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def run(
    teacher: PreTrainedModel, encoded: dict[str, Encoded], dev: Encoded
) -> tuple[list[dict[str, object]], list[Progress], dict[str, list], PreTrainedModel]:
    """tau_max 3, k 2 (6 epochs), then 2 epochs of CE; 16 examples in one batch: one optimiser
    step per epoch. Records the student's weights at each stage start and epoch end."""
    teacher.eval()
    student = student_from_teacher(teacher, [0])
    method = AnnealingKD(
        AnnealingKDConfig(
            tau_max=3,
            epochs_per_temperature=2,
            stage_one_learning_rate=5e-4,
            stage_two_epochs=2,
            stage_two_learning_rate=5e-4,
        ),
        SHAPE,
        SHAPE,
    )
    logs: list[dict[str, object]] = []
    progress: list[Progress] = []
    seen: dict[str, list] = {"stage_start": [], "epoch": []}

    def log(record: dict[str, object]) -> None:
        logs.append(record)
        if record["event"] in ("stage", "epoch"):
            seen["stage_start" if record["event"] == "stage" else "epoch"].append(weights(student))

    cfg = TrainingSpec(batch_size=16, max_seq_length=16, weight_decay=0.0, seed=5, device="cpu")
    train(
        student,
        teacher,
        method,
        encoded["train"],
        dev,
        cfg,
        PAD,
        CPU,
        TrainHooks(on_progress=progress.append, log=log, every=1),
    )
    return logs, progress, seen, student


@pytest.mark.slow  # two stages of MiniLM training
def test_training_anneals_then_starts_stage_two_from_the_best_stage_one_weights(
    minilm_classifier: PreTrainedModel, encoded: dict[str, Encoded]
) -> None:
    """Dev labels are rigged to the student's predictions after stage-I epoch 1, so that epoch
    (accuracy 1.0, the first evaluation) is the best of stage I; stage II must start from its
    weights, not from the last stage-I weights."""
    _, _, seen, _ = run(minilm_classifier, encoded, encoded["dev"])
    student = student_from_teacher(minilm_classifier, [0])
    student.load_state_dict(seen["epoch"][0])
    rigged = dataclasses.replace(
        encoded["dev"],
        labels=predict_logits(student, encoded["dev"], 64, PAD, CPU).argmax(-1).tolist(),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "A single label was found")
        logs, progress, seen2, final = run(minilm_classifier, encoded, rigged)

    assert same(seen2["epoch"][0], seen["epoch"][0])  # the same trajectory
    epochs = [r for r in logs if r["event"] == "epoch"]
    assert [r["stage"] for r in epochs] == [
        "annealing T=3/3",
        "annealing T=3/3",
        "annealing T=2/3",
        "annealing T=2/3",
        "annealing T=1/3",
        "annealing T=1/3",
        "label fine-tuning",
        "label fine-tuning",
    ]
    assert epochs[0]["dev"]["accuracy"] == 1.0  # type: ignore[index]
    assert not same(seen2["epoch"][5], seen2["epoch"][0])  # stage I went on past it...
    assert same(seen2["stage_start"][1], seen2["epoch"][0])  # ...and stage II started from it
    summary = [r for r in logs if r["event"] == "stage_end"]
    assert [(s["name"], s["steps"], s["restored_best"]) for s in summary] == [
        ("annealing", 6, True),
        ("label fine-tuning", 2, False),
    ]

    # Progress shows the temperatures in order, then stage II.
    labels = [p.stage for p in progress if p.stage != "evaluate"]
    assert labels == [
        "annealing T=3/3",
        "annealing T=3/3",
        "annealing T=2/3",
        "annealing T=2/3",
        "annealing T=1/3",
        "annealing T=1/3",
        "label fine-tuning",
        "label fine-tuning",
    ]
    # One linear decay over all of stage I (not one per T), a new one for stage II.
    steps = [r for r in logs if r["event"] == "step"]
    assert [r["lr"] for r in steps] == pytest.approx(
        [5e-4 * k / 6 for k in (5, 4, 3, 2, 1, 0)] + [5e-4 / 2, 0.0]
    )
    assert all("annealed_mse" in r for r in steps[:6])
    assert all("ce" in r and "annealed_mse" not in r for r in steps[6:])

    # Only stage II selects: the exported weights are its best evaluation.
    accs = [r["dev"]["accuracy"] for r in epochs[6:]]  # type: ignore[index]
    assert same(weights(final), seen2["epoch"][6 + accs.index(max(accs))])
