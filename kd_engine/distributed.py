"""One job on several devices: data-parallel training with ``torch.distributed`` (DDP).

Why ``torch.distributed`` and not Hugging Face accelerate: it is already installed with torch
(no new dependency, no launcher configuration file), the loop stays ours (accelerate would
want to own the optimiser, the scheduler and the autocast), and the same code runs on the CPU
with the ``gloo`` backend, which is how the tests check it. Ranks are started with
``torch.multiprocessing`` (``spawn``) from :func:`run_job_distributed` or the command line
``python -m kd_engine.distributed --nproc N spec.json --teacher DIR --out DIR``.

What each rank does (see :func:`kd_engine.trainer.train`, which reads :func:`current`):

* the teacher is replicated on every rank, for inference only;
* the student is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel` (rank 0's
  initial weights are broadcast to all at wrapping, gradients are all-reduced and averaged in
  ``backward``);
* data: every rank draws the same seeded permutation (same ``training.seed``) and so the same
  global batches of ``training.batch_size`` rows; rank ``r`` takes its slice of each
  (:meth:`DistContext.shard`: contiguous, sizes differing by at most one), so the batch per
  rank is ``batch_size / world_size``. Each rank's loss is multiplied by ``n_r * world / b``
  (``n_r`` its rows, ``b`` the global batch's) before ``backward``; DDP's average then equals
  the gradient of the global batch's mean loss also for the last, partial batch, for losses
  that are means over rows (those of the supported methods). A rank whose slice is empty (a
  last batch of fewer rows than ranks) runs one row with weight 0. With dropout the ranks draw
  other masks than one process would (the result is a different, equally valid, sample);
* logged losses are all-reduced to the global batch's mean (one collective per micro-batch);
* evaluation on the dev set runs on rank 0 only; its metrics are broadcast so that every rank
  selects and restores the same best weights; cancel checks are rank 0's, broadcast;
* after training, ranks other than 0 stop (:class:`RankFinished`); rank 0 alone evaluates on
  the test and eval sets and exports the student into ``out_dir``.

Not supported with several ranks (refused by :func:`check_supported`, naming the setting):
methods other than :data:`DDP_METHODS` (several parameter groups, frozen stages, generators,
augmentation, per-example state or chains), checkpoints, pause and resume (a DDP job writes no
checkpoints: a lost multi-GPU job restarts from the beginning).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue as queue_mod
import shutil
import socket
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

DDP_METHODS = ("finetune", "vanilla_kd")
"""Methods a job may run on several ranks: one stage training the whole student, no extra
parameter groups, no generator or augmentation, losses that are means over the batch's rows."""

WORKER_GPUS_ENV = "DISTILLERY_WORKER_GPUS"
"""Environment variable: how many GPUs the worker runs one job on (1 or unset: no DDP)."""


class RankFinished(Exception):
    """Raised by :func:`kd_engine.trainer.train` on ranks other than 0 once training ended:
    evaluation and export are rank 0's."""


@dataclass(frozen=True)
class DistContext:
    """This process's place in a data-parallel run (one per rank, set by :func:`activate`)."""

    rank: int
    world_size: int

    @property
    def is_main(self) -> bool:
        """True on rank 0 (the one that evaluates, logs and exports)."""
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

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (picklable objects)."""
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=_collective_device())
        return box[0]

    def wrap(self, model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
        """``model`` (on ``device``) in DistributedDataParallel: rank 0's weights and buffers are
        broadcast to the other ranks now."""
        from torch.nn.parallel import DistributedDataParallel

        if device.type != "cuda":
            return DistributedDataParallel(model)
        index = device.index if device.index is not None else torch.cuda.current_device()
        return DistributedDataParallel(model, device_ids=[index])


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


def check_supported(spec: Any, world_size: int, checkpoints: object = None) -> None:
    """Refuse what a run on ``world_size`` > 1 ranks does not support.

    Raises:
        ValueError: the method is not one of :data:`DDP_METHODS`, ``training.batch_size`` is
            smaller than ``world_size``, checkpoints were asked for, or ``training.device``
            is ``cuda`` with fewer GPUs than ranks (each message names the setting).
    """
    if world_size <= 1:
        return
    name = spec.method.name
    if name not in DDP_METHODS:
        raise ValueError(
            f"method.name: {name!r} cannot run on {world_size} GPUs ({WORKER_GPUS_ENV}); "
            f"multi-GPU jobs support {', '.join(DDP_METHODS)}"
        )
    if spec.training.batch_size < world_size:
        raise ValueError(
            f"training.batch_size: {spec.training.batch_size} is smaller than the "
            f"{world_size} ranks of a multi-GPU job (each rank takes batch_size / ranks rows)"
        )
    if checkpoints is not None:
        raise ValueError(
            f"checkpoints: a job on {world_size} GPUs ({WORKER_GPUS_ENV}) writes no checkpoints"
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init(rank: int, world_size: int, port: int, use_cuda: bool) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    if use_cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world_size)


def _entry(
    rank: int,
    world_size: int,
    port: int,
    use_cuda: bool,
    fn: Callable[..., None],
    args: tuple[Any, ...],
    errors: Any,
) -> None:
    try:
        _init(rank, world_size, port, use_cuda)
        with activate(DistContext(rank, world_size)):
            fn(rank, *args)
    except RankFinished:
        pass
    except BaseException as e:  # reported to the parent, which stops the other ranks
        errors.put((rank, _picklable(e)))
        raise SystemExit(1) from None
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _picklable(e: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return RuntimeError(f"{type(e).__name__}: {e}")


@dataclass
class _Ranks:
    processes: list[Any]
    errors: Any
    messages: Any = None
    extra: dict[str, Any] = field(default_factory=dict)

    def failed(self) -> BaseException | None:
        try:
            rank, e = self.errors.get_nowait()
        except queue_mod.Empty:
            bad = [p for p in self.processes if p.exitcode not in (None, 0)]
            if not bad:
                return None
            return RuntimeError(f"a rank exited with code {bad[0].exitcode}")
        return e if isinstance(e, BaseException) else RuntimeError(f"rank {rank}: {e}")

    def stop(self) -> None:
        for p in self.processes:
            if p.is_alive():
                p.terminate()
        for p in self.processes:
            p.join(10)


def _start(
    fn: Callable[..., None], world_size: int, args: tuple[Any, ...], use_cuda: bool
) -> _Ranks:
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = _free_port()
    processes = []
    for rank in range(world_size):
        p = ctx.Process(
            target=_entry, args=(rank, world_size, port, use_cuda, fn, args, errors), daemon=False
        )
        p.start()
        processes.append(p)
    return _Ranks(processes, errors)


def launch(
    fn: Callable[..., None], world_size: int, args: tuple[Any, ...] = (), use_cuda: bool = False
) -> None:
    """Run ``fn(rank, *args)`` in ``world_size`` spawned processes joined in one process group
    (``nccl`` with one GPU per rank when ``use_cuda``, else ``gloo`` on the CPU), with
    :func:`current` set in each; wait for all. ``fn`` must be importable (module level).

    Raises:
        the first exception a rank raised (the others are then terminated), or RuntimeError
        when a rank died without one.
    """
    ranks = _start(fn, world_size, args, use_cuda)
    try:
        while any(p.is_alive() for p in ranks.processes):
            for p in ranks.processes:
                p.join(0.2)
            error = ranks.failed()
            if error is not None:
                raise error
        error = ranks.failed()
        if error is not None:
            raise error
    finally:
        ranks.stop()


class _Resolved:
    """A picklable dataset resolver: the parent's answers for the refs of one spec."""

    def __init__(self, answers: dict[str, Path | BaseException]) -> None:
        self.answers = answers

    def __call__(self, ref: str) -> Path:
        answer = self.answers.get(ref)
        if answer is None:
            raise ValueError(f"dataset reference {ref!r} was not resolved before the ranks began")
        if isinstance(answer, BaseException):
            raise answer
        return answer


def _resolve_all(spec: Any, resolve: Callable[[str], Path]) -> _Resolved:
    d = spec.dataset
    refs = [d.source, d.dev_source, d.test_source, *(s.source for s in d.eval_sets)]
    refs.append(getattr(spec.method, "corpus", None))
    answers: dict[str, Path | BaseException] = {}
    for ref in refs:
        if isinstance(ref, str) and ref not in answers:
            try:
                answers[ref] = Path(resolve(ref))
            except Exception as e:  # raised again in the rank, when the loader asks for it
                answers[ref] = _picklable(e)
    return _Resolved(answers)


def _job_rank(
    rank: int,
    spec_data: dict[str, Any],
    teacher_path: str,
    resolve: _Resolved,
    out_dir: str,
    student_path: str | None,
    every: int,
    messages: Any,
    stop: Any,
) -> None:
    from kd_engine.run import run_job
    from kd_engine.spec import JobSpec
    from kd_engine.trainer import TrainHooks

    spec = JobSpec.model_validate(spec_data)
    if rank == 0:
        hooks = TrainHooks(
            on_progress=lambda p: messages.put(("progress", p)),
            should_stop=stop.is_set,
            log=lambda r: messages.put(("log", r)),
            every=every,
        )
        out = Path(out_dir)
    else:
        hooks = TrainHooks(every=every)
        out = Path(tempfile.mkdtemp(prefix=f"distillery-rank{rank}-"))
    try:
        result = run_job(spec, teacher_path, resolve, out, hooks, student_path)
    finally:
        if rank != 0:
            shutil.rmtree(out, ignore_errors=True)
    messages.put(("result", result.metrics))


def run_job_distributed(
    spec: Any,
    teacher_path: Path | str,
    resolve: Callable[[str], Path],
    out_dir: Path,
    world_size: int,
    hooks: Any = None,
    student_path: Path | str | None = None,
) -> Any:
    """:func:`kd_engine.run.run_job` on ``world_size`` ranks (one GPU each when
    ``training.device`` is not ``cpu`` and CUDA is available, else CPU processes with gloo).

    ``resolve`` is called here, in the caller's process, for every dataset reference of the
    spec. ``hooks`` (a :class:`~kd_engine.trainer.TrainHooks`) are called here with rank 0's
    progress and log records; ``hooks.should_stop`` is polled here and relayed to rank 0.
    With ``world_size`` 1 this is :func:`run_job` in this process.

    Returns:
        a :class:`~kd_engine.run.RunResult` (rank 0's metrics; the student in ``out_dir``).

    Raises:
        ValueError: :func:`check_supported` refused the job, or a rank raised one (a user
            problem, as in :func:`run_job`).
        kd_engine.trainer.Cancelled: the job was cancelled through ``hooks.should_stop``.
        RuntimeError: a rank died without an exception.
    """
    from kd_engine.run import RunResult, run_job
    from kd_engine.trainer import TrainHooks

    hooks = hooks or TrainHooks()
    if world_size <= 1:
        return run_job(spec, teacher_path, resolve, out_dir, hooks, student_path)
    check_supported(spec, world_size)
    use_cuda = spec.training.device != "cpu" and torch.cuda.is_available()
    if use_cuda and torch.cuda.device_count() < world_size:
        raise ValueError(
            f"{WORKER_GPUS_ENV}: {world_size} ranks need {world_size} GPUs, this machine has "
            f"{torch.cuda.device_count()}"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    messages, stop = ctx.Queue(), ctx.Event()
    args = (
        spec.model_dump(mode="json"),
        str(teacher_path),
        _resolve_all(spec, resolve),
        str(out_dir),
        str(student_path) if student_path is not None else None,
        hooks.every,
        messages,
        stop,
    )
    ranks = _start(_job_rank, world_size, args, use_cuda)
    metrics: dict[str, Any] | None = None
    try:
        while True:
            try:
                kind, payload = messages.get(timeout=0.5)
            except queue_mod.Empty:
                kind, payload = "", None
            if kind == "progress":
                hooks.on_progress(payload)
            elif kind == "log":
                hooks.log(payload)
            elif kind == "result":
                metrics = payload
            if not stop.is_set() and hooks.should_stop():
                stop.set()
            error = ranks.failed()
            if error is not None:
                raise error
            if not kind and not any(p.is_alive() for p in ranks.processes):
                break
    finally:
        ranks.stop()
    if metrics is None:
        raise RuntimeError("the ranks ended without a result")
    return RunResult(metrics=metrics, out_dir=out_dir)


def main(argv: list[str] | None = None) -> None:
    """``python -m kd_engine.distributed --nproc N spec.json --teacher DIR --out DIR``: run a
    job spec (JSON file) on N ranks; dataset references are ``builtin:`` names or local
    paths (``file://`` prefixes are stripped)."""
    from kd_engine.spec import JobSpec

    parser = argparse.ArgumentParser(prog="python -m kd_engine.distributed")
    parser.add_argument("--nproc", type=int, required=True)
    parser.add_argument("spec", type=Path)
    parser.add_argument("--teacher", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--student", type=Path, default=None)
    a = parser.parse_args(argv)
    spec = JobSpec.model_validate(json.loads(a.spec.read_text(encoding="utf-8")))
    result = run_job_distributed(
        spec,
        a.teacher,
        lambda ref: Path(ref.removeprefix("file://")),
        a.out,
        a.nproc,
        student_path=a.student,
    )
    print(json.dumps(result.metrics.get("test", {})))


if __name__ == "__main__":
    # Run from the imported module, not from __main__: the ranks must share this module's
    # context and RankFinished with kd_engine.trainer (which imports kd_engine.distributed).
    from kd_engine.distributed import main as _main

    _main()
