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
from kd_engine.contracts import Progress as Progress  # re-exported: defined once there
from kd_engine.data.batching import Encoded, batches, num_batches
from kd_engine.evaluation import predict_logits, task_metrics
from kd_engine.methods.base import Method, StepOutputs
from kd_engine.models.attention_scores import record_attentions
from kd_engine.ranks import DistContext, RankStopped, current
from kd_engine.spec import TrainingSpec
from kd_engine.stages import STUDENT, ParamGroup, Stage, lr_factor
from kd_engine.tasks import CLASSIFICATION, Task
from kd_engine.teacher_cache import TeacherCache


class Cancelled(Exception):
    """Raised inside the loop when ``should_stop`` says the job was cancelled."""


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
    """True when the loop's forward passes are the only use of the teacher, as the method
    declares it (:attr:`~kd_engine.methods.base.Needs.teacher_inference_only`: it neither runs
    the models itself, nor augments, nor has a generator). Only then does the teacher run in
    half precision (``training.precision``): a generator's gradients through the teacher, or
    embeddings a method computes with it, stay fp32."""
    return method.needs.teacher_inference_only


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
    task: Task = CLASSIFICATION,
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

    ``task`` (:mod:`kd_engine.tasks`) runs the models and gives the losses their targets; the
    loop does not look inside a step's outputs.

    For a method that needs attention maps, both models run with an attention implementation
    that reports them (probabilities, or scores when ``method.needs.attention_scores``) during
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
        record_attentions([student, teacher], scores=method.needs.attention_scores)
        if method.needs.attentions
        else (lambda: None)
    )
    loop = _Loop(student, teacher, method, train_data, dev_data, cfg, pad_id, device, hooks)
    try:
        loop.checkpointer, loop.resume = checkpointer, resume
        loop.teacher_cache, loop.task = teacher_cache, task
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
        pending, self.pending = self.pending, []
        rows = _read_back([{"loss": total, **parts} for _, total, parts in pending])
        for (step, _, _), row in zip(pending, rows, strict=True):
            if not math.isfinite(row["loss"]):
                raise ValueError(
                    f"the loss became {row['loss']} at step {step} (stage {stage!r}): lower "
                    "training.learning_rate or check the data"
                )
            for k, v in row.items():
                sums[k] = sums.get(k, 0.0) + v
        return len(pending)


class _Loop:
    """The state of one training run (one instance per call of :func:`train`): the models, the
    job-wide counters, the best and restore states, and what every stage shares (evaluation,
    selection, the micro-step's forward and backward, checkpoints). Each stage is run by a
    :class:`_StageRun`."""

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
        self.task: Task = CLASSIFICATION
        self.dev: dict[str, float] = {}  # the latest dev metrics
        self.dist = current()  # a data-parallel run's rank, or None
        self.autocast_dtype, self.teacher_dtype = precision_plan(cfg.precision, device)
        if not teacher_inference_only(method):
            self.teacher_dtype = None
        self.global_batch: dict[str, torch.Tensor] = {}  # on several ranks: before sharding
        self.teacher_saved: dict[str, torch.Tensor] | None = None  # fp32 teacher, when halved

    def __call__(self) -> TrainResult:
        seed_everything(self.cfg.seed)
        self._place_models()
        generator = torch.Generator().manual_seed(self.cfg.seed)
        self.method.prepare(self.train_data)
        first = 0
        if self.resume is None:
            for warning in self.result.warnings:
                self.hooks.log({"event": "warning", "message": warning})
        else:
            first = self._load(self.resume, generator)
        for index in range(first, len(self.stages)):
            resume, self.resume = self.resume, None
            _StageRun(self, index, generator, resume).run()
        if self.best_state is not None and "best" not in self._live:
            self.student.load_state_dict(self.best_state)
        self._live.clear()
        self.result.seconds = time.perf_counter() - self.started
        return self.result

    def _place_models(self) -> None:
        """Move the models and the method's modules to the device (the teacher in eval mode,
        in half precision when :func:`precision_plan` says so, its fp32 weights kept)."""
        self.student.to(self.device).train()  # type: ignore[arg-type]
        for group in self.groups[1:]:
            for module in group.modules:
                module.to(self.device)
        if self.teacher is not None:
            if self.teacher_dtype is not None:  # inference only: half precision, fp32 kept
                self.teacher_saved = _state(self.teacher)
                self.teacher.to(dtype=self.teacher_dtype)  # type: ignore[call-arg]
            self.teacher.to(self.device).eval()  # type: ignore[arg-type]

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

    def select(self, stage: Stage, dev: dict[str, float], score: float) -> None:
        """Best and restore bookkeeping after an evaluation of ``stage`` whose selection
        metric is ``score``: the exported checkpoint (``best``, among stages that select; the
        first evaluation of such a stage when none came before) and the stage's restore point.
        Only marks them as the current weights; :meth:`_materialise` copies them later."""
        metric = selection_metric(self.cfg, dev)
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

    def restore_best(self) -> None:
        """At the end of a stage that restores its best weights: load them (unless they are
        the current ones) and forget them."""
        if "restore" in self._live:  # the weights are the stage's best already
            self._live.discard("restore")
        elif self.restore_state is not None:
            self._materialise()  # a best state that is the current weights: copy it first
            self.student.load_state_dict(self.restore_state)
        self.restore_state, self.restore_score = None, -math.inf

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

    def micro_step(
        self, batch: dict[str, torch.Tensor], weight: float = 1.0
    ) -> tuple[torch.Tensor, Mapping[str, float | torch.Tensor]]:
        """Forward both models (and, when the method augments the batch, both on the augmented
        batch too), compute the method's loss, back-propagate; returns the loss, detached and
        not read back (the loop reads its losses in one go at its next report, see
        :class:`_Losses`), and its parts (detached tensors, not read back either).

        Autocast and the teacher's dtype follow ``training.precision`` (:func:`precision_plan`;
        the teacher runs in inference mode, its outputs are cast to fp32 for the loss). On
        several ranks the loss is multiplied by the shard's ``weight`` before ``backward`` and
        the returned losses are the global batch's (all-reduced, so read back at once); a
        method that ``sees_global_batch`` augments the global batch and each rank takes its
        shard of the result. The gradients stay local until the loop averages them before the
        optimiser step."""
        return self._forward_backward(batch, weight)

    def _teacher_outputs(
        self, batch: dict[str, torch.Tensor], augmented: dict[str, torch.Tensor] | None
    ) -> StepOutputs | None:
        """The teacher's outputs on the batch (from the cache when there is one) and on the
        augmented batch, in fp32; None when the method does not use the teacher."""
        if not self.method.needs.teacher or self.teacher is None:
            return None
        task, needs, device = self.task, self.method.needs, self.device
        with torch.inference_mode():
            if self.teacher_cache is not None:  # the frozen teacher's logits, cached
                logits = self.teacher_cache.logits_for(batch["example_ids"], device)
                out = task.from_logits(logits)
            else:
                out = task.forward(self.teacher, batch, needs, device)
            if augmented is not None:
                out = out.with_augmented(task.forward(self.teacher, augmented, needs, device))
            return out.as_float() if self.teacher_dtype is not None else out

    def _forward_backward(
        self, batch: dict[str, torch.Tensor], weight: float
    ) -> tuple[torch.Tensor, Mapping[str, float | torch.Tensor]]:
        device, method, task = self.device, self.method, self.task
        dtype = self.autocast_dtype
        with torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            augmented = None
            if method.needs.augmented and self.dist is not None and method.sees_global_batch:
                augmented = method.augment(self.global_batch)  # each rank takes its shard
                if augmented is not None:
                    augmented = self.dist.shard(augmented)[0]
            elif method.needs.augmented:
                augmented = method.augment(batch)
            t_out = self._teacher_outputs(batch, augmented)
            s_out = task.forward(self.student, batch, method.needs, device)
            if augmented is not None:
                s_aug = task.forward(self.student, augmented, method.needs, device)
                s_out = s_out.with_augmented(s_aug)
            targets = task.targets(batch, device)
            res = method.loss(s_out, t_out, targets, batch["attention_mask"].to(device))
        if self.dist is None:
            (res.total / self.cfg.grad_accumulation_steps).backward()
            return res.total.detach(), {k: _detached(v) for k, v in res.parts.items()}
        names = list(res.parts)
        means = self.dist.mean_losses(
            [float(res.total.detach()) * weight, *(float(res.parts[k]) * weight for k in names)]
        )
        if math.isfinite(means[0]):  # every rank sees the same mean: all skip, or none
            (res.total * weight / self.cfg.grad_accumulation_steps).backward()
        return torch.tensor(means[0]), dict(zip(names, means[1:], strict=True))

    def generator_steps(self, run: _StageRun, batch: dict[str, torch.Tensor]) -> None:
        """Run the method's generator (max) steps due before the stage's next student step and
        report the divergence they reached (a ``generator`` phase progress report and log
        record, read back once per block). Nothing happens for a method without a generator
        (``needs.generator`` False)."""
        if not self.method.needs.generator or run.step >= run.n_steps:
            return
        n = self.method.generator_steps(run.step)
        if not n:
            return
        self.generator_block += 1
        values = _read_back([self.method.generator_step(batch) for _ in range(n)])
        sums: dict[str, float] = {}
        for row in values:
            for k, v in row.items():
                sums[k] = sums.get(k, 0.0) + v
        means = {k: v / n for k, v in sums.items()}
        label = self.method.stage_label()
        self.hooks.log(
            {"event": "generator", "stage": label, "step": self.step, "steps": n, **means}
        )
        if self.generator_block % max(1, self.hooks.every) == 1 or self.hooks.every == 1:
            self.hooks.on_progress(run.progress(label, means, phase="generator"))


def _detached(v: float | torch.Tensor) -> float | torch.Tensor:
    return v.detach() if isinstance(v, torch.Tensor) else v


def _read_back(rows: list[Mapping[str, float | torch.Tensor]]) -> list[dict[str, float]]:
    """Named values (0-d tensors or floats) as floats, in order, the tensors read back in one
    transfer (gathered on the first tensor's device)."""
    tensors = [v for row in rows for v in row.values() if isinstance(v, torch.Tensor)]
    if not tensors:
        return [{k: float(v) for k, v in row.items()} for row in rows]
    device = tensors[0].device
    stacked = torch.stack([t.detach().float().reshape(()).to(device) for t in tensors])
    values = iter(stacked.tolist())
    return [
        {k: next(values) if isinstance(v, torch.Tensor) else float(v) for k, v in row.items()}
        for row in rows
    ]


class _StageRun:
    """One stage of a run, step by step: :meth:`begin` (freeze what the stage does not train,
    the method's stage, a fresh optimiser; or what a checkpoint of the stage holds), then
    epochs of micro-steps (:meth:`micro_step`) and optimiser steps (:meth:`optimizer_step`)
    with their progress reports, dev evaluations (:meth:`evaluate`) and checkpoints
    (:meth:`checkpoint_if_due`), then :meth:`end` (the stage's best weights restored, its
    summary, a stage-end checkpoint).

    Counters here are the stage's own (``step``, ``epoch``); the job's are on the loop.
    ``sums`` and ``n_micro`` are the epoch's loss sums and micro-steps read back so far;
    ``pending`` holds those not read back yet.
    """

    def __init__(
        self, loop: _Loop, index: int, generator: torch.Generator, resume: LoopState | None
    ) -> None:
        self.loop, self.index, self.generator, self.resume = loop, index, generator, resume
        self.stage = loop.stages[index]
        self.n_steps = loop.steps[index]
        self.n_batches = num_batches(len(loop.train_data), loop.cfg.batch_size)
        stage_trains = self.stage.trains
        self.trains = (
            set(stage_trains) if stage_trains is not None else {g.name for g in loop.groups}
        )
        self.step = self.epoch = 0
        self.best: dict[str, float] = {}  # the stage's best dev metrics
        self.sums: dict[str, float] = {}
        self.n_micro = 0
        self.pending = _Losses()
        self.skip = 0  # micro-batches of the current epoch consumed before a checkpoint
        self.epoch_start = generator.get_state()  # the data order's state at the epoch start
        self.started = time.perf_counter()

    # --- the stage, start to end --------------------------------------------------------

    def run(self) -> None:
        """Run the stage (from its checkpoint, when resuming within it)."""
        self.begin()
        while self.step < self.n_steps:
            self.run_epoch()
        self.end()

    def begin(self) -> None:
        """Freeze the groups the stage does not train, start the method's stage and build the
        optimiser, or restore all of it from a checkpoint (one taken at the previous stage's
        end, or within this stage)."""
        loop, r, stage = self.loop, self.resume, self.stage
        active = [g for g in loop.groups if g.name in self.trains]
        self.frozen = [p for g in loop.groups if g.name not in self.trains for p in g.parameters()]
        for p in self.frozen:
            p.requires_grad_(False)
        mid_stage = r is not None and r.mid_stage
        if r is not None and not mid_stage:  # a stage-end checkpoint: the stage begins now
            loop.method.load_extra_state(r.method_extra)
            set_rng_state(r.rng)
        loop.method.begin_stage(stage)
        if not mid_stage:
            loop.generator_block = 0
        self.optimizer, self.scheduler = loop._optimizer(stage, active)
        max_norm = loop.cfg.max_grad_norm
        self.clip = [(g.parameters(), g.max_grad_norm or max_norm) for g in active]
        if not mid_stage:
            record = {"stage": stage.name, "index": self.index + 1, "steps": self.n_steps}
            loop.hooks.log({"event": "stage", **record})
        self.started = time.perf_counter()
        if r is not None and mid_stage:
            self._resume_within(r)

    def _resume_within(self, r: LoopState) -> None:
        """Continue from a checkpoint taken within this stage: optimiser, scheduler, method
        state, counters, the epoch's loss sums, the data order and the RNGs."""
        assert r.optimizer is not None and r.scheduler is not None
        self.optimizer.load_state_dict(r.optimizer)
        self.scheduler.load_state_dict(r.scheduler)
        self.loop.method.load_extra_state(r.method_extra)
        self.step, self.epoch = r.stage_step, r.stage_epoch
        self.best = dict(r.stage_best)
        self.sums, self.n_micro, self.skip = dict(r.sums), r.n_micro, r.micro_next
        self.epoch_start = r.data_generator
        set_rng_state(r.rng)

    def run_epoch(self) -> None:
        """One epoch (or the rest of one, when resuming), its evaluation and cancel check."""
        loop, cfg = self.loop, self.loop.cfg
        if self.skip:  # resuming within this epoch: its counters and sums are restored
            self.generator.set_state(self.epoch_start)
        else:
            loop.epoch += 1
            self.epoch += 1
            self.sums, self.n_micro = {}, 0
            self.epoch_start = self.generator.get_state()
        data = batches(
            loop.train_data, cfg.batch_size, loop.pad_id, self.generator, cfg.group_by_length
        )
        for micro, batch in enumerate(data):
            if micro < self.skip:  # consumed before the checkpoint
                continue
            self.micro_step(micro, batch)
            if not self._group_ends(micro):
                continue
            self.optimizer_step()
            reported = self.step % loop.hooks.every == 0 or self.step == self.n_steps
            if reported:
                self.report()
            if self._evaluation_due(micro):
                self.read_losses()
                self.evaluate("step")
            self.checkpoint_if_due(micro, reported)
            if self.step >= self.n_steps:
                break
        self.skip = 0
        self.read_losses()
        if self.stage.evaluates:
            self.evaluate("epoch_end")
        if loop.hooks.should_stop():
            raise Cancelled()

    def end(self) -> None:
        """Unfreeze, restore the stage's best weights if it asks, record its summary, and write
        a stage-end (or pause) checkpoint unless it was the job's last stage."""
        loop, stage, cfg = self.loop, self.stage, self.loop.cfg
        for p in self.frozen:
            p.requires_grad_(True)
        if stage.restore_best:
            loop.restore_best()
        summary: dict[str, object] = {
            "name": stage.name,
            "index": self.index + 1,
            "loss": stage.loss,
            "steps": self.step,
            "epochs": self.epoch,
            "learning_rate": loop._stage_lr(stage),
            "schedule": stage.schedule or cfg.schedule,
            "trains": sorted(self.trains),
            "selects_best": stage.selects_best,
            "restored_best": stage.restore_best,
            "best_dev": dict(self.best),
            "seconds": time.perf_counter() - self.started,
        }
        loop.result.stages.append(summary)
        loop.hooks.log({"event": "stage_end", **summary})
        ckpt = loop.checkpointer
        if ckpt is None:
            return
        last = self.index == len(loop.stages) - 1 and ckpt.hop == ckpt.num_hops
        if not last and loop.hooks.should_pause():
            loop._checkpoint(self.snapshot(False, 0), "pause")
        elif not last and ckpt.policy.at_stage_end:
            loop._checkpoint(self.snapshot(False, 0), "stage_end")

    # --- steps --------------------------------------------------------------------------

    def micro_step(self, micro: int, batch: dict[str, torch.Tensor]) -> None:
        """Micro-batch ``micro`` of the epoch: this rank's shard of it, the generator steps
        due before its accumulation group, the method's per-step hooks, forward and backward;
        its losses are kept, not read back."""
        loop, cfg = self.loop, self.loop.cfg
        weight = 1.0
        if loop.dist is not None:  # this rank's slice of the global batch
            loop.global_batch = batch
            batch, weight = loop.dist.shard(batch)
        if micro % cfg.grad_accumulation_steps == 0:
            loop.generator_steps(self, batch)
        loop.method.start_step(loop.epoch, loop.step)
        sees_all = loop.dist is not None and loop.method.sees_global_batch
        loop.method.start_batch(loop.global_batch if sees_all else batch)
        total, parts = loop.micro_step(batch, weight)
        self.pending.add(loop.step, total, parts)

    def _group_ends(self, micro: int) -> bool:
        """Whether micro-batch ``micro`` ends an accumulation group: every
        ``grad_accumulation_steps`` micro-batches, and the epoch's last one (a partial group),
        so that each epoch takes the same number of steps."""
        accumulation = self.loop.cfg.grad_accumulation_steps
        return (micro + 1) % accumulation == 0 or micro + 1 >= self.n_batches

    def optimizer_step(self) -> None:
        """Clip each group's gradients (on several ranks, averaged over the ranks first: the
        global batch's gradients), step the optimiser and the schedule."""
        if self.loop.dist is not None:
            self.loop.dist.average_gradients(p for params, _ in self.clip for p in params)
        for params, max_norm in self.clip:
            torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.loop._materialise()  # the weights are about to change
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loop.step += 1
        self.step += 1

    def read_losses(self) -> None:
        """Read the pending losses back into the epoch's sums (deferred read-back)."""
        self.n_micro += self.pending.flush(self.sums, self.stage.name)

    def report(self) -> None:
        """Progress and a ``step`` log record with the epoch's mean losses so far; then the
        cancel check."""
        loop = self.loop
        self.read_losses()
        losses = {k: v / self.n_micro for k, v in self.sums.items()}
        label = loop.method.stage_label()
        phase = "student" if loop.generator_block else ""
        loop.hooks.on_progress(self.progress(label, losses, phase=phase))
        loop.hooks.log(
            {"event": "step", "stage": label, "epoch": loop.epoch, "step": loop.step}
            | losses
            | {"lr": self.scheduler.get_last_lr()[0]}
        )
        if loop.hooks.should_stop():
            raise Cancelled()

    def progress(self, label: str, losses: dict[str, float], phase: str = "") -> Progress:
        """A progress report of this stage at its current step."""
        loop = self.loop
        return Progress(
            label,
            loop.epoch,
            loop.step,
            loop.total,
            losses,
            stage_epoch=self.epoch,
            stage_step=self.step,
            stage_steps=self.n_steps,
            stage_index=self.index + 1,
            num_stages=len(loop.stages),
            phase=phase,
        )

    # --- evaluate and select ------------------------------------------------------------

    def _evaluation_due(self, micro: int) -> bool:
        """An evaluation every ``eval_every_steps`` steps of a stage that evaluates, unless the
        epoch's end (which evaluates anyway) comes next."""
        every = self.loop.cfg.eval_every_steps or self.stage.eval_every_steps
        return bool(
            every
            and self.stage.evaluates
            and self.step % every == 0
            and self.step < self.n_steps
            and micro + 1 < self.n_batches
        )

    def evaluate(self, at: str) -> None:
        """Evaluate the student on the dev set (``at``: ``step`` or ``epoch_end``), record it
        in the history, the log and progress, and update the stage's best and the loop's
        selection (:meth:`_Loop.select`)."""
        loop = self.loop
        dev = loop._dev_metrics()
        metric = selection_metric(loop.cfg, dev)
        score = dev[metric]
        record: dict[str, object] = {
            "stage": loop.method.stage_label(),
            "stage_index": self.index + 1,
            "epoch": loop.epoch,
            "stage_epoch": self.epoch,
            "step": loop.step,
            "stage_step": self.step,
            "at": at,
            "train_loss": self.sums.get("loss", 0.0) / max(1, self.n_micro),
            "train_losses": {k: v / max(1, self.n_micro) for k, v in self.sums.items()},
            "dev": dev,
            "seconds": time.perf_counter() - loop.started,
        }
        loop.result.history.append(record)
        loop.hooks.log({"event": "epoch" if at == "epoch_end" else "evaluation", **record})
        loop.hooks.on_progress(self.progress("evaluate", {f"dev_{metric}": score}))
        if not self.best or score > self.best[metric]:
            self.best = dict(dev)
        loop.select(self.stage, dev, score)

    # --- checkpoints --------------------------------------------------------------------

    def checkpoint_if_due(self, micro: int, reported: bool) -> None:
        """After an optimiser step that is not the stage's last: a ``pause`` checkpoint when
        one is asked for (checked with the report), else an ``interval`` one when the policy
        says so."""
        loop = self.loop
        ckpt = loop.checkpointer
        if ckpt is None or self.step >= self.n_steps:
            return
        reason: str | None = None
        if reported and loop.hooks.should_pause():
            reason = "pause"
        elif ckpt.due(loop.step):
            reason = "interval"
        if loop.dist is not None:  # rank 0's decision (a timer differs by rank)
            reason = loop.dist.broadcast(reason)
        if reason is None:
            return
        self.read_losses()
        loop._checkpoint(self.snapshot(True, micro + 1), reason)

    def snapshot(self, mid_stage: bool, micro_next: int) -> LoopState:
        """The run's state for a checkpoint within the stage (resuming at micro-batch
        ``micro_next`` of the epoch) or at its end (the next stage starts afresh)."""
        counters: dict[str, object] = {
            "stage_step": self.step,
            "stage_epoch": self.epoch,
            "micro_next": micro_next,
            "n_micro": self.n_micro,
            "sums": dict(self.sums),
            "stage_best": dict(self.best),
        }
        loop = self.loop
        if mid_stage:
            return loop._snapshot(
                self.index, True, self.epoch_start, self.optimizer, self.scheduler, counters
            )
        return loop._snapshot(
            self.index + 1, False, self.generator.get_state(), None, None, counters
        )
