"""Teacher and student latency timed interleaved, with repeats and their spread.

Timing the student, then much later the teacher, on a shared machine compares two moments of
its load as much as two models (a student once came out "0.60x faster" than its teacher; timed
interleaved outside the service it was 2.9x). :func:`interleaved_latency` times the models in
rounds: each round runs every model on the same ``batches`` batches, one model right after the
other (the order alternates from round to round), and keeps each model's median seconds per
example over its batches. Over the ``repeats`` rounds each model gets a median, min, max and a
*spread*: the interquartile range of the rounds' values relative to their median. The
speed-up is taken per round (teacher / student, the same moment of the machine's load) and
summarised the same way. A figure whose spread is above :data:`SPREAD_LIMIT` is marked
``reliable: false``: the report flags it and the dashboard's compare page leaves it off the
Pareto front.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass

import torch
from transformers import PreTrainedModel

from kd_engine.data.batching import Encoded, collate
from kd_engine.evaluation import model_inputs

SPREAD_LIMIT = 0.25
"""The largest spread (interquartile range of the rounds over their median) of a reliable
figure: above it, the rounds disagree by more than a quarter of the value itself."""

ROUNDS: dict[int, tuple[int, int, int]] = {1: (5, 4, 3), 32: (5, 1, 1)}
"""Batch size -> (rounds, timed batches per model per round, untimed warm-up batches per
model): 20 timed batches per model at batch 1 and 5 at batch 32, after 3 and 1 untimed ones
(our choice: ten warm-up batches per model and size made the timing about 2/3 of a tiny test
job's run, and the interleaved rounds, not the warm-up, are what make the figure robust)."""


@dataclass(frozen=True)
class Spread:
    """A figure over the rounds: their median, min, max, spread and whether it is reliable.

    Attributes:
        median, min, max: over the rounds (seconds per example for a latency, a ratio for a
            speed-up).
        spread: (q3 - q1) / median of the rounds' values (quartiles inclusive of the ends).
        rounds: how many rounds.
        reliable: ``spread <= SPREAD_LIMIT``. A speed-up is judged on its own rounds: each
            round's ratio shares one moment of the machine's load, so it may be steady while
            the latencies themselves are not.
    """

    median: float
    min: float
    max: float
    spread: float
    rounds: int
    reliable: bool

    def as_dict(self) -> dict[str, float | int | bool]:
        """JSON-ready (floats rounded to 6 significant digits)."""
        items = asdict(self).items()
        return {k: float(f"{v:.6g}") if isinstance(v, float) else v for k, v in items}


def spread_of(values: list[float], limit: float = SPREAD_LIMIT) -> Spread:
    """The :class:`Spread` of per-round values.

    Raises:
        ValueError: no values.
    """
    if not values:
        raise ValueError("a spread needs at least one value")
    median = statistics.median(values)
    if len(values) > 1:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    else:
        q1 = q3 = values[0]
    spread = (q3 - q1) / median if median > 0 else 0.0
    return Spread(median, min(values), max(values), spread, len(values), spread <= limit)


def timed_rounds(
    forwards: Mapping[str, Callable[[dict[str, torch.Tensor]], object]],
    data: Encoded,
    batch_size: int,
    pad_id: int,
    rounds: int,
    batches: int,
    warmup: int,
    synchronize: Callable[[], None] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, list[float]]:
    """Each model's median seconds per example in each round (see the module's docstring).

    Round ``r`` uses batches ``r * batches + i`` (i < ``batches``), batch ``k`` holding rows
    ``(k * batch_size + j) % len(data)``, padded to its own longest sequence; every model runs
    the same batches. The order of the models is reversed every other round. ``warmup``
    untimed batches per model come first. ``forwards`` take the collated batch (CPU tensors).

    Raises:
        ValueError: ``data`` is empty, or ``rounds`` or ``batches`` is below 1.
    """
    n = len(data)
    if n == 0 or rounds < 1 or batches < 1:
        raise ValueError(
            f"latency needs examples, rounds and batches (got {n}, {rounds}, {batches})"
        )

    def batch(k: int) -> dict[str, torch.Tensor]:
        return collate(data, [(k * batch_size + j) % n for j in range(batch_size)], pad_id)

    names = list(forwards)
    for name in names:
        for k in range(warmup):
            forwards[name](batch(k))
    out: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        inputs = [batch(r * batches + i) for i in range(batches)]
        for name in names if r % 2 == 0 else names[::-1]:
            times = []
            for b in inputs:
                if synchronize is not None:
                    synchronize()
                start = clock()
                forwards[name](b)
                if synchronize is not None:
                    synchronize()
                times.append((clock() - start) / batch_size)
            out[name].append(statistics.median(times))
    return out


@torch.inference_mode()
def interleaved_latency(
    models: Mapping[str, PreTrainedModel],
    data: Encoded,
    pad_id: int,
    device: torch.device,
    plan: Mapping[int, tuple[int, int, int]] = ROUNDS,
) -> dict[str, dict[str, object]]:
    """Latency per example of every model (``student``, and ``teacher`` when given) at each
    batch size of ``plan``, timed interleaved (:func:`timed_rounds`).

    Returns ``{"batch<B>": {"<name>": Spread dict (seconds per example), ...,
    "speedup": Spread dict (teacher / student, per round; with both)}}``.
    """
    for model in models.values():
        model.eval()
    forwards = {
        name: (lambda b, m=model: m(**model_inputs(b, device))) for name, model in models.items()
    }
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    out: dict[str, dict[str, object]] = {}
    for batch_size, (rounds, batches, warmup) in plan.items():
        times = timed_rounds(forwards, data, batch_size, pad_id, rounds, batches, warmup, sync)
        block: dict[str, object] = {}
        stats = {name: spread_of(values) for name, values in times.items()}
        for name, s in stats.items():
            block[name] = s.as_dict()
        if "teacher" in times and "student" in times:
            ratios = [t / s for t, s in zip(times["teacher"], times["student"], strict=True)]
            block["speedup"] = spread_of(ratios).as_dict()
        out[f"batch{batch_size}"] = block
    return out
