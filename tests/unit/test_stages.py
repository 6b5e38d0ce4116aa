"""Stage-aware training on a real (tiny) MiniLM student, CPU only: each stage rebuilds the
optimiser and the LR schedule, trains only its parameter groups, evaluates as it says, may hand
its best weights to the next stage, and only selecting stages choose the exported weights."""

from __future__ import annotations

import dataclasses
import warnings
from typing import ClassVar

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_engine.data import TransferSet
from kd_engine.data.batching import Encoded, encode
from kd_engine.errors import SpecError
from kd_engine.evaluation import predict_logits
from kd_engine.losses import ce_loss
from kd_engine.methods.base import LossResult, Method, Needs, StepOutputs
from kd_engine.methods.finetune import FinetuneConfig
from kd_engine.models.shapes import ModelShape
from kd_engine.models.student import student_from_teacher
from kd_engine.spec import TrainingSpec
from kd_engine.stages import STUDENT, ParamGroup, Stage
from kd_engine.trainer import Progress, TrainHooks, train

CPU = torch.device("cpu")
PAD = 0
SHAPE = ModelShape(num_layers=6, hidden_size=384, num_labels=2, num_heads=12)


class TwoStage(Method):
    """Stage ``probe`` trains only a linear probe on the student's logits (2 steps, constant
    LR 1e-3, may not select); stage ``tune`` trains only the student (linear decay from 5e-4,
    warm-up 0, selects). Which stage restores its best weights is a class setting."""

    needs = Needs(teacher=False)
    config_cls = FinetuneConfig
    restore: ClassVar[bool] = False
    probe_stage_epochs: ClassVar[int] = 2

    def __init__(self, config: FinetuneConfig, teacher: ModelShape, student: ModelShape) -> None:
        super().__init__(config, teacher, student)
        torch.manual_seed(0)
        self.probe = torch.nn.Linear(2, 2)

    def stages(self, training: TrainingSpec) -> list[Stage]:
        return [
            Stage(
                "probe",
                loss="probe",
                epochs=self.probe_stage_epochs,
                learning_rate=1e-3,
                warmup_ratio=0.0,
                schedule="constant",
                trains=("probe",),
                selects_best=False,
                restore_best=self.restore,
            ),
            Stage(
                "tune",
                loss="tune",
                epochs=3,
                learning_rate=5e-4,
                warmup_ratio=0.0,
                trains=(STUDENT,),
            ),
        ]

    def param_groups(self) -> list[ParamGroup]:
        return [ParamGroup("probe", [self.probe])]

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        if self.stage is not None and self.stage.loss == "probe":
            # The student's logits feed the probe; in this stage they must get no update.
            return LossResult(ce_loss(self.probe(student.logits), labels))
        return LossResult(ce_loss(student.logits, labels))


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


def run_two_stage(
    teacher: PreTrainedModel, encoded: dict[str, Encoded], method: TwoStage, dev: Encoded | None
) -> tuple[PreTrainedModel, list[dict[str, object]], list[Progress], dict[str, list]]:
    """Train, recording the student and probe weights at each stage start and after each
    optimiser step (16 examples in one batch: one step per epoch)."""
    student = student_from_teacher(teacher, [0])
    logs: list[dict[str, object]] = []
    progress: list[Progress] = []
    seen: dict[str, list] = {"stage_start": [], "step": [], "probe_step": [], "epoch": []}

    def log(record: dict[str, object]) -> None:
        logs.append(record)
        if record["event"] == "stage":
            seen["stage_start"].append(weights(student))
        elif record["event"] == "step":
            seen["step"].append(weights(student))
            seen["probe_step"].append(weights(method.probe))
        elif record["event"] == "epoch":
            seen["epoch"].append(weights(student))

    cfg = TrainingSpec(batch_size=16, max_seq_length=16, weight_decay=0.0, seed=3, device="cpu")
    train(
        student,
        None,
        method,
        encoded["train"],
        dev if dev is not None else encoded["dev"],
        cfg,
        PAD,
        CPU,
        TrainHooks(on_progress=progress.append, log=log, every=1),
    )
    return student, logs, progress, seen


@pytest.fixture(scope="module")
def plain_run(minilm_classifier: PreTrainedModel, encoded: dict[str, Encoded]) -> tuple:
    method = TwoStage(FinetuneConfig(), SHAPE, SHAPE)
    probe_before = weights(method.probe)
    student, logs, progress, seen = run_two_stage(minilm_classifier, encoded, method, None)
    return method, probe_before, student, logs, progress, seen


def test_each_stage_has_its_own_schedule(plain_run: tuple) -> None:
    _, _, _, logs, _, _ = plain_run
    steps = [r for r in logs if r["event"] == "step"]
    assert [r["stage"] for r in steps] == ["probe"] * 2 + ["tune"] * 3
    assert [r["lr"] for r in steps[:2]] == pytest.approx([1e-3, 1e-3])  # constant
    # tune: a new scheduler, 3 steps of linear decay from 5e-4 to 0.
    assert [r["lr"] for r in steps[2:]] == pytest.approx([5e-4 * 2 / 3, 5e-4 / 3, 0.0])


def test_frozen_groups_do_not_change(plain_run: tuple) -> None:
    method, probe_before, _, _, _, seen = plain_run
    student_start = seen["stage_start"][0]
    # Stage probe: the student is frozen, the probe learns.
    assert same(seen["step"][1], student_start)
    assert not same(seen["probe_step"][1], probe_before)
    # Stage tune: the probe is frozen, the student learns.
    assert same(seen["probe_step"][-1], seen["probe_step"][1])
    assert not same(seen["step"][-1], student_start)
    assert all(p.requires_grad for p in method.probe.parameters())  # unfrozen afterwards


class BothStagesTrainTheStudent(TwoStage):
    def stages(self, training: TrainingSpec) -> list[Stage]:
        first, second = super().stages(training)
        return [dataclasses.replace(first, trains=None, loss="tune"), second]


def step_ratio(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], lr: float) -> float:
    """Median over the weights that moved of |change| / lr."""
    d = torch.cat([(after[k] - before[k]).abs().flatten() / lr for k in before])
    return float(d[d > 0].median())


def test_a_new_stage_starts_with_a_fresh_adamw(
    minilm_classifier: PreTrainedModel, encoded: dict[str, Encoded]
) -> None:
    """With fresh moments, AdamW's first step moves a weight by lr * g / (|g| + eps), i.e. by
    about lr (no weight decay); with moments carried from earlier steps it moves less. Both
    stages train the student: the first step of stage 2 must look like a first step."""
    method = BothStagesTrainTheStudent(FinetuneConfig(), SHAPE, SHAPE)
    _, _, _, seen = run_two_stage(minilm_classifier, encoded, method, None)
    fresh = step_ratio(seen["stage_start"][1], seen["step"][2], 5e-4)
    carried = step_ratio(seen["step"][0], seen["step"][1], 1e-3)  # stage 1, its second step
    assert fresh > 0.97, fresh
    assert carried < 0.9, carried


def test_progress_names_the_stage_and_its_position(plain_run: tuple) -> None:
    _, _, _, _, progress, _ = plain_run
    train_progress = [p for p in progress if p.stage != "evaluate"]
    assert [(p.stage, p.stage_index, p.num_stages) for p in train_progress] == [
        ("probe", 1, 2)
    ] * 2 + [("tune", 2, 2)] * 3
    assert [(p.step, p.stage_step, p.stage_steps, p.total_steps) for p in train_progress] == [
        (1, 1, 2, 5),
        (2, 2, 2, 5),
        (3, 1, 3, 5),
        (4, 2, 3, 5),
        (5, 3, 3, 5),
    ]


def test_only_selecting_stages_choose_the_exported_weights(plain_run: tuple) -> None:
    _, _, student, logs, _, seen = plain_run
    epochs = [r for r in logs if r["event"] == "epoch"]
    assert [r["stage"] for r in epochs] == ["probe", "probe", "tune", "tune", "tune"]
    tune = epochs[2:]
    scores = [r["dev"]["accuracy"] for r in tune]  # type: ignore[index]
    best = scores.index(max(scores))
    assert same(weights(student), seen["epoch"][2 + best])


def test_restore_best_starts_the_next_stage_from_the_best_weights(
    minilm_classifier: PreTrainedModel, encoded: dict[str, Encoded]
) -> None:
    """The probe stage here trains the student too (4 epochs) and restores its best: with dev
    labels rigged to the student's predictions after epoch 2, the best epoch of the stage is
    epoch 2 or an earlier one with the same predictions, and stage tune must start from its
    weights, not from the last ones."""

    class Restoring(BothStagesTrainTheStudent):
        restore = True
        probe_stage_epochs = 4

    probe_run = run_two_stage(
        minilm_classifier, encoded, Restoring(FinetuneConfig(), SHAPE, SHAPE), None
    )
    _, _, _, seen = probe_run
    epoch2 = seen["epoch"][1]
    student = student_from_teacher(minilm_classifier, [0])
    student.load_state_dict(epoch2)
    rigged = dataclasses.replace(
        encoded["dev"],
        labels=predict_logits(student, encoded["dev"], 64, PAD, CPU).argmax(-1).tolist(),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "A single label was found")
        _, logs, _, seen = run_two_stage(
            minilm_classifier, encoded, Restoring(FinetuneConfig(), SHAPE, SHAPE), rigged
        )
    assert same(seen["epoch"][1], epoch2)  # the same trajectory up to epoch 2
    accs = [r["dev"]["accuracy"] for r in logs if r["event"] == "epoch"][:4]  # type: ignore[index]
    best = accs.index(1.0)
    assert best <= 1
    assert not same(seen["epoch"][3], seen["epoch"][best])  # the stage went on past it...
    assert same(seen["stage_start"][1], seen["epoch"][best])  # ...and the next started from it
    summary = next(r for r in logs if r["event"] == "stage_end")
    assert summary["restored_best"] is True
    assert summary["best_dev"]["accuracy"] == 1.0  # type: ignore[index]


def test_eval_every_steps_adds_evaluations_inside_epochs(
    minilm_classifier: PreTrainedModel, encoded: dict[str, Encoded]
) -> None:
    logs: list[dict[str, object]] = []
    cfg = TrainingSpec(epochs=2, batch_size=4, eval_every_steps=3, max_seq_length=16, device="cpu")
    method = TwoStage(FinetuneConfig(), SHAPE, SHAPE)
    result = train(
        student_from_teacher(minilm_classifier, [0]),
        None,
        method,
        encoded["train"],
        encoded["dev"],
        cfg,
        PAD,
        CPU,
        TrainHooks(log=logs.append, every=1),
    )
    # 4 steps per epoch; probe stage 8 steps, tune 12: step evaluations at stage steps 3, 6
    # (not at 4 or 8, the epoch ends) and 3, 6, 9 — plus one per epoch end.
    at = [(h["stage"], h["stage_step"], h["at"]) for h in result.history]
    assert at == [
        ("probe", 3, "step"),
        ("probe", 4, "epoch_end"),
        ("probe", 6, "step"),
        ("probe", 8, "epoch_end"),
        ("tune", 3, "step"),
        ("tune", 4, "epoch_end"),
        ("tune", 6, "step"),
        ("tune", 8, "epoch_end"),
        ("tune", 9, "step"),
        ("tune", 12, "epoch_end"),
    ]
    assert result.best_stage == "tune"
    assert [s["steps"] for s in result.stages] == [8, 12]


def test_a_selection_metric_the_task_lacks_is_an_error(
    minilm_classifier: PreTrainedModel, encoded: dict[str, Encoded]
) -> None:
    cfg = TrainingSpec(batch_size=16, max_seq_length=16, selection_metric="pearson", device="cpu")
    with pytest.raises(ValueError, match=r"training\.selection_metric"):
        train(
            student_from_teacher(minilm_classifier, [0]),
            None,
            TwoStage(FinetuneConfig(), SHAPE, SHAPE),
            encoded["train"],
            encoded["dev"],
            cfg,
            PAD,
            CPU,
        )


def test_a_stage_needs_exactly_one_length() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Stage("x")
    with pytest.raises(ValueError, match="exactly one"):
        Stage("x", epochs=1, steps=1)
    with pytest.raises(ValueError, match="at least 1"):
        Stage("x", steps=0)


def test_spec_error_names_the_field() -> None:
    e = SpecError("method.layer_mapping", "teacher layer 9 is out of range")
    assert (e.field, e.reason) == ("method.layer_mapping", "teacher layer 9 is out of range")
    assert str(e) == "method.layer_mapping: teacher layer 9 is out of range"
    assert isinstance(e, ValueError)


def test_methods_see_the_transfer_set_and_each_batch_s_example_ids(
    minilm_classifier: PreTrainedModel, encoded: dict[str, Encoded]
) -> None:
    """prepare() once with the transfer set, start_batch() with every micro-batch: over an
    epoch, the example ids are each training example's id exactly once."""

    class Watching(TwoStage):
        def prepare(self, train_data: Encoded) -> None:
            self.prepared = list(train_data.ids)

        def start_batch(self, batch: dict[str, torch.Tensor]) -> None:
            self.seen = [*getattr(self, "seen", []), batch["example_ids"].tolist()]

    method = Watching(FinetuneConfig(), SHAPE, SHAPE)
    cfg = TrainingSpec(batch_size=4, max_seq_length=16, device="cpu")
    train(
        student_from_teacher(minilm_classifier, [0]),
        None,
        method,
        encoded["train"],
        encoded["dev"],
        cfg,
        PAD,
        CPU,
    )
    assert method.prepared == list(encoded["train"].ids)
    per_epoch = len(encoded["train"]) // 4
    first_epoch = sorted(i for batch in method.seen[:per_epoch] for i in batch)
    assert first_epoch == sorted(encoded["train"].ids)
    assert len(method.seen) == per_epoch * (2 + 3)  # both stages' epochs
