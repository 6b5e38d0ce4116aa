"""universal_kd: the output-space loss by hand, attention weights, invariants, pooling, bind(),
the probe warm-up, and real training steps with BiLSTM and CNN students (MiniLM-L6 teacher)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from pydantic import ValidationError
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_engine import registry
from kd_engine.data import TransferSet
from kd_engine.data.batching import collate, encode
from kd_engine.evaluation import model_inputs
from kd_engine.losses.universal_kd import ukd_attention_weights, ukd_loss
from kd_engine.methods.base import StepOutputs
from kd_engine.methods.universal_kd import UniversalKD, UniversalKDConfig, pool_layer
from kd_engine.models.shapes import ModelShape, shape_from_config
from kd_engine.models.text_students import bilstm_student, cnn_student

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


# --- pooling, config, bind ------------------------------------------------------------------


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


def test_defaults_and_config_bounds() -> None:
    c = UniversalKDConfig()
    assert (c.ce_weight, c.kd_weight, c.ukd_weight) == (0.1, 0.2, 0.7)
    assert (c.temperature, c.ukd_temperature, c.attend, c.pooling) == (1.0, 1.0, "logits", "auto")
    assert c.teacher_probe_steps == 100 and c.teacher_layers is None
    assert UniversalKDConfig(teacher_layers=[4, 1]).teacher_layers == [1, 4]
    for bad in ({"teacher_layers": [-1]}, {"teacher_layers": [2, 2]}, {"ukd_weight": -1.0}):
        with pytest.raises(ValidationError):
            UniversalKDConfig.model_validate(bad)
    method = registry.build(c)
    assert isinstance(method, UniversalKD)
    assert method.needs_hidden_states and method.any_student_architecture
    assert not method.needs_attentions


def test_bind_builds_one_probe_per_layer() -> None:
    method = UniversalKD(UniversalKDConfig(teacher_layers=[1, 3, 5]))
    assert method.extra_modules() == []
    method.bind(ModelShape(6, 384, 3, 12), ModelShape(2, 600, 3, transformer=False))
    teacher_probes, student_probes = method.extra_modules()
    assert [tuple(p.weight.shape) for p in teacher_probes] == [(3, 384)] * 3
    assert [tuple(p.weight.shape) for p in student_probes] == [(3, 600)] * 2
    assert all(float(p.detach().abs().sum()) == 0.0 for p in teacher_probes.parameters())


def test_bind_rejects_a_teacher_layer_the_teacher_lacks() -> None:
    method = UniversalKD(UniversalKDConfig(teacher_layers=[0, 6]))
    with pytest.raises(ValueError) as info:
        method.bind(ModelShape(6, 384, 2, 12), ModelShape(1, 300, 2, transformer=False))
    assert str(info.value).startswith(
        "method.teacher_layers: teacher layer 6 is out of range (the teacher has 6 layers"
    )
    with pytest.raises(ValueError, match=r"^student: "):
        UniversalKD(UniversalKDConfig()).bind(ModelShape(6, 384, 2, 12), ModelShape(0, 8, 2))
    with pytest.raises(ValueError, match=r"^student: .*3 classes"):
        UniversalKD(UniversalKDConfig()).bind(ModelShape(6, 384, 2, 12), ModelShape(1, 8, 3))


# --- the method's loss ----------------------------------------------------------------------

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


def bound(**settings: object) -> UniversalKD:
    method = UniversalKD(UniversalKDConfig.model_validate(settings))
    method.bind(TEACHER, STUDENT)
    g = torch.Generator().manual_seed(7)
    for module in method.extra_modules():  # probes that already say something
        for p in module.parameters():
            p.data = torch.randn(p.shape, generator=g)
    return method


def test_loss_needs_bind_teacher_and_the_bound_layer_counts() -> None:
    student, teacher = outputs(STUDENT, 0, False), outputs(TEACHER, 1, False)
    with pytest.raises(ValueError, match="bind"):
        UniversalKD(UniversalKDConfig()).loss(student, teacher, LABELS, MASK)
    method = bound()
    with pytest.raises(ValueError, match="teacher outputs"):
        method.loss(student, None, LABELS, MASK)
    with pytest.raises(ValueError, match="hidden states"):
        method.loss(StepOutputs(student.logits), teacher, LABELS, MASK)
    with pytest.raises(ValueError, match="bound to a teacher with 3 layers but got 2"):
        method.loss(student, outputs(STUDENT, 1, False), LABELS, MASK)
    wide = StepOutputs(teacher.logits, tuple(torch.zeros(2, 4, 5) for _ in range(4)))
    with pytest.raises(ValueError, match="do not fit the bound shapes"):
        method.loss(student, wide, LABELS, MASK)


def test_ukd_starts_after_the_teacher_probe_steps() -> None:
    method = bound(teacher_probe_steps=2)
    for step, active in [(0, False), (1, False), (2, True), (9, True)]:
        student, teacher = outputs(STUDENT, 0, True), outputs(TEACHER, 1, False)
        for module in method.extra_modules():
            module.zero_grad(set_to_none=True)
        method.start_step(1, step)
        res = method.loss(student, teacher, LABELS, MASK)
        assert set(res.parts) == {"ce", "kd", "ukd", "probe_ce"}
        assert res.parts["ukd"] > 0
        c = method.config
        without = c.ce_weight * res.parts["ce"] + c.kd_weight * res.parts["kd"]
        without += res.parts["probe_ce"]
        expected = without + (c.ukd_weight * res.parts["ukd"] if active else 0.0)
        assert float(res.total.detach()) == pytest.approx(expected, rel=1e-6)
        res.total.backward()
        student_probes = method.extra_modules()[1]
        got_grad = [p.grad is not None for p in student_probes.parameters()]
        assert all(got_grad) if active else not any(got_grad)
        # Intermediate student states learn only through L_UKD.
        assert all((h.grad is not None) == active for h in student.hidden_states[1:])


def test_teacher_probes_learn_only_from_the_labels_and_the_teacher_stays_frozen() -> None:
    method = bound(teacher_probe_steps=0)
    teacher_probes = method.extra_modules()[0]
    student, teacher = outputs(STUDENT, 0, True), outputs(TEACHER, 1, True)
    method.start_step(1, 5)
    method.loss(student, teacher, LABELS, MASK).total.backward()
    assert all(h.grad is None for h in teacher.hidden_states)  # the teacher gets no gradient
    grads = [p.grad.clone() for p in teacher_probes.parameters() if p.grad is not None]
    # The same probes, trained by the cross-entropy of their own predictions alone ([CLS]).
    teacher_probes.zero_grad(set_to_none=True)
    ce = torch.stack(
        [
            F.cross_entropy(probe(teacher.hidden_states[k + 1][:, 0, :].detach()), LABELS)
            for k, probe in enumerate(teacher_probes)
        ]
    ).mean()
    ce.backward()
    expected = [p.grad for p in teacher_probes.parameters()]
    assert len(grads) == len(expected)
    assert all(torch.allclose(a, b) for a, b in zip(grads, expected, strict=True))


def test_a_copy_of_a_one_layer_teacher_gives_zero_ukd() -> None:
    # With one teacher layer the attention is 1 and, with identical states and probes, the
    # student's pseudo distribution is the teacher's. (With several teacher layers the fused
    # target mixes layers, so even an identical student does not get zero, as in ALP-KD.)
    shape = ModelShape(1, 6, 2, 2)
    method = UniversalKD(UniversalKDConfig(teacher_probe_steps=0))
    method.bind(shape, shape)
    teacher_probes, student_probes = method.extra_modules()
    torch.nn.init.normal_(teacher_probes[0].weight)
    student_probes.load_state_dict(teacher_probes.state_dict())
    same = outputs(shape, 3, False)
    res = method.loss(same, same, LABELS, MASK)
    assert res.parts["ukd"] == pytest.approx(0.0, abs=1e-7)
    assert res.parts["kd"] == pytest.approx(0.0, abs=1e-7)


# --- real training steps --------------------------------------------------------------------


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
        method = UniversalKD(UniversalKDConfig(teacher_probe_steps=0))
        method.bind(teacher_shape, shape_from_config(model.config.to_dict(), 2))
        model.train()
        model.get_input_embeddings().requires_grad_(False)  # keeps the test fast
        params = [p for m in [model, *method.extra_modules()] for p in m.parameters()]
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


def test_a_job_too_short_for_the_probe_warm_up_is_warned_about() -> None:
    method = UniversalKD(UniversalKDConfig(teacher_probe_steps=64))
    assert method.schedule_warnings(65) == []
    (warning,) = method.schedule_warnings(64)
    assert warning.startswith("method.teacher_probe_steps is 64 but the job trains for 64")
    assert "never starts" in warning
