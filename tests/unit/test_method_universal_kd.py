"""universal_kd: the output-space loss by hand, attention weights, invariants, pooling, the fit
checks, the two stages (teacher probes fitted and then frozen), and real training with BiLSTM,
CNN and transformer students (MiniLM-L6 teacher)."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_engine import registry
from kd_engine.data import TransferSet
from kd_engine.data.batching import collate, encode
from kd_engine.errors import SpecError
from kd_engine.evaluation import model_inputs
from kd_engine.losses.universal_kd import ukd_attention_weights, ukd_loss
from kd_engine.methods.base import StepOutputs
from kd_engine.methods.universal_kd import UniversalKD, UniversalKDConfig, pool_layer
from kd_engine.models.shapes import ModelShape, shape_from_config
from kd_engine.models.student import student_from_teacher
from kd_engine.models.text_students import bilstm_student, cnn_student
from kd_engine.spec import TrainingSpec
from kd_engine.stages import Stage
from kd_engine.trainer import TrainHooks, train

CPU = torch.device("cpu")


def softmax(xs: list[float]) -> list[float]:
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


def dot(a: list[float], b: list[float]) -> float:
    return sum(x * y for x, y in zip(a, b, strict=True))


# --- the loss -------------------------------------------------------------------------------


def test_attention_weights_by_hand_and_rows_sum_to_one() -> None:
    # One student layer z_S = (1, 0); teacher layers (0, 1) and (2, 0): scores 0 and 2.
    student = torch.tensor([[[1.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 1.0], [2.0, 0.0]]])
    weights = ukd_attention_weights(student, teacher)
    e2 = math.exp(2.0)
    assert weights.shape == (1, 1, 2)
    assert weights[0, 0].tolist() == pytest.approx([1 / (1 + e2), e2 / (1 + e2)])
    g = torch.Generator().manual_seed(0)
    weights = ukd_attention_weights(
        torch.randn(3, 2, 4, generator=g), torch.randn(3, 5, 4, generator=g) * 3
    )
    assert weights.shape == (3, 2, 5)
    assert (weights >= 0).all()
    assert torch.allclose(weights.sum(dim=-1), torch.ones(3, 2))


def test_ukd_loss_fusing_logits_by_hand() -> None:
    student = torch.tensor([[[1.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 1.0], [2.0, 0.0]]])
    e2 = math.exp(2.0)
    a1, a2 = 1 / (1 + e2), e2 / (1 + e2)
    fused = [a1 * 0.0 + a2 * 2.0, a1 * 1.0 + a2 * 0.0]
    expected = kl(softmax(fused), softmax([1.0, 0.0]))
    assert float(ukd_loss(student, teacher)) == pytest.approx(expected, rel=1e-6)
    # tau = 2: both distributions at logits / 2, times tau^2 (the weights do not change).
    expected_t2 = 4 * kl(softmax([x / 2 for x in fused]), softmax([0.5, 0.0]))
    assert float(ukd_loss(student, teacher, temperature=2.0)) == pytest.approx(expected_t2)


def test_ukd_loss_fusing_losses_by_hand() -> None:
    student = torch.tensor([[[1.0, 0.0]]])
    teacher = torch.tensor([[[0.0, 1.0], [2.0, 0.0]]])
    e2 = math.exp(2.0)
    a1, a2 = 1 / (1 + e2), e2 / (1 + e2)
    p_s = softmax([1.0, 0.0])
    expected = a1 * kl(softmax([0.0, 1.0]), p_s) + a2 * kl(softmax([2.0, 0.0]), p_s)
    assert float(ukd_loss(student, teacher, attend="loss")) == pytest.approx(expected, rel=1e-6)


def test_ukd_loss_sums_student_layers_and_averages_the_batch() -> None:
    z_s = [
        [[1.0, 0.0, -1.0], [0.5, 0.5, 0.0]],  # example 0: student layers 0 and 1
        [[0.0, 2.0, 0.0], [-1.0, 0.0, 1.0]],  # example 1
    ]
    z_t = [
        [[0.2, 0.1, 0.0], [1.0, -1.0, 0.5], [0.0, 0.0, 2.0]],  # example 0: 3 teacher layers
        [[1.0, 1.0, 0.0], [0.0, 0.3, -0.3], [2.0, 0.0, 0.0]],
    ]
    total = 0.0
    for b in range(2):
        for s in z_s[b]:
            alpha = softmax([dot(s, t) for t in z_t[b]])
            fused = [sum(alpha[k] * z_t[b][k][c] for k in range(3)) for c in range(3)]
            total += kl(softmax(fused), softmax(s))
    loss = ukd_loss(torch.tensor(z_s), torch.tensor(z_t))
    assert float(loss) == pytest.approx(total / 2, rel=1e-6)


def test_identical_outputs_give_zero_and_the_teacher_gets_no_gradient() -> None:
    z = torch.tensor([[[0.3, -1.2, 2.0]], [[1.0, 0.0, 0.5]]])  # (B=2, 1 layer, C=3)
    student = z.clone().requires_grad_(True)
    teacher = z.clone().requires_grad_(True)
    for attend in ("logits", "loss"):
        loss = ukd_loss(student, teacher, attend=attend)  # type: ignore[arg-type]
        assert float(loss.detach()) == pytest.approx(0.0, abs=1e-7)
    # Several teacher layers equal to the student's: whatever the weights, the target is z_S.
    assert float(ukd_loss(student, teacher.detach().repeat(1, 4, 1)).detach()) == pytest.approx(
        0.0, abs=1e-6
    )
    loss = ukd_loss(student, teacher + torch.tensor([1.0, 0.0, 0.0]))
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


def test_ukd_loss_rejects_bad_inputs() -> None:
    good = torch.zeros(2, 1, 3)
    with pytest.raises(ValueError, match="batch size or number of classes"):
        ukd_loss(good, torch.zeros(2, 2, 4))
    with pytest.raises(ValueError, match=r"\(B, layers, C\)"):
        ukd_loss(torch.zeros(2, 3), good)
    with pytest.raises(ValueError, match="temperature"):
        ukd_loss(good, good, temperature=0.0)
    with pytest.raises(ValueError, match="attend"):
        ukd_loss(good, good, attend="both")  # type: ignore[arg-type]


# --- pooling, config, checks, building -----------------------------------------------------


def test_pool_layer_by_hand() -> None:
    hidden = torch.tensor(
        [[[1.0, -2.0], [3.0, 0.0], [9.0, 9.0]], [[-1.0, -1.0], [5.0, 5.0], [7.0, -3.0]]]
    )
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert pool_layer(hidden, mask, "cls").tolist() == [[1.0, -2.0], [-1.0, -1.0]]
    mean = pool_layer(hidden, mask, "mean")
    assert torch.allclose(mean, torch.tensor([[2.0, -1.0], [11 / 3, 1 / 3]]))
    assert pool_layer(hidden, mask, "max").tolist() == [[3.0, 0.0], [7.0, 5.0]]
    with pytest.raises(ValueError, match="does not fit"):
        pool_layer(hidden, mask[:, :2], "max")


def build(teacher: ModelShape, student: ModelShape, **settings: object) -> UniversalKD:
    config = UniversalKDConfig.model_validate(settings)
    method = registry.build(config, teacher, student, TrainingSpec())
    assert isinstance(method, UniversalKD)
    return method


def spec_error(teacher: ModelShape, student: ModelShape, **settings: object) -> SpecError:
    with pytest.raises(SpecError) as info:
        registry.check(UniversalKDConfig.model_validate(settings), teacher, student, TrainingSpec())
    return info.value


def test_defaults_and_config_bounds() -> None:
    c = UniversalKDConfig()
    assert (c.ce_weight, c.kd_weight, c.ukd_weight) == (0.1, 0.2, 0.7)
    assert (c.temperature, c.ukd_temperature, c.attend, c.pooling) == (1.0, 1.0, "logits", "auto")
    assert (c.probe_epochs, c.probe_steps, c.probe_learning_rate) == (1, None, 1e-2)
    assert c.student_probe_learning_rate == 1e-2 and c.teacher_layers is None
    assert UniversalKDConfig(teacher_layers=[4, 1]).teacher_layers == [1, 4]
    for bad in (
        {"teacher_layers": [-1]},
        {"teacher_layers": [2, 2]},
        {"ukd_weight": -1.0},
        {"probe_epochs": 0},
        {"probe_steps": 0},
        {"probe_learning_rate": 0.0},
        {"student_probe_learning_rate": 0.0},
        {"teacher_probe_steps": 10},  # replaced by the probe stage
    ):
        with pytest.raises(ValidationError):
            UniversalKDConfig.model_validate(bad)
    assert UniversalKD.needs.hidden_states and UniversalKD.any_student_architecture
    assert not UniversalKD.needs.attentions


def test_building_makes_one_zero_probe_per_layer_in_two_groups() -> None:
    method = build(
        ModelShape(6, 384, 3, 12),
        ModelShape(2, 600, 3, transformer=False),
        teacher_layers=[1, 3, 5],
        student_probe_learning_rate=2e-3,
    )
    teacher_group, student_group = method.param_groups()
    assert (teacher_group.name, teacher_group.learning_rate) == ("teacher_probes", None)
    assert (student_group.name, student_group.learning_rate) == ("student_probes", 2e-3)
    assert teacher_group.weight_decay == student_group.weight_decay == 0.0
    (teacher_probes,) = teacher_group.modules
    (student_probes,) = student_group.modules
    assert [tuple(p.weight.shape) for p in teacher_probes] == [(3, 384)] * 3  # type: ignore[union-attr]
    assert [tuple(p.weight.shape) for p in student_probes] == [(3, 600)] * 2  # type: ignore[union-attr]
    for module in (teacher_probes, student_probes):
        assert all(float(p.detach().abs().sum()) == 0.0 for p in module.parameters())


def test_checks_name_the_field() -> None:
    teacher, lstm = ModelShape(6, 384, 2, 12), ModelShape(1, 300, 2, transformer=False)
    err = spec_error(teacher, lstm, teacher_layers=[0, 6])
    assert err.field == "method.teacher_layers"
    assert err.reason.startswith("teacher layer 6 is out of range (the teacher has 6 layers")
    assert spec_error(teacher, ModelShape(0, 8, 2)).field == "student.num_layers"
    assert spec_error(ModelShape(0, 8, 2), lstm).field == "teacher"
    err = spec_error(teacher, ModelShape(1, 8, 3))
    assert err.field == "student" and "3 outputs" in err.reason
    # A regression task (one output): a softmax over one logit is constant.
    err = spec_error(ModelShape(6, 384, 1, 12), ModelShape(2, 384, 1, 12))
    assert err.field == "method.name" and "regression" in err.reason


def test_stages_fit_the_teacher_probes_first_then_distil() -> None:
    method = build(ModelShape(6, 384, 2, 12), ModelShape(2, 384, 2, 12), probe_learning_rate=3e-3)
    probes, distil = method.stages(TrainingSpec(epochs=4))
    assert (probes.loss, probes.epochs, probes.steps, probes.learning_rate) == (
        "probes",
        1,
        None,
        3e-3,
    )
    assert (probes.trains, probes.warmup_ratio, probes.selects_best) == (
        ("teacher_probes",),
        0.0,
        False,
    )
    assert not probes.evaluates
    assert (distil.loss, distil.epochs, distil.learning_rate, distil.warmup_ratio) == (
        "distil",
        4,
        None,
        None,
    )
    assert distil.trains == ("student", "student_probes") and distil.selects_best
    (probes,) = build(ModelShape(2, 8, 2), ModelShape(1, 8, 2), probe_steps=7).stages(
        TrainingSpec()
    )[:1]
    assert (probes.steps, probes.epochs) == (7, None)
    with pytest.raises(ValueError, match="no stage loss 'x'"):
        method.begin_stage(Stage("x", loss="x", epochs=1))


# --- the method's losses --------------------------------------------------------------------

TEACHER = ModelShape(num_layers=3, hidden_size=6, num_labels=2, num_heads=2)
STUDENT = ModelShape(num_layers=2, hidden_size=4, num_labels=2, transformer=False)
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
LABELS = torch.tensor([0, 1])


def outputs(shape: ModelShape, seed: int, grad: bool) -> StepOutputs:
    g = torch.Generator().manual_seed(seed)
    hidden = tuple(
        torch.randn(2, 4, shape.hidden_size, generator=g).requires_grad_(grad)
        for _ in range(shape.num_layers + 1)
    )
    return StepOutputs(torch.randn(2, 2, generator=g).requires_grad_(grad), hidden)


def built(stage: str | None = None, **settings: object) -> UniversalKD:
    method = build(TEACHER, STUDENT, **settings)
    g = torch.Generator().manual_seed(7)
    for p in [*method.teacher_probes.parameters(), *method.student_probes.parameters()]:
        p.data = torch.randn(p.shape, generator=g)  # probes that already say something
    if stage is not None:
        (stage_obj,) = [s for s in method.stages(TrainingSpec()) if s.loss == stage]
        method.begin_stage(stage_obj)
    return method


def test_loss_needs_the_teacher_and_the_built_layer_counts() -> None:
    student, teacher = outputs(STUDENT, 0, False), outputs(TEACHER, 1, False)
    for stage in ("probes", "distil"):
        method = built(stage)
        with pytest.raises(ValueError, match="teacher"):
            method.loss(student, None, LABELS, MASK)
        with pytest.raises(ValueError, match="hidden states"):
            method.loss(student, StepOutputs(teacher.logits), LABELS, MASK)
        with pytest.raises(ValueError, match="built for a teacher with 3 layers but got 2"):
            method.loss(student, outputs(STUDENT, 1, False), LABELS, MASK)
        wide = StepOutputs(teacher.logits, tuple(torch.zeros(2, 4, 5) for _ in range(4)))
        with pytest.raises(ValueError, match="do not fit the built shapes"):
            method.loss(student, wide, LABELS, MASK)
    with pytest.raises(ValueError, match="student's hidden states"):
        built("distil").loss(StepOutputs(student.logits), teacher, LABELS, MASK)


def test_probe_stage_loss_trains_only_the_teacher_probes_by_hand() -> None:
    method = built("probes")
    student, teacher = outputs(STUDENT, 0, True), outputs(TEACHER, 1, True)
    res = method.loss(student, teacher, LABELS, MASK)
    assert set(res.parts) == {"probe_ce", "probe_acc"}
    # By hand: mean over the 3 teacher layers of CE of the probe on the layer's mean over real
    # tokens (pooling "auto" is the masked mean for a transformer).
    expected_ce, correct = 0.0, 0
    weights = MASK.float().unsqueeze(-1)
    for k, probe in enumerate(method.teacher_probes):
        h = teacher.hidden_states[k + 1].detach()  # type: ignore[index]
        z = probe((h * weights).sum(1) / weights.sum(1)).detach()
        for b in range(2):
            row = z[b].tolist()
            expected_ce -= math.log(softmax(row)[int(LABELS[b])]) / 2
            correct += int(max(range(2), key=lambda c: row[c]) == int(LABELS[b]))
    assert float(res.total.detach()) == pytest.approx(expected_ce / 3, rel=1e-6)
    assert res.parts["probe_ce"] == pytest.approx(expected_ce / 3, rel=1e-6)
    assert res.parts["probe_acc"] == pytest.approx(correct / 6)
    res.total.backward()
    assert all(p.grad is not None for p in method.teacher_probes.parameters())
    assert all(p.grad is None for p in method.student_probes.parameters())
    assert all(h.grad is None for h in [*teacher.hidden_states, *student.hidden_states])  # type: ignore[misc]
    assert student.logits.grad is None and teacher.logits.grad is None


def test_distil_stage_loss_by_parts_and_the_teacher_probes_get_no_gradient() -> None:
    method = built("distil")
    student, teacher = outputs(STUDENT, 0, True), outputs(TEACHER, 1, True)
    res = method.loss(student, teacher, LABELS, MASK)
    assert set(res.parts) == {"ce", "kd", "ukd"}
    assert res.parts["ukd"] > 0
    c = method.config
    expected = c.ce_weight * float(res.parts["ce"]) + c.kd_weight * float(res.parts["kd"])
    expected += c.ukd_weight * float(res.parts["ukd"])
    assert float(res.total.detach()) == pytest.approx(expected, rel=1e-6)
    # L_UKD from the pseudo logits, recomputed with the loss module.
    with torch.no_grad():
        z_s = method.student_pseudo_logits(student, MASK)
        z_t = method.teacher_pseudo_logits(teacher, MASK)
    assert res.parts["ukd"] == pytest.approx(float(ukd_loss(z_s, z_t)), rel=1e-6)
    res.total.backward()
    assert all(p.grad is None for p in method.teacher_probes.parameters())
    assert all(p.grad is not None for p in method.student_probes.parameters())
    assert all(h.grad is None for h in teacher.hidden_states)  # type: ignore[union-attr]
    # Intermediate student states learn through L_UKD.
    assert all(h.grad is not None for h in student.hidden_states[1:])  # type: ignore[index]


def test_a_copy_of_a_one_layer_teacher_gives_zero_ukd() -> None:
    # With one teacher layer the attention is 1 and, with identical states and probes, the
    # student's pseudo distribution is the teacher's. (With several teacher layers the fused
    # target mixes layers, so even an identical student does not get zero, as in ALP-KD.)
    shape = ModelShape(1, 6, 2, 2)
    method = build(shape, shape)
    torch.nn.init.normal_(method.teacher_probes[0].weight)  # type: ignore[arg-type]
    method.student_probes.load_state_dict(method.teacher_probes.state_dict())
    same = outputs(shape, 3, False)
    res = method.loss(same, same, LABELS, MASK)
    assert res.parts["ukd"] == pytest.approx(0.0, abs=1e-7)
    assert res.parts["kd"] == pytest.approx(0.0, abs=1e-7)


# --- real training --------------------------------------------------------------------------


def test_training_steps_lower_the_loss_for_bilstm_and_cnn_students(
    minilm_classifier: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rotten_tomatoes: TransferSet,
) -> None:
    enc = encode(rotten_tomatoes.train[:8], tokenizer, 32)
    inputs = collate(enc, list(range(8)), int(tokenizer.pad_token_id or 0))
    mask, labels = inputs["attention_mask"], inputs["labels"]
    with torch.inference_mode():  # as the trainer runs the teacher
        out = minilm_classifier(**model_inputs(inputs, CPU), output_hidden_states=True)
        teacher = StepOutputs(out.logits, out.hidden_states)
    teacher_shape = shape_from_config(minilm_classifier.config.to_dict(), 2)
    weights = minilm_classifier.get_input_embeddings().weight
    assert isinstance(weights, torch.Tensor)
    torch.manual_seed(0)
    students = [
        bilstm_student(weights, ["rotten", "fresh"], hidden_size=8, num_layers=2),
        cnn_student(weights, ["rotten", "fresh"], kernel_sizes=[2, 3], num_filters=4),
    ]
    for model in students:
        method = build(teacher_shape, shape_from_config(model.config.to_dict(), 2))
        (distil,) = [s for s in method.stages(TrainingSpec()) if s.loss == "distil"]
        method.begin_stage(distil)
        model.train()
        model.get_input_embeddings().requires_grad_(False)  # keeps the test fast
        params = [p for m in [model, method.student_probes] for p in m.parameters()]
        optimizer = torch.optim.Adam([p for p in params if p.requires_grad], lr=1e-2)
        losses, ukd = [], []
        for step in range(8):
            method.start_step(1, step)
            s = model(**model_inputs(inputs, CPU), output_hidden_states=True)
            res = method.loss(StepOutputs(s.logits, s.hidden_states), teacher, labels, mask)
            optimizer.zero_grad()
            res.total.backward()
            optimizer.step()
            losses.append(float(res.total.detach()))
            ukd.append(res.parts["ukd"])
        name = type(model).__name__
        assert losses[-1] < losses[0], (name, losses)
        assert all(math.isfinite(u) and u >= 0 for u in ukd), (name, ukd)


def test_trainer_fits_the_teacher_probes_then_freezes_them(
    minilm_classifier: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rotten_tomatoes: TransferSet,
) -> None:
    # The issue: zero-initialised teacher probes trained at the student's LR under its warm-up
    # were near-uniform when L_UKD switched on. Now stage 1 fits them (default LR 1e-2), and
    # stage 2 leaves them alone while the student and its probes learn. Mean pooling: this
    # teacher (all-MiniLM-L6-v2, trained with mean pooling, head not fine-tuned) has [CLS]
    # states in layers 0-4 that hardly vary across examples, so no probe can fit them.
    n_train = 32
    train_enc = encode(rotten_tomatoes.train[:n_train], tokenizer, 32)
    dev_enc = encode(rotten_tomatoes.dev[:16], tokenizer, 32)
    cfg = TrainingSpec(
        epochs=1, batch_size=8, max_seq_length=32, learning_rate=1e-4, seed=3, device="cpu"
    )
    teacher_shape = shape_from_config(minilm_classifier.config.to_dict(), 2)
    torch.manual_seed(0)
    student = student_from_teacher(minilm_classifier, [0, 5])
    student_shape = shape_from_config(student.config.to_dict(), 2)
    method = build(teacher_shape, student_shape, probe_epochs=6, pooling="mean")
    teacher_before = {k: v.clone() for k, v in minilm_classifier.state_dict().items()}
    after_stage_1: dict[str, dict[str, torch.Tensor]] = {}

    def log(record: dict[str, object]) -> None:
        if record.get("event") == "stage_end" and record["index"] == 1:
            for name, module in [
                ("teacher", method.teacher_probes),
                ("student", method.student_probes),
            ]:
                after_stage_1[name] = {k: v.clone() for k, v in module.state_dict().items()}

    result = train(
        student, minilm_classifier, method, train_enc, dev_enc, cfg, 0, CPU, TrainHooks(log=log)
    )
    assert [s["name"] for s in result.stages] == [
        "universal_kd teacher probes",
        "universal_kd distil",
    ]
    assert result.stages[0]["steps"] == 6 * 4 and result.stages[0]["learning_rate"] == 1e-2
    assert result.best_stage == "universal_kd distil"
    assert all(r["stage"] == "universal_kd distil" for r in result.history)  # no stage-1 evals
    # Stage 1 trained the teacher probes only.
    fitted = after_stage_1["teacher"]
    assert all(float(v.abs().sum()) > 0 for v in fitted.values())
    assert all(float(v.abs().sum()) == 0 for v in after_stage_1["student"].values())
    # Stage 2 did not change them (weights compared) but trained the student's probes.
    final = method.teacher_probes.state_dict()
    assert all(torch.equal(fitted[k], final[k]) for k in fitted)
    assert all(float(v.abs().sum()) > 0 for v in method.student_probes.state_dict().values())
    assert all(torch.equal(v, minilm_classifier.state_dict()[k]) for k, v in teacher_before.items())
    # The fitted probes' accuracy on the training examples is clearly above chance (0.5).
    inputs = collate(train_enc, list(range(n_train)), 0)
    with torch.inference_mode():
        out = minilm_classifier(**model_inputs(inputs, CPU), output_hidden_states=True)
    z_t = method.teacher_pseudo_logits(
        StepOutputs(out.logits, out.hidden_states), inputs["attention_mask"]
    )
    accuracy = (z_t.argmax(dim=-1) == inputs["labels"].unsqueeze(1)).float().mean(dim=0)
    assert accuracy.shape == (6,)
    assert float(accuracy.mean()) >= 0.8, accuracy.tolist()
    assert float(accuracy.min()) >= 0.65, accuracy.tolist()
