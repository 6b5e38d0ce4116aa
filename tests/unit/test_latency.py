"""Teacher and student timed interleaved with repeats (kd_engine.latency, issue 24 point 2)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from kd_engine.data.batching import Encoded
from kd_engine.latency import SPREAD_LIMIT, interleaved_latency, spread_of, timed_rounds
from kd_engine.models.student import fresh_student
from kd_engine.spec import FreshStudent

CPU = torch.device("cpu")


def tiny_data() -> Encoded:
    seqs = [[1, *range(5, 5 + n), 2] for n in (3, 0, 7, 1, 4)]
    return Encoded(seqs, None, [0, 1, 0, 0, 1], list(range(5)))


def test_spread_is_the_relative_interquartile_range_of_the_rounds() -> None:
    steady = spread_of([2.0, 2.0, 2.1, 1.9, 2.0])
    assert steady.median == 2.0 and steady.min == 1.9 and steady.max == 2.1
    assert steady.spread == pytest.approx(0.0)  # q1 = q3 = 2.0
    assert steady.reliable and steady.rounds == 5
    noisy = spread_of([1.0, 1.0, 1.0, 2.0, 3.0])  # q1 1.0, q3 2.0, median 1.0
    assert noisy.spread == pytest.approx(1.0) and not noisy.reliable
    wide = spread_of([1.0, 1.0, 1.1, 1.3, 1.3])
    assert wide.spread == pytest.approx(0.3 / 1.1)  # 0.27: just over the limit
    assert SPREAD_LIMIT == 0.25 and not wide.reliable
    with pytest.raises(ValueError):
        spread_of([])


class LoadedMachine:
    """A clock and two models whose cost is scaled by a load that changes between rounds (as a
    shared machine's does): the teacher costs 3 units, the student 1."""

    def __init__(self, loads: list[float]) -> None:
        self.now = 0.0
        self.loads = loads
        self.calls: list[str] = []

    def clock(self) -> float:
        return self.now

    def forward(self, name: str, units: float) -> Callable[[dict[str, torch.Tensor]], None]:
        def run(batch: dict[str, torch.Tensor]) -> None:
            self.calls.append(name)
            timed_round = max(0, (len(self.calls) - 1 - 2) // 4)  # 1 warm-up each, 2 batches
            self.now += units * self.loads[min(timed_round, len(self.loads) - 1)]

        return run


def test_interleaved_rounds_keep_the_speedup_steady_under_a_changing_load() -> None:
    machine = LoadedMachine([1.0, 6.0, 1.0, 6.0, 1.0])
    forwards = {"teacher": machine.forward("teacher", 3.0), "student": machine.forward("s", 1.0)}
    times = timed_rounds(
        forwards, tiny_data(), 1, 0, rounds=5, batches=2, warmup=1, clock=machine.clock
    )
    # Warm-up once each, then the order alternates: T T S S, S S T T, ...
    assert machine.calls[:2] == ["teacher", "s"]
    assert machine.calls[2:6] == ["teacher", "teacher", "s", "s"]
    assert machine.calls[6:10] == ["s", "s", "teacher", "teacher"]
    assert times["teacher"] == [3.0, 18.0, 3.0, 18.0, 3.0]
    assert times["student"] == [1.0, 6.0, 1.0, 6.0, 1.0]
    # Each latency's spread is as wide as the load's: unreliable. The speed-up, per round, is
    # exactly 3 whatever the load.
    assert not spread_of(times["student"]).reliable
    ratios = spread_of([t / s for t, s in zip(times["teacher"], times["student"], strict=True)])
    assert ratios.median == 3.0 and ratios.spread == 0.0 and ratios.reliable


def test_interleaved_latency_of_real_models_reports_every_figure_and_the_speedup() -> None:
    torch.manual_seed(0)
    small = FreshStudent(num_layers=1, hidden_size=16, num_heads=2, intermediate_size=32)
    big = FreshStudent(num_layers=4, hidden_size=64, num_heads=4, intermediate_size=256)
    models = {
        "student": fresh_student(small, vocab_size=50, label_names=["a", "b"], max_positions=32),
        "teacher": fresh_student(big, vocab_size=50, label_names=["a", "b"], max_positions=32),
    }
    out = interleaved_latency(models, tiny_data(), 0, CPU, plan={1: (3, 2, 1), 4: (3, 1, 1)})
    assert set(out) == {"batch1", "batch4"}
    for block in out.values():
        assert set(block) == {"student", "teacher", "speedup"}
        for figure in block.values():
            assert isinstance(figure, dict)
            assert figure["rounds"] == 3
            assert 0 < figure["min"] <= figure["median"] <= figure["max"]
            assert figure["spread"] >= 0 and isinstance(figure["reliable"], bool)
    # Alone (a job without a teacher), the student is timed and there is no speed-up.
    alone = interleaved_latency({"student": models["student"]}, tiny_data(), 0, CPU, {1: (2, 1, 0)})
    assert set(alone["batch1"]) == {"student"}
