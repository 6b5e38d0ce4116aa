"""The rank context of a data-parallel (DDP) run: this process's rank, the world size, and the
few collectives the loop and the methods need (shard a batch, average losses and gradients,
broadcast and gather small objects).

The processes are started by ``torchrun`` (:mod:`kd_engine.torchrun`); :func:`joined` reads the
environment it sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``), joins
the process group (``nccl`` with one GPU per rank, else ``gloo`` on the CPU) and makes the
context what :func:`current` returns. Outside such a run :func:`current` is None and every
caller takes its one-process path. This module imports no other ``kd_engine`` module.

Gradients are averaged by :meth:`DistContext.average_gradients` (one flat all-reduce per
optimiser step over every trained parameter: the student's and the method's own modules),
which is DistributedDataParallel's arithmetic without its wrapper: stages that freeze parts of
the student, modules outside it (projections, heads, a generator) and forwards a method runs
itself need no special case.
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

WORKER_GPUS_ENV = "DISTILLERY_WORKER_GPUS"
"""Environment variable: how many GPUs the worker runs one job on (1 or unset: no DDP)."""


class RankStopped(Exception):
    """Raised on ranks other than 0 where rank 0 paused the job (rank 0 alone writes the
    checkpoint and raises :class:`~kd_engine.checkpoint.Paused`); the rank then exits."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel run (one per rank, set by :func:`activate`)."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the one that evaluates, logs, checkpoints and exports)."""
        return self.rank == 0

    def shard(self, batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
        """This rank's slice of a global batch and its loss weight.

        Args:
            batch: a collated batch (every tensor (B, ...) with B rows).

        Returns:
            the rows ``[start, end)`` of this rank (``torch.tensor_split`` of B into
            ``world_size`` parts), padding columns beyond its longest sequence removed, and the
            weight ``n_r * world_size / B`` (0.0 with one row of the batch when the slice is
            empty).
        """
        b = int(batch["input_ids"].shape[0])
        bounds = [len(p) for p in torch.tensor_split(torch.arange(b), self.world_size)]
        start = sum(bounds[: self.rank])
        n = bounds[self.rank]
        weight = n * self.world_size / b
        if n == 0:
            start, n, weight = 0, 1, 0.0
        out = {k: v[start : start + n] for k, v in batch.items()}
        if "attention_mask" in out:
            t = int(out["attention_mask"].sum(1).max())
            for k in ("input_ids", "attention_mask", "token_type_ids"):
                if k in out:
                    out[k] = out[k][:, :t]
        return out, weight

    def mean_losses(self, weighted: list[float]) -> list[float]:
        """All-reduce: the sum over ranks of ``weighted`` (each rank's losses times its shard
        weight) divided by ``world_size``: the global batch's mean losses, the same on every
        rank."""
        t = torch.tensor(weighted, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return (t / self.world_size).tolist()

    def average_gradients(self, params: Iterable[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over the ranks, in one all-reduce per dtype.

        Only parameters that have a gradient take part (as AdamW skips the others): every
        rank runs the same graph, so the same ones have one on every rank; a mismatch fails
        the all-reduce rather than mixing tensors."""
        by_dtype: dict[torch.dtype, list[torch.nn.Parameter]] = {}
        for p in params:
            if p.grad is not None:
                by_dtype.setdefault(p.dtype, []).append(p)
        for group in by_dtype.values():
            grads = [p.grad for p in group if p.grad is not None]  # (all of them)
            flat = torch.cat([g.reshape(-1) for g in grads]).to(_collective_device())
            dist.all_reduce(flat)
            flat /= self.world_size
            offset = 0
            for g in grads:
                n = g.numel()
                g.copy_(flat[offset : offset + n].view_as(g))
                offset += n

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (anything ``torch.save`` writes: tensors too)."""
        box = [_dumps(obj) if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=_collective_device())
        return _loads(box[0])  # type: ignore[arg-type]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank (anything ``torch.save``
        writes)."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, _dumps(obj))
        return [_loads(b) for b in out]

    def gather_rows(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's ``t`` (R_r, ...) (same trailing shape and dtype on every rank, any R_r),
        in rank order, on every rank and on ``t``'s device; no gradient flows back."""
        device = _collective_device()
        sizes = torch.zeros(self.world_size, dtype=torch.long, device=device)
        sizes[self.rank] = t.shape[0]
        dist.all_reduce(sizes)
        longest = int(sizes.max())
        padded = torch.zeros((longest, *t.shape[1:]), dtype=t.dtype, device=device)
        padded[: t.shape[0]] = t.detach().to(device)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return [p[: int(n)].to(t.device) for p, n in zip(parts, sizes.tolist(), strict=True)]


def _dumps(obj: Any) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=False)  # our own ranks' objects


def _collective_device() -> torch.device:
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_current: DistContext | None = None


def current() -> DistContext | None:
    """The data-parallel context of this process, None outside a multi-rank run."""
    return _current


@contextlib.contextmanager
def activate(ctx: DistContext | None) -> Iterator[None]:
    """Make ``ctx`` the context :func:`current` returns while the block runs."""
    global _current
    previous, _current = _current, ctx
    try:
        yield
    finally:
        _current = previous


@contextlib.contextmanager
def joined(use_cuda: bool) -> Iterator[DistContext]:
    """Join the process group ``torchrun`` set up in this process's environment (``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``; ``nccl`` on GPU ``LOCAL_RANK`` when ``use_cuda``, else
    ``gloo``), make it :func:`current` while the block runs, and leave the group after it.

    Raises:
        KeyError: the environment has no ``RANK`` or ``WORLD_SIZE`` (not started by torchrun).
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    dist.init_process_group("nccl" if use_cuda else "gloo")
    ctx = DistContext(rank, world)
    try:
        with activate(ctx):
            yield ctx
    finally:
        dist.destroy_process_group()


def check_supported(spec: Any, world_size: int) -> None:
    """Refuse what a run on ``world_size`` > 1 ranks cannot do.

    Raises:
        ValueError: ``training.batch_size`` is smaller than ``world_size``, or
            ``training.device`` is ``cuda`` with fewer GPUs than ranks (each message names
            the setting).
    """
    if world_size <= 1:
        return
    if spec.training.batch_size < world_size:
        raise ValueError(
            f"training.batch_size: {spec.training.batch_size} is smaller than the "
            f"{world_size} ranks of a multi-GPU job (each rank takes batch_size / ranks rows)"
        )
    if spec.training.device == "cuda" and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"training.device: cuda with {world_size} ranks needs {world_size} GPUs, this "
            f"machine has {torch.cuda.device_count()}"
        )


def worker_gpus() -> int:
    """``DISTILLERY_WORKER_GPUS`` as an int (1 when unset or empty).

    Raises:
        ValueError: it is not a positive integer.
    """
    raw = os.environ.get(WORKER_GPUS_ENV, "").strip() or "1"
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{WORKER_GPUS_ENV}: {raw!r} is not a positive integer")
    return int(raw)
