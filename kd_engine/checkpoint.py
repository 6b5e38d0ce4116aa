"""Checkpoints of a running job, and bit-exact resume from one.

A checkpoint is a local directory, written atomically (a hidden temporary directory renamed into
place with :func:`os.replace`), that holds everything the training loop needs to continue as if
it had never stopped: the student's and the method's weights, the optimiser and LR scheduler of
the current stage, every RNG state (Python, NumPy, torch CPU and CUDA, the loop's data-order
generator as of the start of the current epoch plus the micro-batch reached), the loop's
counters and running loss sums, the best-so-far weights, the training result so far, the
method's own non-parameter state (:meth:`kd_engine.methods.base.Method.extra_state`), and for a
chain the finished hops' models and reports. ``manifest.json`` describes it
(:func:`read_checkpoint_info`); ``student/`` is a transformers directory that loads like the
final export.

On the CPU a resumed run ends with the same weights, bit for bit, as an uninterrupted one. On a
GPU, kernels that are not deterministic (atomics in some reductions) can make two runs differ
anyway, resumed or not.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch
from pydantic import ValidationError
from safetensors.torch import load_file, save_file

from kd_engine import names
from kd_engine.contracts import CheckpointInfo, CheckpointManifest, FinishedHopRecord
from kd_engine.ranks import current as current_rank

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from kd_engine.spec import JobSpec

MANIFEST = "manifest.json"
"""The checkpoint's description (JSON), read by :func:`read_checkpoint_info`."""

STUDENT_DIR = names.STUDENT_DIR
"""The checkpoint's transformers directory of the student (config, safetensors, tokenizer)."""

FORMAT_VERSION = 1

Info = TypeVar("Info", bound=CheckpointInfo)


@dataclass(frozen=True)
class CheckpointPolicy:
    """When the loop writes a checkpoint.

    Attributes:
        directory: local directory; each checkpoint is a subdirectory named
            ``step-{step:08d}`` for a single-model job and ``hop{hop}-step-{step:08d}`` for a
            chain (``step`` counts optimiser steps within the hop).
        every_steps: write one after every N-th optimiser step of the hop (steps N, 2N, ...);
            None = never by count.
        every_seconds: write one when this many wall-clock seconds have passed since the last
            one (or the start), checked after each optimiser step; None = never by time.
        at_stage_end: write one when a stage ends (not after the last stage of the last hop:
            the job is then about to finish).
    """

    directory: Path
    every_steps: int | None = None
    every_seconds: float | None = None
    at_stage_end: bool = True


@dataclass(frozen=True)
class SavedCheckpoint:
    """A checkpoint that was written (given to ``TrainHooks.on_checkpoint``), or read back.

    Attributes:
        path: the complete local checkpoint directory.
        name: its directory name (``step-00000040``, ``hop2-step-00000040``).
        step: optimiser steps over the whole hop when it was taken.
        total_steps: optimiser steps the hop will take.
        hop, num_hops: 1-based position of the hop, and how many the job trains (1 and 1 for a
            single-model job).
        stage: the name of the stage it was taken in (for ``stage_end``, the stage that ended);
            stage_index its 1-based position.
        reason: ``interval`` (every_steps / every_seconds), ``stage_end`` or ``pause``.
        dev: the latest dev metrics (empty if none yet).
        student_dir: ``path/"student"``: a transformers directory (config.json,
            model.safetensors, tokenizer files) loadable as a student, like the final export.
    """

    path: Path
    name: str
    step: int
    total_steps: int
    hop: int
    num_hops: int
    stage: str
    stage_index: int
    reason: str
    dev: dict[str, float]
    student_dir: Path


class Paused(Exception):
    """Raised by the loop after it wrote a ``pause`` checkpoint because
    ``TrainHooks.should_pause`` returned True. ``checkpoint`` is that checkpoint."""

    def __init__(self, checkpoint: SavedCheckpoint) -> None:
        super().__init__(f"paused at step {checkpoint.step}: {checkpoint.path}")
        self.checkpoint = checkpoint


def _manifest(path: Path, model: type[Info]) -> Info:
    """``path``'s manifest read as ``model`` (the info alone, or the whole manifest).

    Raises:
        ValueError: no readable manifest of this format version, or it does not fit ``model``.
    """
    try:
        data = json.loads((path / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{path} is not a complete checkpoint (no readable {MANIFEST}): {e}"
        ) from e
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        raise ValueError(f"{path}: {MANIFEST} is not a checkpoint manifest of this version")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        wrong = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        raise ValueError(f"{path}: {MANIFEST} is not a checkpoint manifest: {wrong}") from None


def read_checkpoint_info(path: Path) -> SavedCheckpoint:
    """Read the manifest of the checkpoint directory ``path``.

    Raises:
        ValueError: ``path`` is not a complete checkpoint (no readable manifest).
    """
    path = Path(path)
    m = _manifest(path, CheckpointInfo)
    return SavedCheckpoint(
        path=path,
        name=m.name,
        step=m.step,
        total_steps=m.total_steps,
        hop=m.hop,
        num_hops=m.num_hops,
        stage=m.stage,
        stage_index=m.stage_index,
        reason=m.reason,
        dev=dict(m.dev),
        student_dir=path / STUDENT_DIR,
    )


def spec_hash(spec: JobSpec) -> str:
    """SHA-256 of the spec's canonical JSON: a checkpoint resumes only a run of the same spec.

    ``export`` is left out: it changes what is written after training, not the training, so a
    checkpoint written before the section existed (or with other export settings) resumes."""
    body = json.dumps(
        spec.model_dump(mode="json", exclude={"export"}), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def checkpoint_name(hop: int, num_hops: int, step: int) -> str:
    """``step-00000040``, or ``hop2-step-00000040`` in a job that trains several models."""
    return f"step-{step:08d}" if num_hops == 1 else f"hop{hop}-step-{step:08d}"


def write_atomically(final: Path, write: Callable[[Path], object]) -> Path:
    """Run ``write(tmp)`` on a fresh hidden directory next to ``final``, then rename it to
    ``final`` (replacing an older one of that name). If ``write`` raises, the temporary
    directory is removed and nothing named ``final`` appears. Returns ``final``."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
    tmp.mkdir()
    try:
        write(tmp)
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}-{os.getpid()}-{time.monotonic_ns()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


# --- RNG states ---------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """Python's, NumPy's, torch's CPU and (when present) every CUDA device's RNG state, in a
    form ``torch.load(weights_only=True)`` reads back. On several ranks
    (:mod:`kd_engine.ranks`; a collective: every rank calls it at the same point) the state of
    every rank, ``{"ranks": [state of rank 0, ...]}``: their dropout masks differ."""
    state = _own_rng_state()
    ranks = current_rank()
    if ranks is None:
        return state
    return {"ranks": ranks.gather(state)}


def _own_rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, torch.from_numpy(np.asarray(keys).copy()), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned (CUDA only when both have it): this rank's
    state of a several-rank one (rank 0's for a rank it did not have), the one state on every
    rank otherwise."""
    if "ranks" in state:
        ranks, own = current_rank(), state["ranks"]
        state = own[ranks.rank] if ranks is not None and ranks.rank < len(own) else own[0]
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy(), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- the loop's state ---------------------------------------------------------------------


@dataclass
class LoopState:
    """Everything :mod:`kd_engine.trainer`'s loop needs to continue a hop (internal).

    ``mid_stage`` False means the stage ``stage_index`` (0-based) has not begun (a stage-end
    checkpoint of the previous one); True means it is under way: ``data_generator`` is then the
    data-order generator's state at the start of the current epoch and ``micro_next`` the
    number of its micro-batches already consumed (else the generator's state now)."""

    stage_index: int
    mid_stage: bool
    stage_name: str
    step: int
    epoch: int
    stage_step: int
    stage_epoch: int
    micro_next: int
    n_micro: int
    generator_block: int
    sums: dict[str, float]
    stage_best: dict[str, float]
    restore_score: float
    seconds: float
    total_steps: int
    dev: dict[str, float]
    result: dict[str, Any]
    data_generator: torch.Tensor
    student: dict[str, torch.Tensor]
    modules: list[dict[str, torch.Tensor]]
    best_state: dict[str, torch.Tensor] | None = None
    restore_state: dict[str, torch.Tensor] | None = None
    optimizer: dict[str, Any] | None = None
    scheduler: dict[str, Any] | None = None
    method_extra: dict[str, Any] = field(default_factory=dict)
    rng: dict[str, Any] = field(default_factory=dict)


_SCALARS = (
    "stage_index",
    "mid_stage",
    "stage_name",
    "step",
    "epoch",
    "stage_step",
    "stage_epoch",
    "micro_next",
    "n_micro",
    "generator_block",
    "sums",
    "stage_best",
    "restore_score",
    "seconds",
    "total_steps",
    "dev",
    "result",
)


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in state.items()}


@dataclass
class FinishedHop:
    """A hop of a chain that finished before the checkpoint (internal): what
    :class:`kd_engine.hops.HopRun` holds, as data."""

    result: dict[str, Any]
    test_logits: torch.Tensor
    report: dict[str, Any]


@dataclass
class Checkpointer:
    """Writes the checkpoints of one job (built by :func:`kd_engine.run.run_job`; the hop
    updates ``hop``, ``finished`` and ``previous`` as the chain advances).

    Attributes:
        policy: when to write.
        spec_hash: :func:`spec_hash` of the job's spec.
        tokenizer: saved with ``student/``.
        out_dir: the job's output directory; its files so far are copied into the checkpoint.
        num_hops: how many models the job trains; hop is the 1-based one being trained.
        finished: the hops finished so far; previous: the last finished hop's model (the
            next hop's teacher in a chain), or None.
        teacher_taught: whether a finished hop learnt from the job's teacher.
    """

    policy: CheckpointPolicy
    spec_hash: str
    tokenizer: PreTrainedTokenizerBase
    out_dir: Path
    num_hops: int = 1
    hop: int = 1
    finished: list[FinishedHop] = field(default_factory=list)
    previous: PreTrainedModel | None = None
    teacher_taught: bool = False
    last_time: float = field(default_factory=time.monotonic)

    def due(self, step: int) -> bool:
        """Whether an ``interval`` checkpoint is due after optimiser step ``step`` of the hop
        (by count or by time)."""
        p = self.policy
        if p.every_steps and step % p.every_steps == 0:
            return True
        return bool(p.every_seconds) and time.monotonic() - self.last_time >= float(
            p.every_seconds or 0
        )

    def write(
        self,
        state: LoopState,
        student: PreTrainedModel,
        reason: str,
    ) -> SavedCheckpoint:
        """Write ``state`` as a checkpoint (atomically) and return its description."""
        name = checkpoint_name(self.hop, self.num_hops, state.step)
        final = Path(self.policy.directory) / name
        manifest = CheckpointManifest(
            format=FORMAT_VERSION,
            spec_hash=self.spec_hash,
            name=name,
            step=state.step,
            total_steps=state.total_steps,
            hop=self.hop,
            num_hops=self.num_hops,
            stage=state.stage_name,
            # 1-based: the stage under way, or (a stage-end checkpoint) the one that ended
            stage_index=state.stage_index + 1 if state.mid_stage else state.stage_index,
            reason=reason,
            dev=state.dev,
            time=time.time(),
            teacher_taught=self.teacher_taught,
            loop={k: getattr(state, k) for k in _SCALARS},
            finished=[FinishedHopRecord(result=f.result, report=f.report) for f in self.finished],
        )

        def write(tmp: Path) -> None:
            tensors = {f"student.{k}": v for k, v in _cpu(state.student).items()}
            for i, module in enumerate(state.modules):
                tensors.update({f"module{i}.{k}": v for k, v in _cpu(module).items()})
            save_file(tensors, str(tmp / "weights.safetensors"))
            if state.best_state is not None:
                save_file(_cpu(state.best_state), str(tmp / "best.safetensors"))
            if state.restore_state is not None:
                save_file(_cpu(state.restore_state), str(tmp / "restore.safetensors"))
            torch.save(
                {
                    "optimizer": state.optimizer,
                    "scheduler": state.scheduler,
                    "method_extra": state.method_extra,
                    "rng": state.rng,
                    "data_generator": state.data_generator,
                },
                tmp / "state.pt",
            )
            if self.finished:
                save_file(
                    {
                        f"hop{i + 1}": f.test_logits.detach().cpu().contiguous()
                        for i, f in enumerate(self.finished)
                    },
                    str(tmp / "hop_logits.safetensors"),
                )
            if self.previous is not None:
                save_file(_cpu(self.previous.state_dict()), str(tmp / "previous.safetensors"))
            student.save_pretrained(
                tmp / STUDENT_DIR, state_dict=_cpu(state.student), safe_serialization=True
            )
            self.tokenizer.save_pretrained(tmp / STUDENT_DIR)
            out = tmp / "out"
            out.mkdir()
            for f in sorted(Path(self.out_dir).iterdir()):
                if f.is_file() and not f.name.startswith("."):
                    shutil.copy2(f, out / f.name)
            text = json.dumps(manifest.model_dump(), indent=1)
            (tmp / MANIFEST).write_text(text, encoding="utf-8")

        write_atomically(final, write)
        self.last_time = time.monotonic()
        return read_checkpoint_info(final)


@dataclass
class Resume:
    """A checkpoint read back for resuming (internal): the hop it was taken in, the finished
    hops, the loop's state and the files of the output directory so far."""

    path: Path
    hop: int
    num_hops: int
    teacher_taught: bool
    finished: list[FinishedHop]
    previous: dict[str, torch.Tensor] | None
    loop: LoopState

    def restore_out_dir(self, out_dir: Path) -> None:
        """Copy the checkpoint's copy of the output directory's files into ``out_dir``."""
        for f in sorted((self.path / "out").iterdir()):
            shutil.copy2(f, Path(out_dir) / f.name)


def load_checkpoint(path: Path, spec: JobSpec, num_hops: int) -> Resume:
    """Read the checkpoint ``path`` for resuming a run of ``spec`` that trains ``num_hops``
    models.

    Raises:
        ValueError: naming ``resume_from``: not a complete checkpoint, or one of another spec.
    """
    path = Path(path)
    try:
        m = _manifest(path, CheckpointManifest)
    except ValueError as e:
        raise ValueError(f"resume_from: {e}") from e
    if m.spec_hash != spec_hash(spec):
        raise ValueError(
            f"resume_from: the checkpoint {path} was written by a run of another job spec; "
            "a run resumes only from its own spec's checkpoints"
        )
    if m.num_hops != num_hops:
        raise ValueError(f"resume_from: the checkpoint {path} trains {m.num_hops} models")
    weights = load_file(str(path / "weights.safetensors"))
    student = {k[len("student.") :]: v for k, v in weights.items() if k.startswith("student.")}
    n_modules = 1 + max(
        (int(k.split(".", 1)[0][len("module") :]) for k in weights if k.startswith("module")),
        default=-1,
    )
    modules: list[dict[str, torch.Tensor]] = [{} for _ in range(n_modules)]
    for k, v in weights.items():
        if k.startswith("module"):
            head, key = k.split(".", 1)
            modules[int(head[len("module") :])][key] = v
    best = path / "best.safetensors"
    restore = path / "restore.safetensors"
    # map_location: a checkpoint written on a GPU resumes on the CPU too (the optimiser state
    # moves to its parameters' device when loaded).
    extra = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    loop = LoopState(
        **m.loop,
        data_generator=extra["data_generator"],
        student=student,
        modules=modules,
        best_state=load_file(str(best)) if best.exists() else None,
        restore_state=load_file(str(restore)) if restore.exists() else None,
        optimizer=extra["optimizer"],
        scheduler=extra["scheduler"],
        method_extra=extra["method_extra"],
        rng=extra["rng"],
    )
    logits = load_file(str(path / "hop_logits.safetensors")) if m.finished else {}
    finished = [
        FinishedHop(f.result, logits[f"hop{i + 1}"], f.report) for i, f in enumerate(m.finished)
    ]
    prev = path / "previous.safetensors"
    return Resume(
        path=path,
        hop=m.hop,
        num_hops=num_hops,
        teacher_taught=m.teacher_taught,
        finished=finished,
        previous=load_file(str(prev)) if prev.exists() else None,
        loop=loop,
    )
