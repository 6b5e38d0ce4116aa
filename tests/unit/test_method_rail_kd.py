"""RAIL-KD: the normalised distance by hand, masked mean pooling, the random layer draws
(sorted, of size m, from the pool, changing, reproducible), bind() checks and the method."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError

from kd_engine.losses.rail import rail_loss, rail_pair_loss
from kd_engine.methods.base import StepOutputs
from kd_engine.methods.layer_maps import cls_pool, mean_pool
from kd_engine.methods.rail_kd import RAILKD, RAILKDConfig, draw_teacher_layers
from kd_engine.models.shapes import ModelShape


def shape(layers: int, hidden: int = 4) -> ModelShape:
    return ModelShape(num_layers=layers, hidden_size=hidden, num_labels=2, num_heads=2)


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
    def epochs(seed: int) -> list[list[int]]:
        method = RAILKD(RAILKDConfig(seed=seed))
        method.bind(shape(12), shape(4))
        seen = []
        for epoch in range(1, 6):
            for step in range(3):  # several steps per epoch: one draw per epoch
                method.start_step(epoch, (epoch - 1) * 3 + step)
                seen.append(list(method.layers))
        assert all(seen[i] == seen[i - i % 3] for i in range(len(seen)))
        return seen[::3]

    first = epochs(7)
    assert len({tuple(x) for x in first}) > 1  # not the same layers every epoch
    assert all(set(x) <= set(range(11)) for x in first)  # never the last teacher layer
    assert epochs(7) == first
    assert epochs(8) != first


def test_redraw_every_n_steps() -> None:
    method = RAILKD(RAILKDConfig(seed=1, redraw_every_steps=2))
    method.bind(shape(12), shape(3))
    layers = []
    for step in range(8):
        method.start_step(1, step)
        layers.append(tuple(method.layers))
    assert layers[0] == layers[1] and layers[2] == layers[3] and layers[4] == layers[5]
    assert len(set(layers[::2])) > 1
    assert layers[::2] == [tuple(draw_teacher_layers(range(11), 3, 1, r)) for r in range(4)]


def test_seed_defaults_to_the_torch_seed_set_before_bind() -> None:
    torch.manual_seed(123)
    implicit = RAILKD(RAILKDConfig())
    implicit.bind(shape(12), shape(4))
    explicit = RAILKD(RAILKDConfig(seed=123))
    explicit.bind(shape(12), shape(4))
    for epoch in range(1, 5):
        implicit.start_step(epoch, 0)
        explicit.start_step(epoch, 0)
        assert implicit.layers == explicit.layers


def test_bind_rejects_impossible_pools() -> None:
    with pytest.raises(ValueError, match=r"^method\.teacher_layers: the student has 2 layers"):
        RAILKD(RAILKDConfig()).bind(shape(2), shape(2))  # pool = {0}: too small
    with pytest.raises(ValueError, match=r"^method\.teacher_layers: teacher layer 6 is out"):
        RAILKD(RAILKDConfig(teacher_layers=[0, 6])).bind(shape(6), shape(2))
    lstm = ModelShape(num_layers=1, hidden_size=4, num_labels=2, transformer=False)
    with pytest.raises(ValueError, match=r"^student: "):
        RAILKD(RAILKDConfig()).bind(shape(6), lstm)


def test_explicit_pool_may_include_the_last_layer() -> None:
    method = RAILKD(RAILKDConfig(teacher_layers=[5, 1, 3], seed=0))
    method.bind(shape(6), shape(3))
    assert method.pool == [1, 3, 5] and method.layers == [1, 3, 5]


def hidden_states(
    batch: int, layers: int, width: int, g: torch.Generator
) -> tuple[torch.Tensor, ...]:
    return tuple(torch.randn(batch, 3, width, generator=g) for _ in range(layers + 1))


@pytest.mark.parametrize("mode", ["layerwise", "concat"])
@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_student_copying_the_drawn_teacher_layers_gives_zero(mode: str, pooling: str) -> None:
    method = RAILKD(RAILKDConfig(mode=mode, pooling=pooling, seed=3))  # type: ignore[arg-type]
    method.bind(shape(6, hidden=4), shape(2, hidden=4))
    assert method.projections is not None
    w_s, w_t = method.projections["student"], method.projections["teacher"]
    # Same projections on both sides, and student layer i = the teacher layer drawn for it.
    with torch.no_grad():
        if mode == "layerwise":
            for i, k in enumerate(method.layers):
                w_t[method.pool.index(k)].weight.copy_(w_s[i].weight)  # type: ignore[index]
        else:
            w_t.weight.copy_(w_s.weight)  # type: ignore[operator]
    g = torch.Generator().manual_seed(4)
    t_hidden = hidden_states(2, 6, 4, g)
    s_hidden = (t_hidden[0], *(t_hidden[k + 1] for k in method.layers))
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
    config = RAILKDConfig(mode=mode, seed=0, projection_size=5, ce_weight=0.2, kd_weight=0.3)  # type: ignore[arg-type]
    method = RAILKD(config)
    method.bind(shape(5, hidden=6), shape(2, hidden=4))
    (module,) = method.extra_modules()
    sizes = sorted(tuple(p.shape) for p in module.parameters())
    if mode == "layerwise":  # 2 student (4 -> 5) and 4 teacher (6 -> 5) projections
        assert sizes == [(5, 4)] * 2 + [(5, 6)] * 4
    else:
        assert sizes == [(5, 8), (5, 12)]
    g = torch.Generator().manual_seed(5)
    s_hidden = hidden_states(3, 2, 4, g)
    student = StepOutputs(torch.randn(3, 2, generator=g, requires_grad=True), s_hidden)
    teacher = StepOutputs(torch.randn(3, 2, generator=g), hidden_states(3, 5, 6, g))
    res = method.loss(student, teacher, torch.tensor([0, 1, 1]), torch.ones(3, 3))
    expected = 0.2 * res.parts["ce"] + 0.3 * res.parts["kd"] + (1 / 3) * res.parts["rail"]
    assert float(res.total.detach()) == pytest.approx(expected, rel=1e-6)
    res.total.backward()
    used = [p for p in module.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(used) == (2 + 2 if mode == "layerwise" else 2)  # the drawn teacher layers only
    with pytest.raises(RuntimeError, match="bind"):
        RAILKD(RAILKDConfig()).loss(student, teacher, torch.tensor([0, 1, 1]), torch.ones(3, 3))


def test_config_defaults_and_bounds() -> None:
    c = RAILKDConfig()
    assert (c.name, c.mode, c.pooling, c.projection_size) == ("rail_kd", "concat", "mean", 128)
    assert (c.redraw_every_steps, c.teacher_layers, c.seed, c.temperature) == (None, None, None, 1)
    assert c.ce_weight == c.kd_weight == c.rail_weight == pytest.approx(1 / 3)
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
