"""RAIL-KD: the normalised distance by hand, masked mean pooling, the random layer draws
(sorted, of size m, from the pool, changing, reproducible), the pool and mapping consistency
(both last layers in or both out), the fit checks (SpecError fields) and the method."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from kd_engine import registry
from kd_engine.errors import SpecError
from kd_engine.losses.rail import rail_loss, rail_pair_loss
from kd_engine.methods.base import StepOutputs
from kd_engine.methods.layer_maps import cls_pool, mean_pool
from kd_engine.methods.rail_kd import RAILKD, RAILKDConfig, draw_teacher_layers, rail_layers
from kd_engine.models.shapes import ModelShape
from kd_engine.spec import TrainingSpec


def shape(layers: int, hidden: int = 4) -> ModelShape:
    return ModelShape(num_layers=layers, hidden_size=hidden, num_labels=2, num_heads=2)


def build(teacher: ModelShape, student: ModelShape, **settings: object) -> RAILKD:
    method = registry.build(RAILKDConfig.model_validate(settings), teacher, student, TrainingSpec())
    assert isinstance(method, RAILKD)
    return method


def spec_error(teacher: ModelShape, student: ModelShape, **settings: object) -> SpecError:
    config = RAILKDConfig.model_validate(settings)
    with pytest.raises(SpecError) as info:
        registry.check(config, teacher, student, TrainingSpec())
    with pytest.raises(SpecError):  # the constructor refuses the same, on its own
        RAILKD(config, teacher, student)
    return info.value


def test_pair_loss_by_hand() -> None:
    # (3, 4)/5 = (0.6, 0.8) vs (1, 0): (0.4^2 + 0.8^2) = 0.8;  (0, 2) vs (0, -1): 2^2 = 4.
    student = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    teacher = torch.tensor([[1.0, 0.0], [0.0, -1.0]])
    assert float(rail_pair_loss(student, teacher)) == pytest.approx((0.8 + 4.0) / 2, rel=1e-6)
    # Scale does not matter, only direction.
    assert float(rail_pair_loss(student * 7, teacher * 0.1)) == pytest.approx(2.4, rel=1e-6)


def test_rail_loss_sums_the_layers() -> None:
    s1, t1 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])  # orthogonal: 2
    s2, t2 = torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 0.0]])  # 45 degrees
    cos45 = 1 / math.sqrt(2)
    expected = 2.0 + (2 - 2 * cos45)
    assert float(rail_loss([s1, s2], [t1, t2])) == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="same positive number"):
        rail_loss([s1], [t1, t2])
    with pytest.raises(ValueError, match="must both be"):
        rail_pair_loss(torch.zeros(2, 3), torch.zeros(2, 4))


def test_rail_pair_loss_is_zero_for_parallel_vectors() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 8, generator=g)
    assert float(rail_pair_loss(x, 3 * x)) == pytest.approx(0.0, abs=1e-6)


def test_masked_mean_and_cls_pooling_by_hand() -> None:
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[1, 1, 0]])
    assert mean_pool(hidden, mask).tolist() == [[2.0, 3.0]]
    assert cls_pool(hidden).tolist() == [[1.0, 2.0]]
    with pytest.raises(ValueError, match="does not fit"):
        mean_pool(hidden, torch.ones(1, 2))


def test_draws_are_sorted_subsets_of_the_pool_of_size_m() -> None:
    pool = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
    for draw in range(20):
        layers = draw_teacher_layers(pool, 6, seed=42, draw=draw)
        assert layers == sorted(layers)
        assert len(layers) == len(set(layers)) == 6
        assert set(layers) <= set(pool)
    with pytest.raises(ValueError, match="cannot draw 3"):
        draw_teacher_layers([0, 1], 3, seed=0, draw=0)


def test_draws_change_across_epochs_and_are_reproducible() -> None:
    def epochs(seed: int, include_last_layer: bool) -> list[list[int]]:
        method = build(shape(12), shape(4), seed=seed, include_last_layer=include_last_layer)
        seen = []
        for epoch in range(1, 6):
            for step in range(3):  # several steps per epoch: one draw per epoch
                method.start_step(epoch, (epoch - 1) * 3 + step)
                seen.append(list(method.layers))
        assert all(seen[i] == seen[i - i % 3] for i in range(len(seen)))
        return seen[::3]

    first = epochs(7, include_last_layer=True)
    assert len({tuple(x) for x in first}) > 1  # not the same layers every epoch
    assert all(len(x) == 4 and set(x) <= set(range(12)) for x in first)
    assert epochs(7, include_last_layer=True) == first
    assert epochs(8, include_last_layer=True) != first
    without_last = epochs(7, include_last_layer=False)
    assert all(len(x) == 3 and set(x) <= set(range(11)) for x in without_last)  # never layer 11


def test_redraw_every_n_steps() -> None:
    method = build(shape(12), shape(3), seed=1, redraw_every_steps=2)
    layers = []
    for step in range(8):
        method.start_step(1, step)
        layers.append(tuple(method.layers))
    assert layers[0] == layers[1] and layers[2] == layers[3] and layers[4] == layers[5]
    assert len(set(layers[::2])) > 1
    assert layers[::2] == [tuple(draw_teacher_layers(range(12), 3, 1, r)) for r in range(4)]


def test_seed_defaults_to_the_torch_seed_set_before_building() -> None:
    torch.manual_seed(123)
    implicit = build(shape(12), shape(4))
    explicit = build(shape(12), shape(4), seed=123)
    for epoch in range(1, 5):
        implicit.start_step(epoch, 0)
        explicit.start_step(epoch, 0)
        assert implicit.layers == explicit.layers


@pytest.mark.parametrize("include_last_layer", [True, False])
@pytest.mark.parametrize(("n", "m"), [(12, 6), (12, 4), (6, 3), (6, 5), (4, 4), (3, 2), (2, 1)])
def test_mapping_stays_in_the_pool_and_both_last_layers_are_in_or_out(
    n: int, m: int, include_last_layer: bool
) -> None:
    # The issue: the student's last layer was mapped while the teacher's was never drawn.
    if not include_last_layer and m < 2:
        assert spec_error(shape(n), shape(m), include_last_layer=False).field == (
            "student.num_layers"
        )
        return
    method = build(shape(n), shape(m), seed=5, include_last_layer=include_last_layer)
    assert method.pool == list(range(n if include_last_layer else n - 1))
    assert method.student_layers == list(range(m if include_last_layer else m - 1))
    for epoch in range(1, 30):
        method.start_step(epoch, 0)
        mapping = method.mapping
        assert set(mapping) == set(method.student_layers)
        assert set(mapping.values()) <= set(method.pool)  # never a teacher layer outside
        teacher_order = [mapping[j] for j in sorted(mapping)]
        assert teacher_order == sorted(set(teacher_order))  # in order, distinct
        assert ((m - 1) in mapping) == ((n - 1) in method.pool) == include_last_layer
    if include_last_layer and n - 1 in method.pool and len(method.pool) > m:
        drawn = set()
        for epoch in range(1, 60):
            method.start_step(epoch, 0)
            drawn |= set(method.layers)
        assert n - 1 in drawn  # the teacher's last layer is really drawn sometimes


def test_rail_layers_is_consistent_for_explicit_pools() -> None:
    both_in = rail_layers(RAILKDConfig(teacher_layers=[1, 3, 5]), 6, 3)
    assert (both_in.pool, both_in.student) == ((1, 3, 5), (0, 1, 2))
    both_out = rail_layers(RAILKDConfig(teacher_layers=[0, 2], include_last_layer=False), 6, 3)
    assert (both_out.pool, both_out.student) == ((0, 2), (0, 1))


def test_checks_reject_impossible_pools_naming_the_field() -> None:
    err = spec_error(shape(2), shape(3))  # 3 student layers, pool {0, 1}
    assert err.field == "method.teacher_layers"
    assert err.reason.startswith("3 student layers are mapped but only 2 teacher layers")
    err = spec_error(shape(3), shape(4), include_last_layer=False)  # pool {0, 1}, {0, 1, 2}
    assert err.field == "method.teacher_layers"
    assert err.reason.startswith("3 student layers are mapped but only 2 teacher layers")
    assert build(shape(2), shape(2), include_last_layer=False).mapping == {0: 0}
    err = spec_error(shape(6), shape(2), teacher_layers=[0, 6])
    assert err.field == "method.teacher_layers"
    assert err.reason.startswith("teacher layer 6 is out of range")
    err = spec_error(shape(6), shape(1), include_last_layer=False)
    assert err.field == "student.num_layers"
    # An explicit pool must agree with include_last_layer about the teacher's last layer.
    err = spec_error(shape(6), shape(2), teacher_layers=[1, 3])
    assert err.field == "method.teacher_layers" and "lacks the teacher's last layer 5" in err.reason
    err = spec_error(shape(6), shape(2), teacher_layers=[1, 5], include_last_layer=False)
    assert err.field == "method.teacher_layers" and "holds the teacher's last layer 5" in err.reason
    lstm = ModelShape(num_layers=1, hidden_size=4, num_labels=2, transformer=False)
    with pytest.raises(SpecError) as info:
        registry.check(RAILKDConfig(), shape(6), lstm, TrainingSpec())
    assert info.value.field == "student"
    with pytest.raises(SpecError) as info:
        registry.check(RAILKDConfig(), lstm, shape(1), TrainingSpec())
    assert info.value.field == "teacher"


def test_explicit_pool_may_include_the_last_layer() -> None:
    method = build(shape(6), shape(3), teacher_layers=[5, 1, 3], seed=0)
    assert method.pool == [1, 3, 5] and method.layers == [1, 3, 5]
    assert method.mapping == {0: 1, 1: 3, 2: 5}


def hidden_states(
    batch: int, layers: int, width: int, g: torch.Generator
) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, 3, width, generator=g) for _ in range(layers + 1))


@pytest.mark.parametrize("include_last_layer", [True, False])
@pytest.mark.parametrize("mode", ["layerwise", "concat"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_student_copying_the_drawn_teacher_layers_gives_zero(
    mode: str, pooling: str, include_last_layer: bool
) -> None:
    method = build(
        shape(6, hidden=4),
        shape(3, hidden=4),
        mode=mode,
        pooling=pooling,
        seed=3,
        include_last_layer=include_last_layer,
    )
    w_s, w_t = method.projections["student"], method.projections["teacher"]
    # Same projections on both sides, and each mapped student layer = its drawn teacher layer.
    with torch.no_grad():
        if mode == "layerwise":
            for i, k in enumerate(method.layers):
                w_t[method.pool.index(k)].weight.copy_(w_s[i].weight)  # type: ignore[index]
        else:
            w_t.weight.copy_(w_s.weight)  # type: ignore[operator]
    g = torch.Generator().manual_seed(4)
    t_hidden = hidden_states(2, 6, 4, g)
    s_layers = [torch.randn(2, 3, 4, generator=g) for _ in range(3)]  # unmapped: random
    for j, k in method.mapping.items():
        s_layers[j] = t_hidden[k + 1]
    s_hidden = (t_hidden[0], *s_layers)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    res = method.loss(
        StepOutputs(torch.zeros(2, 2), s_hidden),
        StepOutputs(torch.zeros(2, 2), t_hidden),
        torch.tensor([0, 1]),
        mask,
    )
    assert res.parts["rail"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("mode", ["layerwise", "concat"])
def test_method_projections_learn_and_loss_weights(mode: str) -> None:
    method = build(
        shape(5, hidden=6),
        shape(2, hidden=4),
        mode=mode,
        seed=0,
        projection_size=5,
        ce_weight=0.2,
        kd_weight=0.3,
    )
    (group,) = method.param_groups()
    assert (group.name, group.learning_rate, group.weight_decay) == ("projections", None, 0.0)
    (module,) = group.modules
    sizes = sorted(tuple(p.shape) for p in module.parameters())
    if mode == "layerwise":  # 2 student (4 -> 5) and 5 teacher (6 -> 5) projections
        assert sizes == [(5, 4)] * 2 + [(5, 6)] * 5
    else:
        assert sizes == [(5, 8), (5, 12)]
    g = torch.Generator().manual_seed(5)
    s_hidden = hidden_states(3, 2, 4, g)
    student = StepOutputs(torch.randn(3, 2, generator=g, requires_grad=True), s_hidden)
    teacher = StepOutputs(torch.randn(3, 2, generator=g), hidden_states(3, 5, 6, g))
    res = method.loss(student, teacher, torch.tensor([0, 1, 1]), torch.ones(3, 3))
    expected = (
        0.2 * float(res.parts["ce"])
        + 0.3 * float(res.parts["kd"])
        + (1 / 3) * float(res.parts["rail"])
    )
    assert float(res.total.detach()) == pytest.approx(expected, rel=1e-6)
    res.total.backward()
    used = [p for p in module.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(used) == (2 + 2 if mode == "layerwise" else 2)  # the drawn teacher layers only
    with pytest.raises(ValueError, match="teacher"):
        method.loss(student, None, torch.tensor([0, 1, 1]), torch.ones(3, 3))
    with pytest.raises(ValueError, match="built for 2 student and 5 teacher layers"):
        method.loss(
            student,
            StepOutputs(teacher.logits, s_hidden),
            torch.tensor([0, 1, 1]),
            torch.ones(3, 3),
        )


def test_config_defaults_and_bounds() -> None:
    c = RAILKDConfig()
    assert (c.name, c.mode, c.pooling, c.projection_size) == ("rail_kd", "concat", "mean", 128)
    assert (c.redraw_every_steps, c.teacher_layers, c.seed, c.temperature) == (None, None, None, 1)
    assert c.include_last_layer is True
    assert c.ce_weight == c.kd_weight == c.rail_weight == pytest.approx(1 / 3)
    assert RAILKD.needs.hidden_states and not RAILKD.any_student_architecture
    with pytest.raises(ValidationError):
        RAILKDConfig(redraw_every_steps=0)
    with pytest.raises(ValidationError):
        RAILKDConfig(projection_size=0)
    with pytest.raises(ValidationError, match="distinct"):
        RAILKDConfig(teacher_layers=[1, 1])
    with pytest.raises(ValidationError, match="0-based"):
        RAILKDConfig(teacher_layers=[-1, 2])
    with pytest.raises(ValidationError):
        RAILKDConfig(mode="sum")  # type: ignore[arg-type]
