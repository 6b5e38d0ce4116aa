"""CRD: L_CRD by hand, its invariants (aligned < shuffled, one-example batch), the head's
projections and the method's weighted loss."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from kd_engine.errors import SpecError
from kd_engine.losses.crd import crd_loss
from kd_engine.methods.base import StepOutputs
from kd_engine.methods.crd import CRD, CRDConfig, CRDHead
from kd_engine.models.shapes import ModelShape
from kd_engine.registry import build
from kd_engine.spec import TrainingSpec


def shape(layers: int, hidden: int = 4) -> ModelShape:
    return ModelShape(num_layers=layers, hidden_size=hidden, num_labels=2, num_heads=2)


def test_crd_loss_by_hand() -> None:
    # Teacher (1, 0), (0, 1); student (2, 0), (1, 1): cosines t0.s0 = 1, t0.s1 = 1/sqrt 2,
    # t1.s0 = 0, t1.s1 = 1/sqrt 2.
    tau = 2.0
    r = 1 / math.sqrt(2)
    row0 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(r / tau)))
    row1 = -math.log(math.exp(r / tau) / (math.exp(0 / tau) + math.exp(r / tau)))
    teacher = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    student = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    got = crd_loss(student, teacher, tau)
    assert float(got) == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_crd_loss_is_lower_when_aligned_than_shuffled() -> None:
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(8, 16, generator=g)
    student = teacher + 0.1 * torch.randn(8, 16, generator=g)
    shuffled = student[torch.tensor([1, 2, 3, 4, 5, 6, 7, 0])]
    aligned_loss = float(crd_loss(student, teacher, 2.0))
    assert aligned_loss < float(crd_loss(shuffled, teacher, 2.0))
    # Lower bound for perfect alignment of orthogonal vectors: -log(e^{1/tau} / (e^{1/tau} + 7)).
    eye = torch.eye(8)
    best = -math.log(math.exp(0.5) / (math.exp(0.5) + 7))
    assert float(crd_loss(eye, eye, 2.0)) == pytest.approx(best, rel=1e-6)


def test_crd_loss_single_example_is_zero_and_checks_inputs() -> None:
    x = torch.tensor([[1.0, 2.0]])
    assert float(crd_loss(x, -x, 2.0)) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="must both be"):
        crd_loss(torch.zeros(2, 3), torch.zeros(3, 3), 2.0)
    with pytest.raises(ValueError, match="temperature"):
        crd_loss(torch.ones(2, 3), torch.ones(2, 3), 0.0)


def test_crd_loss_gradient_reaches_both_sides() -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.randn(4, 3, generator=g, requires_grad=True)
    t = torch.randn(4, 3, generator=g, requires_grad=True)
    crd_loss(s, t, 2.0).backward()
    assert s.grad is not None and t.grad is not None
    assert float(s.grad.abs().sum()) > 0 and float(t.grad.abs().sum()) > 0


def cls_outputs(cls: torch.Tensor, logits: torch.Tensor) -> StepOutputs:
    """Outputs whose layer l has [CLS] state cls[:, l] (B, L, d); other tokens are noise."""
    batch, layers, width = cls.shape
    hidden = [torch.full((batch, 3, width), 9.0)]
    for l_ in range(layers):
        h = torch.full((batch, 3, width), -4.0)
        h[:, 0] = cls[:, l_]
        hidden.append(h)
    return StepOutputs(logits, tuple(hidden))


def test_head_concatenates_cls_states_and_projects() -> None:
    head = CRDHead(shape(3, hidden=2), shape(2, hidden=2), projection_size=4)
    assert tuple(head.teacher.weight.shape) == (4, 6) and head.teacher.bias is None
    assert tuple(head.student.weight.shape) == (4, 4) and head.student.bias is None
    g = torch.Generator().manual_seed(2)
    t_cls, s_cls = torch.randn(5, 3, 2, generator=g), torch.randn(5, 2, 2, generator=g)
    got = head(cls_outputs(s_cls, torch.zeros(5, 2)), cls_outputs(t_cls, torch.zeros(5, 2)), 2.0)
    # By hand from the definition: concatenate layers, project, L_CRD.
    with torch.no_grad():
        t = t_cls.reshape(5, 6) @ head.teacher.weight.T
        s = s_cls.reshape(5, 4) @ head.student.weight.T
    total = 0.0
    for k in range(5):
        cos = [float(torch.cosine_similarity(t[k], s[j], dim=0)) for j in range(5)]
        total += -math.log(math.exp(cos[k] / 2) / sum(math.exp(c / 2) for c in cos))
    assert float(got.detach()) == pytest.approx(total / 5, rel=1e-5)
    with pytest.raises(ValueError, match="built for 2 student and 3 teacher"):
        head(cls_outputs(s_cls, torch.zeros(5, 2)), cls_outputs(s_cls, torch.zeros(5, 2)), 2.0)


def test_method_weights_parts_and_trains_both_projections() -> None:
    config = CRDConfig(ce_weight=0.5, kd_weight=0.25, crd_weight=2.0, projection_size=8)
    method = build(config, shape(3, hidden=6), shape(2, hidden=4), TrainingSpec())
    assert isinstance(method, CRD)
    (group,) = method.param_groups()
    assert group.name == "crd_head" and group.weight_decay == 0.0
    (head,) = group.modules
    g = torch.Generator().manual_seed(3)
    student = cls_outputs(torch.randn(4, 2, 4, generator=g), torch.randn(4, 3, generator=g))
    teacher = cls_outputs(torch.randn(4, 3, 6, generator=g), torch.randn(4, 3, generator=g))
    res = method.loss(student, teacher, torch.tensor([0, 1, 2, 1]), torch.ones(4, 3))
    expected = (
        0.5 * float(res.parts["ce"]) + 0.25 * float(res.parts["kd"]) + 2.0 * float(res.parts["crd"])
    )
    assert float(res.total.detach()) == pytest.approx(expected, rel=1e-6)
    res.total.backward()
    for p in head.parameters():
        assert p.grad is not None and float(p.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="teacher's outputs"):
        method.loss(student, None, torch.tensor([0, 1, 2, 1]), torch.ones(4, 3))


def test_check_rejects_a_non_transformer_student() -> None:
    lstm = ModelShape(num_layers=1, hidden_size=4, num_labels=2, transformer=False)
    with pytest.raises(SpecError) as err:
        CRD.check(CRDConfig(), shape(6), lstm, TrainingSpec())
    assert err.value.field == "student"
    with pytest.raises(SpecError) as err:
        build(CRDConfig(), shape(6), lstm, TrainingSpec())
    assert err.value.field == "student"


def test_config_defaults_and_bounds() -> None:
    c = CRDConfig()
    assert (c.name, c.projection_size, c.crd_temperature, c.temperature) == ("crd", 128, 2.0, 1.0)
    assert c.ce_weight == c.kd_weight == c.crd_weight == pytest.approx(1 / 3)
    with pytest.raises(ValidationError):
        CRDConfig(crd_temperature=0.0)
    with pytest.raises(ValidationError):
        CRDConfig(crd_weight=-0.1)
    with pytest.raises(ValidationError):
        CRDConfig(projection_size=0)
