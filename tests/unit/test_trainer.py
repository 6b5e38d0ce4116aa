"""The training loop on real (tiny) MiniLM students, CPU only."""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass, field

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_engine.data import TransferSet
from kd_engine.data.batching import Encoded, encode
from kd_engine.evaluation import predict_logits
from kd_engine.methods.base import LossResult, Method, Needs, StepOutputs
from kd_engine.methods.finetune import Finetune, FinetuneConfig
from kd_engine.methods.vanilla_kd import VanillaKD, VanillaKDConfig
from kd_engine.models.shapes import ModelShape
from kd_engine.models.student import student_from_teacher
from kd_engine.spec import TrainingSpec
from kd_engine.stages import Stage, lr_factor
from kd_engine.trainer import (
    Cancelled,
    Progress,
    TrainHooks,
    TrainResult,
    cap_warnings,
    pick_device,
    train,
)

# Output-only methods read no shapes; these are MiniLM-L6's.
SHAPE = ModelShape(num_layers=6, hidden_size=384, num_labels=2, num_heads=12)


def finetune() -> Finetune:
    return Finetune(FinetuneConfig(), SHAPE, SHAPE)


CPU = torch.device("cpu")
PAD = 0
# One batch of 16 short examples seen for 6 epochs: enough for the loss to fall clearly in a
# few seconds on two cores. (With 64 examples at lr 1e-4 for 3 epochs the MiniLM student's
# loss does not move measurably: its CLS pooler output barely varies at first.)
KD_TRAINING = TrainingSpec(
    epochs=6,
    batch_size=16,
    learning_rate=1e-3,
    warmup_ratio=0.0,
    max_seq_length=16,
    seed=7,
    device="cpu",
)


def test_linear_schedule_warmup_peak_and_end() -> None:
    f = lr_factor("linear", warmup_steps=4, total_steps=10)
    assert f(0) == pytest.approx(0.25)
    assert f(1) == pytest.approx(0.5)
    assert f(3) == pytest.approx(1.0)
    assert f(4) == pytest.approx(1.0)
    assert f(7) == pytest.approx(0.5)
    assert f(10) == 0.0
    assert f(12) == 0.0
    values = [f(s) for s in range(11)]
    assert max(values) == 1.0
    assert values[3:] == sorted(values[3:], reverse=True)


def test_linear_schedule_without_warmup() -> None:
    f = lr_factor("linear", warmup_steps=0, total_steps=4)
    assert [f(s) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_pick_device() -> None:
    assert pick_device("cpu") == CPU
    if not torch.cuda.is_available():
        assert pick_device("auto") == CPU
        with pytest.raises(ValueError, match="cuda"):
            pick_device("cuda")


@pytest.fixture(scope="module")
def encoded(tokenizer: PreTrainedTokenizerBase, rotten_tomatoes: TransferSet) -> dict[str, Encoded]:
    return {
        "train": encode(rotten_tomatoes.train[:16], tokenizer, 16),
        "dev": encode(rotten_tomatoes.dev[:16], tokenizer, 16),
    }


@dataclass
class Recorded:
    """What a training run left behind: log records, per-epoch weights and dev predictions."""

    student: PreTrainedModel
    result: TrainResult
    logs: list[dict[str, object]] = field(default_factory=list)
    progress: list[Progress] = field(default_factory=list)
    epoch_states: list[dict[str, torch.Tensor]] = field(default_factory=list)
    epoch_dev_preds: list[list[int]] = field(default_factory=list)


def run_recorded(
    teacher: PreTrainedModel, train_data: Encoded, dev_data: Encoded, cfg: TrainingSpec
) -> Recorded:
    student = student_from_teacher(teacher, [0, 3])
    rec = Recorded(student=student, result=TrainResult())

    def log(record: dict[str, object]) -> None:
        rec.logs.append(record)
        if record["event"] == "epoch":  # before the loop compares and keeps the best weights
            rec.epoch_states.append({k: v.clone() for k, v in student.state_dict().items()})
            logits = predict_logits(student, dev_data, 64, PAD, CPU)
            rec.epoch_dev_preds.append(logits.argmax(-1).tolist())

    method = VanillaKD(VanillaKDConfig(alpha=0.5, temperature=2.0), SHAPE, SHAPE)
    hooks = TrainHooks(on_progress=rec.progress.append, log=log, every=1)
    rec.result = train(student, teacher, method, train_data, dev_data, cfg, PAD, CPU, hooks)
    return rec


@pytest.fixture(scope="module")
def kd_runs(
    minilm_classifier: PreTrainedModel, encoded: dict[str, Encoded]
) -> tuple[Recorded, Recorded, dict[str, torch.Tensor]]:
    """Two vanilla_kd runs with the same seed. The second one's dev labels are the first run's
    epoch-1 dev predictions, so that its best dev epoch is epoch 1 (and not the last)."""
    teacher_before = {k: v.clone() for k, v in minilm_classifier.state_dict().items()}
    first = run_recorded(minilm_classifier, encoded["train"], encoded["dev"], KD_TRAINING)
    rigged_dev = dataclasses.replace(encoded["dev"], labels=first.epoch_dev_preds[0])
    with warnings.catch_warnings():  # the rigged dev labels may hold a single class
        warnings.filterwarnings("ignore", "A single label was found")
        second = run_recorded(minilm_classifier, encoded["train"], rigged_dev, KD_TRAINING)
    return first, second, teacher_before


def step_records(rec: Recorded) -> list[dict[str, object]]:
    return [r for r in rec.logs if r["event"] == "step"]


def test_training_lowers_the_loss(kd_runs: tuple[Recorded, Recorded, dict]) -> None:
    first, _, _ = kd_runs
    steps = step_records(first)
    assert [r["step"] for r in steps] == list(range(1, 7))
    assert all({"loss", "ce", "kd", "lr"} <= r.keys() for r in steps)
    for r in steps:
        assert r["loss"] == pytest.approx(0.5 * r["ce"] + 0.5 * r["kd"], rel=1e-4)
    first_loss, last_loss = float(steps[0]["loss"]), float(steps[-1]["loss"])  # type: ignore[arg-type]
    assert last_loss < 0.9 * first_loss, [r["loss"] for r in steps]


def test_learning_rate_follows_the_schedule(kd_runs: tuple[Recorded, Recorded, dict]) -> None:
    first, _, _ = kd_runs
    lrs = [r["lr"] for r in step_records(first)]
    # No warmup, 6 steps: the rate after step k is 1e-3 * (6 - k) / 6.
    assert lrs == pytest.approx([1e-3 * (6 - k) / 6 for k in range(1, 7)])


def test_history_and_progress(kd_runs: tuple[Recorded, Recorded, dict]) -> None:
    first, _, _ = kd_runs
    result = first.result
    assert [h["epoch"] for h in result.history] == list(range(1, 7))
    for h in result.history:
        assert set(h["dev"]) == {"accuracy", "macro_f1", "mcc"}  # type: ignore[arg-type]
    train_progress = [p for p in first.progress if p.stage == "train"]
    assert [p.step for p in train_progress] == list(range(1, 7))
    assert all(p.total_steps == 6 for p in train_progress)
    assert [p.epoch for p in first.progress if p.stage == "evaluate"] == list(range(1, 7))


def test_same_seed_gives_identical_weights(kd_runs: tuple[Recorded, Recorded, dict]) -> None:
    first, second, _ = kd_runs
    # Dev labels only choose the epoch to keep: the trajectory is the same in both runs.
    assert len(first.epoch_states) == len(second.epoch_states) == 6
    for a, b in zip(first.epoch_states, second.epoch_states, strict=True):
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in step_records(first)] == [r["loss"] for r in step_records(second)]
    # ...and the weights did change during training.
    start, end = first.epoch_states[0], first.epoch_states[-1]
    assert not all(torch.equal(start[k], end[k]) for k in start)


def test_best_dev_checkpoint_is_restored(kd_runs: tuple[Recorded, Recorded, dict]) -> None:
    first, second, _ = kd_runs
    assert second.result.best_epoch == 1
    assert second.result.best_dev["accuracy"] == 1.0
    final = second.student.state_dict()
    assert all(torch.equal(final[k], second.epoch_states[0][k]) for k in final)
    assert not all(torch.equal(final[k], second.epoch_states[-1][k]) for k in final)
    # The first run keeps its own best epoch (the first one reaching the top accuracy).
    accs = [h["dev"]["accuracy"] for h in first.result.history]  # type: ignore[index]
    best = accs.index(max(accs)) + 1
    assert first.result.best_epoch == best
    assert first.result.best_dev == first.result.history[best - 1]["dev"]
    final = first.student.state_dict()
    assert all(torch.equal(final[k], first.epoch_states[best - 1][k]) for k in final)


def test_the_teacher_is_not_trained(
    kd_runs: tuple[Recorded, Recorded, dict], minilm_classifier: PreTrainedModel
) -> None:
    _, _, before = kd_runs
    after = minilm_classifier.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def small_student(teacher: PreTrainedModel) -> PreTrainedModel:
    return student_from_teacher(teacher, [0])


def test_cancel_during_steps(
    minilm_classifier: PreTrainedModel, encoded: dict[str, Encoded]
) -> None:
    progress: list[Progress] = []
    cfg = TrainingSpec(epochs=3, batch_size=4, max_seq_length=16, device="cpu")
    hooks = TrainHooks(on_progress=progress.append, should_stop=lambda: True, every=1)
    with pytest.raises(Cancelled):
        train(
            small_student(minilm_classifier),
            None,
            finetune(),
            encoded["train"],
            encoded["dev"],
            cfg,
            PAD,
            CPU,
            hooks,
        )
    assert [(p.stage, p.step) for p in progress] == [("train", 1)]


def test_cancel_at_the_end_of_an_epoch(
    minilm_classifier: PreTrainedModel, encoded: dict[str, Encoded]
) -> None:
    progress: list[Progress] = []
    cfg = TrainingSpec(epochs=2, batch_size=16, max_seq_length=16, device="cpu")
    hooks = TrainHooks(on_progress=progress.append, should_stop=lambda: True, every=100)
    with pytest.raises(Cancelled):
        train(
            small_student(minilm_classifier),
            None,
            finetune(),
            encoded["train"],
            encoded["dev"],
            cfg,
            PAD,
            CPU,
            hooks,
        )
    # One step per epoch, progress every 100: the first check is after epoch 1's evaluation.
    assert [(p.stage, p.epoch) for p in progress] == [("evaluate", 1)]


def test_gradient_accumulation_takes_a_step_per_group_and_at_epoch_end(
    minilm_classifier: PreTrainedModel, encoded: dict[str, Encoded]
) -> None:
    # 16 examples in batches of 4 are 4 micro-batches; groups of 3 give 2 steps per epoch.
    logs: list[dict[str, object]] = []
    cfg = TrainingSpec(
        epochs=2,
        batch_size=4,
        grad_accumulation_steps=3,
        warmup_ratio=0.0,
        max_seq_length=16,
        device="cpu",
    )
    train(
        small_student(minilm_classifier),
        None,
        finetune(),
        encoded["train"],
        encoded["dev"],
        cfg,
        PAD,
        CPU,
        TrainHooks(log=logs.append, every=1),
    )
    steps = [(r["epoch"], r["step"]) for r in logs if r["event"] == "step"]
    assert steps == [(1, 1), (1, 2), (2, 3), (2, 4)]
    assert [r["lr"] for r in logs if r["event"] == "step"][-1] == 0.0


class WarningFinetune(Finetune):
    """Finetune that reports the stage lengths it was given as a schedule warning."""

    def schedule_warnings(self, stage_steps: list[int]) -> list[str]:
        return [f"steps {stage_steps}"]


def test_max_steps_stops_early_and_schedule_warnings_see_that_total(
    minilm_classifier: PreTrainedModel, encoded: dict[str, Encoded]
) -> None:
    logs: list[dict[str, object]] = []
    cfg = TrainingSpec(epochs=5, batch_size=4, max_steps=3, max_seq_length=16, device="cpu")
    result = train(
        small_student(minilm_classifier),
        None,
        WarningFinetune(FinetuneConfig(), SHAPE, SHAPE),
        encoded["train"],
        encoded["dev"],
        cfg,
        PAD,
        CPU,
        TrainHooks(log=logs.append, every=1),
    )
    assert [r["step"] for r in logs if r["event"] == "step"] == [1, 2, 3]
    assert [h["step"] for h in result.history] == [3]
    # The cap cut the stage short: a warning says so (before the method's own), in the
    # result (metrics.json's warnings, the report) and the log (a job event).
    cut, schedule = result.warnings
    planned = 5 * math.ceil(len(encoded["train"]) / 4)
    assert cut.startswith(
        f"training.max_steps cut stage 'train' short: 3 of its planned 5 epochs, {planned} steps"
    ), cut
    assert schedule == "steps [3]"
    assert [r["message"] for r in logs if r["event"] == "warning"] == result.warnings


def test_cap_warnings_name_only_the_stages_cut_short() -> None:
    stages = [Stage("a", epochs=2), Stage("b", steps=10), Stage("c", epochs=1)]
    warnings = cap_warnings(stages, [8, 10, 4], [8, 5, 4])
    assert warnings == [
        "training.max_steps cut stage 'b' short: 5 of its planned 10 steps ran (50.0%); the "
        "student trained for less than the method's plan, so its metrics say little about the "
        "method"
    ]


class NanMethod(Method):
    """A method whose loss is NaN (as after a divergence)."""

    needs = Needs(teacher=False)
    config_cls = FinetuneConfig

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        return LossResult(total=student.logits.sum() * float("nan"))


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad")
def test_a_nan_loss_stops_training(
    minilm_classifier: PreTrainedModel, encoded: dict[str, Encoded]
) -> None:
    cfg = TrainingSpec(epochs=1, batch_size=4, max_seq_length=16, device="cpu")
    with pytest.raises(ValueError, match="nan at step 0"):
        train(
            small_student(minilm_classifier),
            None,
            NanMethod(FinetuneConfig(), SHAPE, SHAPE),
            encoded["train"],
            encoded["dev"],
            cfg,
            PAD,
            CPU,
        )


def test_constant_schedule_warms_up_then_holds() -> None:
    f = lr_factor("constant", warmup_steps=2, total_steps=6)
    assert [f(s) for s in range(7)] == pytest.approx([0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0])


class InfAtStep(Method):
    """Fine-tuning whose loss becomes infinite at micro-step ``bad`` (counted from 0)."""

    config_cls = FinetuneConfig
    needs = Needs(teacher=False)
    bad = 3

    def __init__(self, *args: object) -> None:
        super().__init__(*args)  # type: ignore[arg-type]
        self.calls = 0

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        scale = float("inf") if self.calls == self.bad else 1.0
        self.calls += 1
        ce = torch.nn.functional.cross_entropy(student.logits, labels)
        return LossResult(total=ce * scale, parts={"ce": ce.detach()})


def test_a_non_finite_loss_read_at_the_report_names_its_own_step(
    minilm_classifier: PreTrainedModel, encoded: dict[str, Encoded]
) -> None:
    """The losses are read back at reports (every 5 steps), yet the error names the step the
    loss became infinite at (3) and its stage, and no report shows it."""
    progress: list[Progress] = []
    cfg = TrainingSpec(epochs=3, batch_size=2, max_seq_length=16, device="cpu")
    with pytest.raises(ValueError, match=r"became inf at step 3 \(stage 'train'\)"):
        train(
            small_student(minilm_classifier),
            None,
            InfAtStep(FinetuneConfig(), SHAPE, SHAPE),
            encoded["train"],
            encoded["dev"],
            cfg,
            PAD,
            CPU,
            TrainHooks(on_progress=progress.append, every=5),
        )
    assert progress == []


def test_results_do_not_depend_on_when_the_losses_are_read(
    minilm_classifier: PreTrainedModel, encoded: dict[str, Encoded]
) -> None:
    """Reading the losses back at every step or every 7 steps (the report cadence) gives the
    same weights, history, best evaluation and mean losses, bit for bit; with
    evaluations every 2 steps, a best state that is copied lazily and gradient accumulation."""
    cfg = TrainingSpec(
        epochs=3,
        batch_size=2,
        learning_rate=1e-3,
        max_seq_length=16,
        eval_every_steps=2,
        grad_accumulation_steps=2,
        seed=5,
        device="cpu",
    )
    runs = []
    for every in (1, 7):
        torch.manual_seed(0)
        student = small_student(minilm_classifier)
        result = train(
            student,
            minilm_classifier,
            VanillaKD(VanillaKDConfig(), SHAPE, SHAPE),
            encoded["train"],
            encoded["dev"],
            cfg,
            PAD,
            CPU,
            TrainHooks(every=every),
        )
        runs.append((student.state_dict(), result))
    (a, ra), (b, rb) = runs
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in h.items() if k != "seconds"} for h in ra.history]
    assert strip == [{k: v for k, v in h.items() if k != "seconds"} for h in rb.history]
    assert (ra.best_step, ra.best_dev) == (rb.best_step, rb.best_dev)
    assert len(ra.history) > 3  # several evaluations, each a candidate best state


class Declared(Method):
    """Fine-tuning that records the outputs the loop gave its loss; its x' is each batch's
    first example. ``augment`` fails when called without ``Needs(augmented=True)``."""

    config_cls = FinetuneConfig

    def __init__(self, needs: Needs) -> None:
        super().__init__(FinetuneConfig(), SHAPE, SHAPE)
        self.needs = needs  # type: ignore[misc]
        self.seen: list[tuple[StepOutputs, StepOutputs | None]] = []

    def augment(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        assert self.needs.augmented, "augment called though the method did not declare it"
        keys = ("input_ids", "attention_mask", "token_type_ids")
        return {k: v[:1] for k, v in batch.items() if k in keys}

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        self.seen.append((student, teacher))
        ce = torch.nn.functional.cross_entropy(student.logits, labels)
        return LossResult(total=ce, parts={"ce": ce.detach()})


@pytest.mark.parametrize(
    "needs",
    [
        Needs(teacher=False),
        Needs(),
        Needs(hidden_states=True, augmented=True),
        Needs(teacher=False, attentions=True),
    ],
    ids=["no-teacher", "logits", "hidden-augmented", "attentions"],
)
def test_the_loop_computes_what_the_method_declares(
    needs: Needs, minilm_classifier: PreTrainedModel, encoded: dict[str, Encoded]
) -> None:
    """What a method's loss receives follows its ``Needs`` alone: the teacher's outputs or
    none, hidden states and attention maps of both models (the student has 1 layer, the
    teacher 6) or none, outputs on x' or none; an ``augment`` the method does not declare is
    never called."""
    method = Declared(needs)
    cfg = TrainingSpec(epochs=1, batch_size=4, max_steps=2, max_seq_length=16, device="cpu")
    train(
        small_student(minilm_classifier),
        minilm_classifier,
        method,
        encoded["train"],
        encoded["dev"],
        cfg,
        PAD,
        CPU,
    )
    assert len(method.seen) == 2
    for student, teacher in method.seen:
        assert student.logits.shape == (4, 2)
        assert (teacher is not None) == needs.teacher
        for out, layers in ((student, 1), (teacher, 6)):
            if out is None:
                continue
            hidden, attentions = out.hidden_states, out.attentions
            assert (len(hidden) if hidden else 0) == (layers + 1 if needs.hidden_states else 0)
            assert (len(attentions) if attentions else 0) == (layers if needs.attentions else 0)
            if needs.augmented:
                assert out.augmented is not None and out.augmented.logits.shape == (1, 2)
            else:
                assert out.augmented is None
