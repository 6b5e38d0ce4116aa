"""ALP-KD: the attention-based layer projection loss by hand, its invariants, the variants'
buckets, the fit checks (SpecError fields) and the method's weighted loss."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from kd_engine.errors import SpecError
from kd_engine.losses.alp import alp_attention_weights, alp_loss
from kd_engine.methods.alp_kd import ALPKD, ALPKDConfig, alp_buckets
from kd_engine.methods.base import StepOutputs
from kd_engine.models.shapes import ModelShape
from kd_engine.registry import build
from kd_engine.spec import TrainingSpec


def shape(layers: int, hidden: int = 4) -> ModelShape:
    return ModelShape(num_layers=layers, hidden_size=hidden, num_labels=2, num_heads=2)


def built(config: ALPKDConfig, teacher: ModelShape, student: ModelShape) -> ALPKD:
    """The method as the worker builds it: checked, then constructed."""
    method = build(config, teacher, student, TrainingSpec())
    assert isinstance(method, ALPKD)
    return method


def spec_error(config: ALPKDConfig, teacher: ModelShape, student: ModelShape) -> SpecError:
    """The SpecError of the pure check; build raises the same."""
    with pytest.raises(SpecError) as checked:
        ALPKD.check(config, teacher, student, TrainingSpec())
    with pytest.raises(SpecError) as building:
        build(config, teacher, student, TrainingSpec())
    assert str(building.value) == str(checked.value)
    return checked.value


def test_alp_loss_one_student_layer_by_hand() -> None:
    # h_S = (1, 0); teacher layers (1, 0) and (0, 2): scores 1 and 0.
    a1, a2 = math.e / (math.e + 1), 1 / (math.e + 1)
    fused = (a1 * 1 + a2 * 0, a1 * 0 + a2 * 2)
    expected = ((1 - fused[0]) ** 2 + (0 - fused[1]) ** 2) / 2  # mean over d = 2
    student = torch.tensor([[[1.0, 0.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    weights = alp_attention_weights(student, teacher)
    assert weights[0, 0].tolist() == pytest.approx([a1, a2], rel=1e-6)
    assert float(alp_loss(student, teacher)) == pytest.approx(expected, rel=1e-6)


def test_alp_loss_sums_layers_and_averages_batch_by_hand() -> None:
    # Two examples, two student layers, three teacher layers, d = 1; A(0) = {0, 1}, A(1) = {2}.
    student = torch.tensor([[[1.0], [2.0]], [[0.5], [-1.0]]])
    teacher = torch.tensor([[[1.0], [-1.0], [3.0]], [[2.0], [0.0], [1.0]]])
    allowed = torch.tensor([[True, True, False], [False, False, True]])
    total = 0.0
    for b in range(2):
        s, t = student[b, :, 0].tolist(), teacher[b, :, 0].tolist()
        # layer 0 over teacher layers 0 and 1
        e = [math.exp(s[0] * t[0]), math.exp(s[0] * t[1])]
        c0 = (e[0] * t[0] + e[1] * t[1]) / sum(e)
        # layer 1 has a single teacher layer: weight 1
        c1 = t[2]
        total += (s[0] - c0) ** 2 + (s[1] - c1) ** 2
    expected = total / 2  # sum over layers of the batch mean (d = 1)
    assert float(alp_loss(student, teacher, allowed)) == pytest.approx(expected, rel=1e-6)


def test_attention_weights_sum_to_one_per_student_layer() -> None:
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 4, 8, generator=g), torch.randn(3, 6, 8, generator=g)
    po = torch.zeros(4, 6, dtype=torch.bool)
    for j, bucket in enumerate(alp_buckets("alp_po", 6, 4, 1)):
        po[j, bucket] = True
    for allowed in (None, po):
        weights = alp_attention_weights(student, teacher, allowed)
        assert weights.shape == (3, 4, 6)
        assert torch.allclose(weights.sum(dim=-1), torch.ones(3, 4))
        assert (weights >= 0).all()


def test_weights_are_zero_outside_the_bucket() -> None:
    method = built(ALPKDConfig(variant="alp_no"), shape(6), shape(2))
    g = torch.Generator().manual_seed(1)
    weights = alp_attention_weights(
        torch.randn(2, 2, 4, generator=g), torch.randn(2, 6, 4, generator=g), method.allowed
    )
    assert torch.all(weights[:, 0, 3:] == 0) and torch.all(weights[:, 1, :3] == 0)
    assert torch.allclose(weights.sum(dim=-1), torch.ones(2, 2))


def test_student_equal_to_its_single_teacher_layer_gives_zero() -> None:
    # alp_no with as many teacher as student layers: A(j) = {j}, so c^j = h_T^j.
    g = torch.Generator().manual_seed(2)
    h = torch.randn(3, 4, 5, generator=g)
    allowed = torch.eye(4, dtype=torch.bool)
    assert float(alp_loss(h, h.clone(), allowed)) == pytest.approx(0.0, abs=1e-7)
    assert alp_buckets("alp_no", 4, 4, 1) == [[0], [1], [2], [3]]


def test_score_scale_divides_the_scores() -> None:
    student = torch.tensor([[[2.0, 0.0]]])
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    w = alp_attention_weights(student, teacher, score_scale=2.0)[0, 0].tolist()
    assert w == pytest.approx([math.e / (math.e + 1), 1 / (math.e + 1)], rel=1e-6)


def test_gradient_reaches_the_student_through_states_and_weights() -> None:
    student = torch.tensor([[[1.0, 0.5]]], requires_grad=True)
    teacher = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    alp_loss(student, teacher).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert float(student.grad.abs().sum()) > 0


def test_alp_loss_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="width"):
        alp_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4))
    with pytest.raises(ValueError, match="allowed"):
        alp_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one"):
        alp_loss(torch.zeros(1, 1, 3), torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.bool))


def test_variant_buckets() -> None:
    assert alp_buckets("alp", 3, 2, 1) == [[0, 1, 2], [0, 1, 2]]
    assert alp_buckets("alp_no", 12, 4, 1) == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    assert alp_buckets("alp_no", 7, 3, 1) == [[0, 1, 2], [3, 4], [5, 6]]
    # CKD's overlap grouping, 6 -> 2 (1-based [1,2,3,4] -> 1, [3,4,5,6] -> 2).
    assert alp_buckets("alp_po", 6, 2, 1) == [[0, 1, 2, 3], [2, 3, 4, 5]]
    assert alp_buckets("alp_po", 12, 4, 1) == [
        [0, 1, 2, 3],
        [2, 3, 4, 5, 6],
        [5, 6, 7, 8, 9],
        [8, 9, 10, 11],
    ]
    assert alp_buckets("alp_po", 12, 4, 2)[1] == [1, 2, 3, 4, 5, 6, 7]


def test_check_rejects_impossible_mappings() -> None:
    err = spec_error(ALPKDConfig(variant="alp_no"), shape(2), shape(4))
    assert err.field == "method.variant"
    assert err.reason.startswith("alp_no") and "teacher has 2 layers" in err.reason
    err = spec_error(ALPKDConfig(variant="alp_no", buckets=[[0, 1], [7]]), shape(6), shape(2))
    assert err.field == "method.buckets"
    assert err.reason.startswith("teacher layer 7 is out of range")
    err = spec_error(ALPKDConfig(variant="alp_po", buckets=[[0, 1]]), shape(6), shape(2))
    assert err.field == "method.buckets"
    assert err.reason.startswith("gives 1 buckets") and "2 layers" in err.reason
    lstm = ModelShape(num_layers=1, hidden_size=4, num_labels=2, transformer=False)
    assert spec_error(ALPKDConfig(), shape(6), lstm).field == "student"


def test_explicit_buckets_replace_the_computed_ones() -> None:
    method = built(ALPKDConfig(variant="alp_no", buckets=[[0, 5], [1]]), shape(6), shape(2))
    assert method.allowed.tolist() == [
        [True, False, False, False, False, True],
        [False, True, False, False, False, False],
    ]


def test_projection_only_when_widths_differ() -> None:
    same = built(ALPKDConfig(), shape(4, hidden=8), shape(2, hidden=8))
    assert same.param_groups() == []
    other = built(ALPKDConfig(), shape(4, hidden=8), shape(2, hidden=6))
    (group,) = other.param_groups()
    assert group.name == "alp_projection" and group.weight_decay == 0.0
    (proj,) = group.modules
    assert isinstance(proj, torch.nn.Linear)
    assert tuple(proj.weight.shape) == (8, 6) and proj.bias is None


def test_score_scale_sets_the_divisor_from_the_teacher_width() -> None:
    plain = built(ALPKDConfig(score_scale="none"), shape(4, hidden=16), shape(2, hidden=8))
    assert plain.score_divisor == 1.0
    scaled = built(ALPKDConfig(score_scale="sqrt_d"), shape(4, hidden=16), shape(2, hidden=8))
    assert scaled.score_divisor == pytest.approx(4.0)


def outputs(logits: list[list[float]], cls: list[list[float]]) -> StepOutputs:
    """Step outputs whose layer l has [CLS] state cls[l] (every example the same), T = 2."""
    batch = len(logits)
    hidden = [torch.zeros(batch, 2, len(cls[0]))]  # embeddings (ignored)
    for vector in cls:
        h = torch.zeros(batch, 2, len(vector))
        h[:, 0] = torch.tensor(vector)
        h[:, 1] = 5.0  # a non-[CLS] token, must be ignored
        hidden.append(h)
    return StepOutputs(torch.tensor(logits), tuple(hidden))


@pytest.mark.parametrize(("score_scale", "divisor"), [("none", 1.0), ("sqrt_d", math.sqrt(2))])
def test_method_loss_weights_its_parts(score_scale: str, divisor: float) -> None:
    config = ALPKDConfig.model_validate(
        {
            "ce_weight": 0.3,
            "kd_weight": 0.5,
            "alp_weight": 2.0,
            "temperature": 2.0,
            "score_scale": score_scale,
        }
    )
    method = built(config, shape(2, hidden=2), shape(1, hidden=2))
    student = outputs([[1.0, 0.0], [0.0, 1.0]], [[1.0, 0.0]])
    teacher = outputs([[2.0, 0.0], [0.0, 0.0]], [[1.0, 0.0], [0.0, 2.0]])
    labels = torch.tensor([0, 1])
    res = method.loss(student, teacher, labels, torch.ones(2, 2, dtype=torch.long))
    # L_ALP is the one-layer case worked out above (same for both examples); the scores 1 and 0
    # are divided by 1 (none) or sqrt(d_t) = sqrt(2) (sqrt_d).
    e = math.exp(1 / divisor)
    a1, a2 = e / (e + 1), 1 / (e + 1)
    alp = ((1 - a1) ** 2 + (2 * a2) ** 2) / 2
    ce = -math.log(math.e / (math.e + 1))  # both examples: logit 1 on the gold class, 0 else
    assert res.parts["alp"] == pytest.approx(alp, rel=1e-6)
    assert res.parts["ce"] == pytest.approx(ce, rel=1e-6)
    expected = (
        0.3 * float(res.parts["ce"]) + 0.5 * float(res.parts["kd"]) + 2.0 * float(res.parts["alp"])
    )
    assert float(res.total.detach()) == pytest.approx(expected, rel=1e-6)


def test_method_trains_the_projection_and_checks_layer_counts() -> None:
    method = built(ALPKDConfig(), shape(3, hidden=4), shape(2, hidden=3))
    g = torch.Generator().manual_seed(3)
    s_hidden = tuple(torch.randn(2, 3, 3, generator=g, requires_grad=True) for _ in range(3))
    t_hidden = tuple(torch.randn(2, 3, 4, generator=g) for _ in range(4))
    student = StepOutputs(torch.randn(2, 2, generator=g), s_hidden)
    teacher = StepOutputs(torch.randn(2, 2, generator=g), t_hidden)
    res = method.loss(student, teacher, torch.tensor([0, 1]), torch.ones(2, 3))
    res.total.backward()
    (weight,) = method.param_groups()[0].parameters()
    assert weight.grad is not None and float(weight.grad.abs().sum()) > 0
    assert s_hidden[1].grad is not None
    with pytest.raises(ValueError, match="built for 2 student and 3 teacher"):
        short = StepOutputs(teacher.logits, t_hidden[:3])
        method.loss(student, short, torch.tensor([0, 1]), torch.ones(2, 3))
    with pytest.raises(ValueError, match="hidden states"):
        method.loss(student, StepOutputs(teacher.logits), torch.tensor([0, 1]), torch.ones(2, 3))
    with pytest.raises(ValueError, match="teacher"):
        method.loss(student, None, torch.tensor([0, 1]), torch.ones(2, 3))


def test_config_defaults_and_bounds() -> None:
    c = ALPKDConfig()
    assert (c.name, c.variant, c.overlap, c.buckets) == ("alp_kd", "alp", 1, None)
    assert (c.ce_weight, c.kd_weight, c.alp_weight, c.temperature) == (0.1, 0.2, 0.7, 1.0)
    assert c.score_scale == "sqrt_d"  # measured: raw dot products give a one-hot attention
    with pytest.raises(ValidationError):
        ALPKDConfig(variant="alp_xx")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ALPKDConfig(alp_weight=-1.0)
    with pytest.raises(ValidationError):
        ALPKDConfig(overlap=0)
    with pytest.raises(ValidationError, match="alp_no and alp_po"):
        ALPKDConfig(buckets=[[0]])
    with pytest.raises(ValidationError, match="at least one"):
        ALPKDConfig(variant="alp_no", buckets=[[0], []])


def test_alp_loss_stays_float32_under_autocast() -> None:
    # Raw dot products of ~100 would be rounded by bf16 and blur the softmax over layers.
    student = torch.tensor([[[10.0, 0.3]]])
    teacher = torch.tensor([[[10.0, 0.0], [10.0, 0.1]]])
    exact = alp_loss(student, teacher)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = alp_loss(student, teacher)
    assert got.dtype == torch.float32
    assert float(got) == pytest.approx(float(exact), rel=1e-6)
