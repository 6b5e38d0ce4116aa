"""The training loop: one readable loop for every method, stage after stage.

A method declares its stages (:class:`~kd_engine.stages.Stage`); for each, the loop freezes the
parameter groups the stage does not train, builds a fresh AdamW and LR scheduler (linear or
constant, with warm-up) from the stage's settings, and runs its epochs or steps with dynamic
padding, gradient accumulation, per-group gradient clipping, fused AdamW on CUDA and the
precision of ``training.precision`` (:func:`precision_plan`: bf16 autocast and a half-precision
teacher on CUDA by default, fp32 on the CPU). In a data-parallel run (:mod:`kd_engine.ranks`)
each rank trains on its slice of every batch and the gradients are averaged over the ranks
before each optimiser step. It evaluates on the dev set at epoch ends and every
``training.eval_every_steps`` optimiser steps, keeps the best checkpoint by
``training.selection_metric`` among the stages that may select it (restored at the end), and
between stages can restart from a stage's best weights. Progress reports name the stage and
its position; a cooperative cancel check runs with them. Deterministic for a given seed on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import PreTrainedModel

from kd_engine.checkpoint import (
    Checkpointer,
    LoopState,
    Paused,
    SavedCheckpoint,
    rng_state,
    set_rng_state,
)
from kd_engine.data.batching import Encoded, batches, num_batches
from kd_engine.evaluation import model_inputs, predict_logits, task_metrics
from kd_engine.methods.base import Method, StepOutputs
from kd_engine.models.attention_scores import record_attentions
from kd_engine.ranks import DistContext, RankStopped, current
from kd_engine.spec import TrainingSpec
from kd_engine.stages import STUDENT, ParamGroup, Stage, lr_factor
from kd_engine.teacher_cache import TeacherCache


class Cancelled(Exception):
    """Raised inside the loop when ``should_stop`` says the job was cancelled."""


@dataclass(frozen=True)
class Progress:
    """A progress report.

    Attributes:
        stage: the stage's name (``prepare``, ``tinybert intermediate``, ``evaluate``, ...).
        epoch: epochs begun over the whole job (1-based; 0 outside training).
        step: optimiser steps taken over the whole job.
        total_steps: optimiser steps the whole job will take.
        losses: mean losses since the epoch began (or the dev metric, on evaluation).
        stage_index: 1-based position of the stage (0 outside training).
        num_stages: how many training stages the job has.
        stage_epoch: epochs begun within the stage.
        stage_step: optimiser steps taken within the stage.
        stage_steps: optimiser steps the stage will take.
        hop: 1-based position of the model being trained in a job that trains several (a chain
            such as ``takd``; see :mod:`kd_engine.methods.chain`), 0 when not set. Epochs and
            steps then count within the hop.
        num_hops: how many models the job trains (0 when not set).
        phase: within an adversarial stage (MATE-KD and its family), ``generator`` for a report
            of the generator's max steps (``losses`` then holds the divergence they reached,
            e.g. ``generator_kl``) and ``student`` for the student's min steps; '' otherwise.
    """

    stage: str
    epoch: int
    step: int
    total_steps: int
    losses: dict[str, float]
    stage_index: int = 0
    num_stages: int = 0
    stage_epoch: int = 0
    stage_step: int = 0
    stage_steps: int = 0
    hop: int = 0
    num_hops: int = 0
    phase: str = ""


@dataclass
class TrainHooks:
    """Callbacks from the loop: progress every ``every`` steps, cancel and pause checks at the
    same time, one log record per event (JSON-serialisable dicts), and one call per checkpoint
    written (:class:`~kd_engine.checkpoint.SavedCheckpoint`, when the run has a
    :class:`~kd_engine.checkpoint.CheckpointPolicy`).

    ``should_pause`` returning True makes the loop write a checkpoint (reason ``pause``) and
    raise :class:`~kd_engine.checkpoint.Paused`; a run without a checkpoint policy cannot pause
    (the check is skipped).
    """

    on_progress: Callable[[Progress], None] = lambda p: None
    should_stop: Callable[[], bool] = lambda: False
    log: Callable[[dict[str, object]], None] = lambda r: None
    every: int = 5
    on_checkpoint: Callable[[SavedCheckpoint], None] = lambda c: None
    should_pause: Callable[[], bool] = lambda: False


@dataclass
class TrainResult:
    """What training did.

    Attributes:
        history: one record per dev evaluation (epoch ends and every ``eval_every_steps``):
            stage, epoch, step, train losses, dev metrics, seconds since the start.
        stages: one summary per stage: name, steps, epochs, LR, schedule, best dev metrics.
        best_epoch, best_step, best_stage: where the exported checkpoint was evaluated.
        best_dev: its dev metrics.
        seconds: wall-clock seconds of training.
        warnings: stages cut short by ``training.max_steps`` (:func:`cap_warnings`) and the
            method's schedule warnings.
    """

    history: list[dict[str, object]] = field(default_factory=list)
    stages: list[dict[str, object]] = field(default_factory=list)
    best_epoch: int = 0
    best_step: int = 0
    best_stage: str = ""
    best_dev: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def pick_device(requested: str) -> torch.device:
    """``auto`` is CUDA when available, else the CPU.

    Raises:
        ValueError: CUDA was asked for on a machine without it.
    """
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("training.device: cuda was requested but this worker has no GPU")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def stage_steps(
    stages: list[Stage], n_examples: int, cfg: TrainingSpec, capped: bool = True
) -> list[int]:
    """Optimiser steps of each stage: epochs x ceil(batches / accumulation), or its ``steps``;
    each capped at ``cfg.max_steps`` (a per-stage cap, for smoke tests) unless ``capped`` is
    False."""
    per_epoch = math.ceil(num_batches(n_examples, cfg.batch_size) / cfg.grad_accumulation_steps)
    out = []
    for stage in stages:
        n = stage.steps if stage.steps is not None else per_epoch * (stage.epochs or 1)
        out.append(n if cfg.max_steps is None or not capped else min(n, cfg.max_steps))
    return out


def cap_warnings(stages: list[Stage], planned: list[int], capped: list[int]) -> list[str]:
    """One warning per stage that ``training.max_steps`` cuts short: its planned steps (and
    epochs) against the steps it will run. Such a job's metrics say little about the method."""
    out = []
    for stage, full, run in zip(stages, planned, capped, strict=True):
        if run < full:
            length = f"{stage.epochs} epochs, " if stage.epochs is not None else ""
            out.append(
                f"training.max_steps cut stage {stage.name!r} short: {run} of its planned "
                f"{length}{full} steps ran ({run / full:.1%}); the student trained for less "
                "than the method's plan, so its metrics say little about the method"
            )
    return out


def selection_metric(cfg: TrainingSpec, dev: dict[str, float]) -> str:
    """The dev metric that selects checkpoints: ``cfg.selection_metric``, else ``accuracy``
    for classification and ``pearson`` for regression.

    Raises:
        ValueError: the chosen metric is not one the task reports.
    """
    metric = cfg.selection_metric or ("pearson" if "pearson" in dev else "accuracy")
    if metric not in dev:
        raise ValueError(
            f"training.selection_metric: {metric!r} is not reported for this task (it reports "
            f"{', '.join(sorted(dev))})"
        )
    return metric


def precision_plan(
    precision: str, device: torch.device
) -> tuple[torch.dtype | None, torch.dtype | None]:
    """What ``training.precision`` means on ``device``: (autocast dtype or None for none,
    the teacher's dtype or None to keep fp32).

    * ``auto``: on CUDA, bf16 autocast when the GPU supports bf16, and the teacher (inference
      only) in bf16, else fp16; on the CPU, fp32 (no autocast, fp32 teacher).
    * ``fp32``: no autocast, fp32 teacher, everywhere.
    * ``bf16``: bf16 autocast and a bf16 teacher, on CUDA (a GPU with bf16) or the CPU (slow
      there; for tests and checks).

    Raises:
        ValueError: ``bf16`` on a GPU without bf16 support.
    """
    if precision == "fp32":
        return None, None
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if precision == "bf16" and not bf16:
            raise ValueError(
                "training.precision: bf16 was requested but this GPU does not support it "
                "(use auto or fp32)"
            )
        return (torch.bfloat16 if bf16 else None), (torch.bfloat16 if bf16 else torch.float16)
    if precision == "bf16":
        return torch.bfloat16, torch.bfloat16
    return None, None


def teacher_inference_only(method: Method) -> bool:
    """True when the loop's forward pass is the only use of the teacher: the method has no
    ``bind`` (resources such as a generator), ``prepare``, ``augment`` or generator steps of
    its own. Only then does the teacher run in half precision (``training.precision``): a
    generator's gradients through the teacher, or embeddings a method computes with it, stay
    fp32."""
    cls = type(method)
    return all(
        getattr(cls, name) is getattr(Method, name)
        for name in ("bind", "prepare", "augment", "generator_steps", "generator_step")
    )


def _as_float(out: StepOutputs) -> StepOutputs:
    """A half-precision teacher's outputs in fp32, for the losses."""

    def f(xs: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
        return tuple(x.float() for x in xs) if xs is not None else None

    res = StepOutputs(out.logits.float(), f(out.hidden_states), f(out.attentions))
    if out.augmented is not None:
        res.augmented = _as_float(out.augmented)
    return res


def _forward(
    model: PreTrainedModel | torch.nn.Module,
    batch: dict[str, torch.Tensor],
    method: Method,
    device: torch.device,
) -> StepOutputs:
    out = model(
        **model_inputs(batch, device),
        output_hidden_states=method.needs_hidden_states,
        output_attentions=method.needs_attentions,
    )
    return StepOutputs(out.logits, out.hidden_states, out.attentions)


def train(
    student: PreTrainedModel,
    teacher: PreTrainedModel | None,
    method: Method,
    train_data: Encoded,
    dev_data: Encoded,
    cfg: TrainingSpec,
    pad_id: int,
    device: torch.device,
    hooks: TrainHooks | None = None,
    checkpointer: Checkpointer | None = None,
    resume: LoopState | None = None,
    teacher_cache: TeacherCache | None = None,
) -> TrainResult:
    """Train ``student`` in place with ``method``'s stages; on return it holds the weights of
    the best evaluation of a stage that may select (the last weights if none may).

    With a ``checkpointer`` the loop writes checkpoints as its policy says (after an optimiser
    step, never the last of a stage; at stage ends) and calls ``hooks.on_checkpoint`` with
    each; ``hooks.should_pause`` (checked with ``should_stop``) then writes one (reason
    ``pause``) and raises :class:`~kd_engine.checkpoint.Paused`. ``resume`` is the state of a
    checkpoint of this hop: the student, the method (built, bound and seeded as for a fresh
    run) and the loop continue from it, so that the result equals an uninterrupted run's (bit
    for bit on the CPU).

    With a ``teacher_cache`` (:mod:`kd_engine.teacher_cache`; only for a method it is
    :func:`~kd_engine.teacher_cache.eligible` for) the teacher's logits on each batch are read
    from it by example id instead of a teacher forward; the teacher still runs on augmented
    batches.

    For a method that needs attention maps, both models run with an attention implementation
    that reports them (probabilities, or scores when ``method.attention_scores``) during
    training, and get their own implementation back on return.

    Raises:
        Cancelled: ``hooks.should_stop()`` returned True.
        kd_engine.checkpoint.Paused: ``hooks.should_pause()`` returned True (after the
            checkpoint was written).
        ValueError: the loss became NaN or infinite (with the stage and step), or the
            selection metric is not one the task reports.
    """
    ctx = current()
    if ctx is not None:
        hooks = _rank_hooks(hooks or TrainHooks(), ctx)
    restore = (
        record_attentions([student, teacher], scores=method.attention_scores)
        if method.needs_attentions
        else (lambda: None)
    )
    loop = _Loop(student, teacher, method, train_data, dev_data, cfg, pad_id, device, hooks)
    try:
        loop.checkpointer, loop.resume = checkpointer, resume
        loop.teacher_cache = teacher_cache
        result = loop()
    finally:
        loop.release()
        restore()
    return result


def _rank_hooks(hooks: TrainHooks, ctx: DistContext) -> TrainHooks:
    """Hooks of one rank of a data-parallel run: rank 0's report; its cancel and pause checks
    are broadcast to all (every rank checks at the same points of the loop)."""

    def stop() -> bool:
        return bool(ctx.broadcast(hooks.should_stop() if ctx.is_main else False))

    def pause() -> bool:
        return bool(ctx.broadcast(hooks.should_pause() if ctx.is_main else False))

    if ctx.is_main:
        return dataclasses.replace(hooks, should_stop=stop, should_pause=pause)
    return TrainHooks(should_stop=stop, every=hooks.every, should_pause=pause)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


class _Losses:
    """The losses of the micro-steps since the last read, kept as tensors so that a step does
    not wait for the device: :meth:`flush` reads them all back in one transfer, checks that
    each is finite (naming the stage and the step it was computed at) and adds them, in
    order and as Python floats, to the running sums (the same sums as reading each loss at
    its own step)."""

    def __init__(self) -> None:
        self.pending: list[tuple[int, torch.Tensor, Mapping[str, float | torch.Tensor]]] = []

    def add(
        self, step: int, total: torch.Tensor, parts: Mapping[str, float | torch.Tensor]
    ) -> None:
        """Keep micro-step ``step``'s loss (a 0-d tensor) and parts (floats or 0-d tensors)."""
        self.pending.append((step, total, parts))

    def flush(self, sums: dict[str, float], stage: str) -> int:
        """Add the pending losses to ``sums`` (``loss`` and each part); returns how many
        micro-steps they were.

        Raises:
            ValueError: a loss was NaN or infinite (the message names the step and stage).
        """
        if not self.pending:
            return 0
        tensors = [t for _, t, _ in self.pending]
        tensors += [
            v for _, _, p in self.pending for v in p.values() if isinstance(v, torch.Tensor)
        ]
        values = iter(torch.stack([t.detach().float().reshape(()) for t in tensors]).tolist())
        totals = [next(values) for _ in self.pending]
        pending, self.pending = self.pending, []
        for (step, _, parts), total in zip(pending, totals, strict=True):
            if not math.isfinite(total):
                raise ValueError(
                    f"the loss became {total} at step {step} (stage {stage!r}): lower "
                    "training.learning_rate or check the data"
                )
            row = {"loss": total}
            row.update(
                {k: next(values) if isinstance(v, torch.Tensor) else v for k, v in parts.items()}
            )
            for k, v in row.items():
                sums[k] = sums.get(k, 0.0) + v
        return len(pending)


class _Loop:
    """The state of one training run (one instance per call of :func:`train`)."""

    def __init__(
        self,
        student: PreTrainedModel,
        teacher: PreTrainedModel | None,
        method: Method,
        train_data: Encoded,
        dev_data: Encoded,
        cfg: TrainingSpec,
        pad_id: int,
        device: torch.device,
        hooks: TrainHooks | None,
    ) -> None:
        self.student, self.teacher, self.method = student, teacher, method
        self.train_data, self.dev_data, self.cfg = train_data, dev_data, cfg
        self.pad_id, self.device = pad_id, device
        self.hooks = hooks or TrainHooks()
        self.stages = method.stages(cfg)
        self.steps = stage_steps(self.stages, len(train_data), cfg)
        self.total = sum(self.steps)
        self.groups = [
            ParamGroup(STUDENT, [student], weight_decay=cfg.weight_decay),
            *method.param_groups(),
        ]
        planned = stage_steps(self.stages, len(train_data), cfg, capped=False)
        self.result = TrainResult(
            warnings=[
                *cap_warnings(self.stages, planned, self.steps),
                *method.schedule_warnings(self.steps),
            ]
        )
        self.best_state: dict[str, torch.Tensor] | None = None
        self.restore_state: dict[str, torch.Tensor] | None = None
        self.restore_score = -math.inf
        # "best" / "restore": that state is the student's current weights, not copied yet
        # (:meth:`_materialise` copies it, once for both, before the weights next change).
        self._live: set[str] = set()
        self.step = self.epoch = 0
        self.generator_block = 0  # generator (max-step) blocks run so far
        self.started = time.perf_counter()
        self.checkpointer: Checkpointer | None = None
        self.resume: LoopState | None = None
        self.teacher_cache: TeacherCache | None = None
        self.dev: dict[str, float] = {}  # the latest dev metrics
        self.dist = current()  # a data-parallel run's rank, or None
        self.autocast_dtype, self.teacher_dtype = precision_plan(cfg.precision, device)
        if not teacher_inference_only(method):
            self.teacher_dtype = None
        self.global_batch: dict[str, torch.Tensor] = {}  # on several ranks: before sharding
        self.teacher_saved: dict[str, torch.Tensor] | None = None  # fp32 teacher, when halved

    def __call__(self) -> TrainResult:
        seed_everything(self.cfg.seed)
        self.student.to(self.device).train()  # type: ignore[arg-type]
        for group in self.groups[1:]:
            for module in group.modules:
                module.to(self.device)
        if self.teacher is not None:
            if self.teacher_dtype is not None:  # inference only: half precision, fp32 kept
                self.teacher_saved = _state(self.teacher)
                self.teacher.to(dtype=self.teacher_dtype)  # type: ignore[call-arg]
            self.teacher.to(self.device).eval()  # type: ignore[arg-type]
        generator = torch.Generator().manual_seed(self.cfg.seed)
        self.method.prepare(self.train_data)
        first = 0
        if self.resume is None:
            for warning in self.result.warnings:
                self.hooks.log({"event": "warning", "message": warning})
        else:
            first = self._load(self.resume, generator)
        for index in range(first, len(self.stages)):
            self._run_stage(index, self.stages[index], generator)
        if self.best_state is not None and "best" not in self._live:
            self.student.load_state_dict(self.best_state)
        self._live.clear()
        self.result.seconds = time.perf_counter() - self.started
        return self.result

    def release(self) -> None:
        """Give the teacher its fp32 weights back (when it ran in half precision)."""
        if self.teacher is not None and self.teacher_saved is not None:
            self.teacher.to(dtype=torch.float32)  # type: ignore[call-arg]
            self.teacher.load_state_dict(self.teacher_saved)
            self.teacher_saved = None

    def _dev_metrics(self) -> dict[str, float]:
        """Dev metrics of the student (on several ranks: rank 0's, broadcast)."""
        dev = None
        if self.dist is None or self.dist.is_main:
            dev = task_metrics(
                predict_logits(
                    self.student, self.dev_data, self.cfg.eval_batch_size, self.pad_id, self.device
                ),
                self.dev_data.labels,
            )
        return dev if self.dist is None else self.dist.broadcast(dev)  # type: ignore[return-value]

    def _materialise(self) -> None:
        """Copy the student's weights into the best and restore states that are still its
        current weights (one copy shared by both): an evaluation marks them, and the copy
        is made only when the weights are about to change, so that an evaluation the training
        does not continue past (the last one) copies nothing."""
        if not self._live:
            return
        state = _state(self.student)
        if "best" in self._live:
            self.best_state = state
        if "restore" in self._live:
            self.restore_state = state
        self._live.clear()

    def _stage_lr(self, stage: Stage) -> float:
        """The stage's peak LR: its own, else ``training.learning_rate``."""
        return stage.learning_rate if stage.learning_rate is not None else self.cfg.learning_rate

    def _optimizer(
        self, stage: Stage, groups: list[ParamGroup]
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        lr = self._stage_lr(stage)
        param_groups = []
        for g in groups:
            params = g.parameters()
            group_lr = g.learning_rate if g.learning_rate is not None else lr
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            param_groups += [
                {"params": decay, "weight_decay": g.weight_decay, "lr": group_lr},
                {"params": no_decay, "weight_decay": 0.0, "lr": group_lr},
            ]
        optimizer = torch.optim.AdamW(
            [g for g in param_groups if g["params"]], lr=lr, fused=self.device.type == "cuda"
        )
        total = self.steps[self.stages.index(stage)]
        warmup_ratio = (
            stage.warmup_ratio if stage.warmup_ratio is not None else self.cfg.warmup_ratio
        )
        schedule = stage.schedule or self.cfg.schedule
        factor = lr_factor(schedule, int(warmup_ratio * total), total)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

    def _load(self, r: LoopState, generator: torch.Generator) -> int:
        """Restore the weights and the loop's counters of checkpoint state ``r``; returns the
        index of the stage to run first. What belongs to a stage under way (optimiser, method
        state, RNG) is restored by :meth:`_run_stage`."""
        self.student.load_state_dict(r.student)
        modules = [m for g in self.groups[1:] for m in g.modules]
        if len(modules) != len(r.modules):
            raise ValueError("resume_from: the checkpoint's method modules do not match")
        for module, state in zip(modules, r.modules, strict=True):
            module.load_state_dict(state)
        self.step, self.epoch = r.step, r.epoch
        self.generator_block = r.generator_block
        self.result = TrainResult(**r.result)
        self.best_state, self.restore_state = r.best_state, r.restore_state
        self.restore_score = r.restore_score
        self.started = time.perf_counter() - r.seconds
        self.dev = dict(r.dev)
        generator.set_state(r.data_generator)
        return r.stage_index

    def _snapshot(
        self,
        index: int,
        mid_stage: bool,
        generator_state: torch.Tensor,
        optimizer: torch.optim.Optimizer | None,
        scheduler: torch.optim.lr_scheduler.LambdaLR | None,
        counters: dict[str, object],
    ) -> LoopState:
        """The loop's state now, for a checkpoint (``counters``: the stage's own)."""
        self._materialise()
        modules = [m for g in self.groups[1:] for m in g.modules]
        result = dataclasses.asdict(self.result)
        result["seconds"] = time.perf_counter() - self.started
        stage = self.stages[index if mid_stage else index - 1]  # a stage-end: the one ended
        return LoopState(
            stage_index=index,
            mid_stage=mid_stage,
            stage_name=stage.name,
            step=self.step,
            epoch=self.epoch,
            generator_block=self.generator_block,
            restore_score=self.restore_score,
            seconds=time.perf_counter() - self.started,
            total_steps=self.total,
            dev=dict(self.dev),
            result=result,
            data_generator=generator_state,
            student=self.student.state_dict(),
            modules=[m.state_dict() for m in modules],
            best_state=self.best_state,
            restore_state=self.restore_state,
            optimizer=optimizer.state_dict() if optimizer is not None else None,
            scheduler=scheduler.state_dict() if scheduler is not None else None,
            method_extra=self.method.extra_state(),
            rng=rng_state(),
            **counters,  # type: ignore[arg-type]
        )

    def _checkpoint(self, state: LoopState, reason: str) -> SavedCheckpoint | None:
        assert self.checkpointer is not None
        if self.dist is not None and not self.dist.is_main:  # rank 0 writes the checkpoints
            if reason == "pause":
                raise RankStopped()
            return None
        saved = self.checkpointer.write(state, self.student, reason)
        self.hooks.log(
            {"event": "checkpoint", "name": saved.name, "step": saved.step, "reason": reason}
        )
        self.hooks.on_checkpoint(saved)
        if reason == "pause":
            raise Paused(saved)
        return saved

    def _run_stage(self, index: int, stage: Stage, generator: torch.Generator) -> None:
        cfg, hooks, method = self.cfg, self.hooks, self.method
        r, self.resume = self.resume, None
        n_steps = self.steps[index]
        trains = set(stage.trains) if stage.trains is not None else {g.name for g in self.groups}
        active = [g for g in self.groups if g.name in trains]
        frozen = [p for g in self.groups if g.name not in trains for p in g.parameters()]
        for p in frozen:
            p.requires_grad_(False)
        if r is not None and not r.mid_stage:  # a stage-end checkpoint: the stage begins now
            method.load_extra_state(r.method_extra)
            set_rng_state(r.rng)
        method.begin_stage(stage)
        if r is None or not r.mid_stage:
            self.generator_block = 0
        optimizer, scheduler = self._optimizer(stage, active)
        clip = [(g.parameters(), g.max_grad_norm or cfg.max_grad_norm) for g in active]
        if r is None or not r.mid_stage:
            hooks.log({"event": "stage", "stage": stage.name, "index": index + 1, "steps": n_steps})
        stage_started = time.perf_counter()
        position = {"stage_index": index + 1, "num_stages": len(self.stages)}
        stage_step, stage_epoch = 0, 0
        stage_best: dict[str, float] = {}
        n_batches = num_batches(len(self.train_data), cfg.batch_size)
        skip, epoch_start = 0, generator.get_state()
        sums: dict[str, float] = {}
        n_micro = 0
        pending = _Losses()  # losses of micro-steps not yet read back
        if r is not None and r.mid_stage:
            assert r.optimizer is not None and r.scheduler is not None
            optimizer.load_state_dict(r.optimizer)
            scheduler.load_state_dict(r.scheduler)
            method.load_extra_state(r.method_extra)
            stage_step, stage_epoch = r.stage_step, r.stage_epoch
            stage_best = dict(r.stage_best)
            sums, n_micro, skip = dict(r.sums), r.n_micro, r.micro_next
            set_rng_state(r.rng)
        ckpt = self.checkpointer

        def evaluate(sums: dict[str, float], n_micro: int, at: str) -> None:
            dev = self._dev_metrics()
            metric = selection_metric(cfg, dev)
            score = dev[metric]
            record: dict[str, object] = {
                "stage": method.stage_label(),
                "stage_index": index + 1,
                "epoch": self.epoch,
                "stage_epoch": stage_epoch,
                "step": self.step,
                "stage_step": stage_step,
                "at": at,
                "train_loss": sums.get("loss", 0.0) / max(1, n_micro),
                "train_losses": {k: v / max(1, n_micro) for k, v in sums.items()},
                "dev": dev,
                "seconds": time.perf_counter() - self.started,
            }
            self.result.history.append(record)
            hooks.log({"event": "epoch" if at == "epoch_end" else "evaluation", **record})
            hooks.on_progress(
                Progress(
                    "evaluate",
                    self.epoch,
                    self.step,
                    self.total,
                    {f"dev_{metric}": score},
                    stage_epoch=stage_epoch,
                    stage_step=stage_step,
                    stage_steps=n_steps,
                    stage_index=index + 1,
                    num_stages=len(self.stages),
                )
            )
            if not stage_best or score > stage_best[metric]:
                stage_best.clear()
                stage_best.update(dev)
            best = self.result.best_dev.get(metric, -math.inf)
            first = self.best_state is None and "best" not in self._live
            if stage.selects_best and (first or score > best):
                self.result.best_epoch, self.result.best_step = self.epoch, self.step
                self.result.best_stage, self.result.best_dev = stage.name, dev
                self._live.add("best")
            if score > self.restore_score:
                self.restore_score = score
                self._live.add("restore")
            self.dev = dict(dev)

        def snapshot(mid_stage: bool, micro_next: int) -> LoopState:
            counters = {
                "stage_step": stage_step,
                "stage_epoch": stage_epoch,
                "micro_next": micro_next,
                "n_micro": n_micro,
                "sums": dict(sums),
                "stage_best": dict(stage_best),
            }
            if mid_stage:
                return self._snapshot(index, True, epoch_start, optimizer, scheduler, counters)
            return self._snapshot(index + 1, False, generator.get_state(), None, None, counters)

        while stage_step < n_steps:
            if skip:  # resuming within this epoch: its counters and sums are restored
                generator.set_state(epoch_start := r.data_generator)  # type: ignore[union-attr]
            else:
                self.epoch += 1
                stage_epoch += 1
                sums = {}
                n_micro = 0
                epoch_start = generator.get_state()
            for micro, batch in enumerate(
                batches(
                    self.train_data, cfg.batch_size, self.pad_id, generator, cfg.group_by_length
                )
            ):
                if micro < skip:  # consumed before the checkpoint
                    continue
                weight = 1.0
                if self.dist is not None:  # this rank's slice of the global batch
                    self.global_batch = batch
                    batch, weight = self.dist.shard(batch)
                if micro % cfg.grad_accumulation_steps == 0:
                    self._generator_steps(stage_step, batch, position, n_steps, stage_epoch)
                method.start_step(self.epoch, self.step)
                sees_all = self.dist is not None and method.sees_global_batch
                method.start_batch(self.global_batch if sees_all else batch)
                res_total, parts = self._micro_step(batch, weight)
                pending.add(self.step, res_total, parts)
                # Step after every grad_accumulation_steps micro-batches, and after the epoch's
                # last one (a partial group), so that each epoch takes the same number of steps.
                if (micro + 1) % cfg.grad_accumulation_steps and micro + 1 < n_batches:
                    continue
                if self.dist is not None:  # the global batch's gradients, on every rank
                    self.dist.average_gradients(p for g in active for p in g.parameters())
                for params, max_norm in clip:
                    torch.nn.utils.clip_grad_norm_(params, max_norm)
                self._materialise()  # the weights are about to change
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                self.step += 1
                stage_step += 1
                reported = stage_step % hooks.every == 0 or stage_step == n_steps
                if reported:
                    n_micro += pending.flush(sums, stage.name)
                    losses = {k: v / n_micro for k, v in sums.items()}
                    hooks.on_progress(
                        Progress(
                            method.stage_label(),
                            self.epoch,
                            self.step,
                            self.total,
                            losses,
                            stage_epoch=stage_epoch,
                            stage_step=stage_step,
                            stage_steps=n_steps,
                            stage_index=index + 1,
                            num_stages=len(self.stages),
                            phase="student" if self.generator_block else "",
                        )
                    )
                    hooks.log(
                        {
                            "event": "step",
                            "stage": method.stage_label(),
                            "epoch": self.epoch,
                            "step": self.step,
                            **losses,
                            "lr": scheduler.get_last_lr()[0],
                        }
                    )
                    if hooks.should_stop():
                        raise Cancelled()
                every = cfg.eval_every_steps or stage.eval_every_steps
                if (
                    every
                    and stage.evaluates
                    and stage_step % every == 0
                    and stage_step < n_steps
                    and micro + 1 < n_batches
                ):
                    n_micro += pending.flush(sums, stage.name)
                    evaluate(sums, n_micro, "step")
                if ckpt is not None and stage_step < n_steps:
                    reason = (
                        "pause"
                        if reported and hooks.should_pause()
                        else "interval"
                        if ckpt.due(self.step)
                        else None
                    )
                    if self.dist is not None:  # rank 0's decision (a timer differs by rank)
                        reason = self.dist.broadcast(reason)
                    if reason is not None:
                        n_micro += pending.flush(sums, stage.name)
                        self._checkpoint(snapshot(True, micro + 1), reason)
                if stage_step >= n_steps:
                    break
            skip = 0
            n_micro += pending.flush(sums, stage.name)
            if stage.evaluates:
                evaluate(sums, n_micro, "epoch_end")
            if hooks.should_stop():
                raise Cancelled()

        for p in frozen:
            p.requires_grad_(True)
        if stage.restore_best:
            if "restore" in self._live:  # the weights are the stage's best already
                self._live.discard("restore")
            elif self.restore_state is not None:
                self._materialise()  # a best state that is the current weights: copy it first
                self.student.load_state_dict(self.restore_state)
            self.restore_state, self.restore_score = None, -math.inf
        lr = self._stage_lr(stage)
        summary: dict[str, object] = {
            "name": stage.name,
            "index": index + 1,
            "loss": stage.loss,
            "steps": stage_step,
            "epochs": stage_epoch,
            "learning_rate": lr,
            "schedule": stage.schedule or cfg.schedule,
            "trains": sorted(trains),
            "selects_best": stage.selects_best,
            "restored_best": stage.restore_best,
            "best_dev": dict(stage_best),
            "seconds": time.perf_counter() - stage_started,
        }
        self.result.stages.append(summary)
        hooks.log({"event": "stage_end", **summary})
        if ckpt is None:
            return
        last = index == len(self.stages) - 1 and ckpt.hop == ckpt.num_hops
        if not last and hooks.should_pause():
            self._checkpoint(snapshot(False, 0), "pause")
        elif not last and ckpt.policy.at_stage_end:
            self._checkpoint(snapshot(False, 0), "stage_end")

    def _generator_steps(
        self,
        stage_step: int,
        batch: dict[str, torch.Tensor],
        position: dict[str, int],
        n_steps: int,
        stage_epoch: int,
    ) -> None:
        """Run the method's generator (max) steps due before student step ``stage_step`` and
        report the divergence they reached (a ``generator`` phase progress report and log
        record). Nothing happens for a method without a generator."""
        n = self.method.generator_steps(stage_step) if stage_step < n_steps else 0
        if not n:
            return
        self.generator_block += 1
        sums: dict[str, float] = {}
        for _ in range(n):
            for k, v in self.method.generator_step(batch).items():
                sums[k] = sums.get(k, 0.0) + v
        means = {k: v / n for k, v in sums.items()}
        label = self.method.stage_label()
        self.hooks.log(
            {"event": "generator", "stage": label, "step": self.step, "steps": n, **means}
        )
        if self.generator_block % max(1, self.hooks.every) == 1 or self.hooks.every == 1:
            self.hooks.on_progress(
                Progress(
                    label,
                    self.epoch,
                    self.step,
                    self.total,
                    means,
                    stage_epoch=stage_epoch,
                    stage_step=stage_step,
                    stage_steps=n_steps,
                    stage_index=position["stage_index"],
                    num_stages=position["num_stages"],
                    phase="generator",
                )
            )

    def _micro_step(
        self, batch: dict[str, torch.Tensor], weight: float = 1.0
    ) -> tuple[torch.Tensor, Mapping[str, float | torch.Tensor]]:
        """Forward both models (and, when the method augments the batch, both on the augmented
        batch too), compute the method's loss, back-propagate; returns the loss, detached and
        not read back (the loop reads its losses in one go at its next report, see
        :class:`_Losses`), and its parts.

        Autocast and the teacher's dtype follow ``training.precision`` (:func:`precision_plan`;
        the teacher runs in inference mode, its outputs are cast to fp32 for the loss). On
        several ranks the loss is multiplied by the shard's ``weight`` before ``backward`` and
        the returned losses are the global batch's (all-reduced, so read back at once); a
        method that ``sees_global_batch`` augments the global batch and each rank takes its
        shard of the result. The gradients stay local until the loop averages them before the
        optimiser step."""
        return self._forward_backward(batch, weight)

    def _forward_backward(
        self, batch: dict[str, torch.Tensor], weight: float
    ) -> tuple[torch.Tensor, Mapping[str, float | torch.Tensor]]:
        device, method = self.device, self.method
        dtype = self.autocast_dtype
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            t_out = None
            if self.dist is not None and method.sees_global_batch:
                augmented = method.augment(self.global_batch)
                if augmented is not None:
                    augmented = self.dist.shard(augmented)[0]
            else:
                augmented = method.augment(batch)
            if method.uses_teacher and self.teacher is not None:
                with torch.inference_mode():
                    if self.teacher_cache is not None:  # the frozen teacher's logits, cached
                        ids = batch["example_ids"]
                        t_out = StepOutputs(self.teacher_cache.logits_for(ids, device))
                    else:
                        t_out = _forward(self.teacher, batch, method, device)
                    if augmented is not None:
                        t_out.augmented = _forward(self.teacher, augmented, method, device)
                    if self.teacher_dtype is not None:
                        t_out = _as_float(t_out)
            s_out = _forward(self.student, batch, method, device)
            if augmented is not None:
                s_out.augmented = _forward(self.student, augmented, method, device)
            labels = batch["labels"].to(device)
            res = method.loss(s_out, t_out, labels, batch["attention_mask"].to(device))
        if self.dist is None:
            (res.total / self.cfg.grad_accumulation_steps).backward()
            return res.total.detach(), res.parts
        names = list(res.parts)
        means = self.dist.mean_losses(
            [float(res.total.detach()) * weight, *(float(res.parts[k]) * weight for k in names)]
        )
        if math.isfinite(means[0]):  # every rank sees the same mean: all skip, or none
            (res.total * weight / self.cfg.grad_accumulation_steps).backward()
        return torch.tensor(means[0]), dict(zip(names, means[1:], strict=True))
