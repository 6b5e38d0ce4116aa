"""What every KD method provides: a typed config, a pure fit check, its stages and a loss.

Checking is not building: :meth:`Method.check` looks only at model *shapes* and the training
settings and allocates nothing (the API calls it before a job is queued); the constructor builds
the method's modules (projections, probes) already bound to the models (the worker calls it
through :func:`kd_engine.registry.build`). Both raise :class:`~kd_engine.errors.SpecError`
naming the spec field at fault.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

import torch

from kd_engine.errors import SpecError
from kd_engine.spec_fields import SpecModel
from kd_engine.stages import ParamGroup, Stage

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kd_engine.data.batching import Encoded
    from kd_engine.models.shapes import ModelShape
    from kd_engine.spec import TrainingSpec


class MethodConfig(SpecModel):
    """Base of every method's settings; ``name`` is the discriminator in the job spec. Like
    every spec section, unknown settings and strings with control characters are refused."""

    name: str


C = TypeVar("C", bound=MethodConfig)


def config_as(config: MethodConfig, cls: type[C]) -> C:
    """``config`` narrowed to the method's own config class.

    Raises:
        TypeError: ``config`` is another method's settings (a programming error).
    """
    if not isinstance(config, cls):
        raise TypeError(f"expected {cls.__name__}, got {type(config).__name__}")
    return config


@dataclass
class StepOutputs:
    """What one forward pass of a model gives a method's loss.

    The loop never reads inside it: a task family (:mod:`kd_engine.tasks`) makes it from a
    model's output, and the loop only casts it (:meth:`as_float`) and attaches the outputs on
    an augmented batch (:meth:`with_augmented`). What ``logits`` holds is the task's: (B, C)
    over classes for sequence classification (the one family today); a causal-LM family would
    give (B, T, V) over a vocabulary per position.

    Attributes:
        logits: the model's logits: (B, C) for classification.
        hidden_states: per layer (embeddings first), each (B, T, d); None unless requested.
        attentions: per layer, each (B, heads, T, T); None unless requested. Softmax
            probabilities, or the pre-softmax scores (padding mask added) for a method whose
            ``needs.attention_scores`` is True.
        augmented: the same model's outputs on the augmented batch of the step (B', C), when
            the method's :meth:`Method.augment` made one (MATE-KD's x', Minimax-kNN's
            neighbours); None otherwise.
    """

    logits: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    augmented: StepOutputs | None = None

    def as_float(self) -> StepOutputs:
        """The same outputs in fp32 (a half-precision teacher's, for the losses)."""

        def f(xs: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, ...] | None:
            return tuple(x.float() for x in xs) if xs is not None else None

        res = StepOutputs(self.logits.float(), f(self.hidden_states), f(self.attentions))
        if self.augmented is not None:
            res.augmented = self.augmented.as_float()
        return res

    def with_augmented(self, augmented: StepOutputs) -> StepOutputs:
        """These outputs with the same model's outputs on the step's augmented batch."""
        return dataclasses.replace(self, augmented=augmented)


@dataclass(frozen=True)
class Needs:
    """What a method needs the loop to compute at each training step, declared as data.

    Attributes:
        teacher: run the teacher's forward pass on the batch (x); False: the loss gets
            ``teacher=None`` (fine-tuning, Tf-KD's virtual teacher).
        hidden_states: both models report their hidden states (per layer, embeddings first).
        attentions: both models report their attention maps.
        attention_scores: with ``attentions``, the maps are the pre-softmax scores (padding
            mask added) rather than probabilities (:mod:`kd_engine.models.attention_scores`).
        augmented: at each student step the loop asks :meth:`Method.augment` for an augmented
            batch x' and, when it gives one, runs both models on it too (with the same
            outputs); the loss finds them in ``StepOutputs.augmented``.
        generator: the method has an adversary whose max steps run before student steps
            (:meth:`Method.generator_steps`, :meth:`Method.generator_step`).
        models: the method runs the models itself (a generator's max steps, neighbour
            selection) and gets them through :meth:`Method.bind` before training.
    """

    teacher: bool = True
    hidden_states: bool = False
    attentions: bool = False
    attention_scores: bool = False
    augmented: bool = False
    generator: bool = False
    models: bool = False

    @property
    def teacher_inference_only(self) -> bool:
        """True when the loop's forward passes are the only use of the teacher (the method
        neither runs it itself, nor augments, nor has a generator): only then may the teacher
        run in half precision (``training.precision``); a generator's gradients through the
        teacher, or embeddings a method computes with it, stay fp32."""
        return not (self.models or self.augmented or self.generator)


@dataclass
class Resources:
    """What a method that runs models itself (an augmentation method: a generator's max steps,
    neighbour selection) gets from the hop before training, through :meth:`Method.bind`.

    Attributes:
        student: the student being trained (the loop trains it; the method only reads it).
        teacher: the hop's teacher (never trained), or None.
        device: where both models run.
        pad_id: the tokenizer's padding id.
        mask_id: the tokenizer's mask token id ([MASK]), or None when it has none.
        special_ids: ids of the tokenizer's special tokens ([CLS], [SEP], [PAD], [MASK], ...).
        generator_path: local directory (or hub id) of the masked-LM checkpoint the method's
            ``generator`` setting names, or None.
        corpus: the unlabelled corpus the method's ``corpus`` setting names, encoded like the
            transfer set (labels are unused), or None.
        training: the job's training settings (batch size and sequence length size the memory
            check), or None.
    """

    student: PreTrainedModel
    teacher: PreTrainedModel | None
    device: torch.device
    pad_id: int
    mask_id: int | None = None
    special_ids: frozenset[int] = frozenset()
    generator_path: str | None = None
    corpus: Encoded | None = None
    training: TrainingSpec | None = None


LossParts = dict[str, torch.Tensor]
"""Named parts of a loss, for logs and progress: detached 0-d tensors, still on the device
(the loop reads them back in one transfer when it reports, never once per micro-step)."""


@dataclass
class LossResult:
    """The loss to back-propagate and its named parts.

    Attributes:
        total: the 0-d loss tensor (with its graph).
        parts: its named parts, detached 0-d tensors (:data:`LossParts`).
    """

    total: torch.Tensor
    parts: LossParts = field(default_factory=dict)


class Method(ABC):
    """One KD method bound to a teacher and a student shape.

    ``needs`` (:class:`Needs`) tells the loop what to compute at each step: which models run,
    which of their outputs the loss reads, on which batches, and whether the method has an
    adversary or runs the models itself. ``any_student_architecture`` is True for a method
    whose intermediate-layer matching works for students that are not transformers (BiLSTM,
    CNN). ``config_cls`` is the method's settings class.

    The loop calls every hook below unconditionally (the defaults do nothing); what it computes
    for the method is decided by ``needs`` alone, never by which hooks a class overrides.

    Per-job state lives on the instance, never on the class: a worker runs many jobs.
    """

    needs: ClassVar[Needs] = Needs()
    any_student_architecture: ClassVar[bool] = False
    sees_global_batch: ClassVar[bool] = False
    """On several ranks (:mod:`kd_engine.ranks`), True when :meth:`start_batch` and
    :meth:`augment` get the global batch rather than this rank's shard, so that the method's
    random draws (masks, samples) are those of one process and its state stays the same on
    every rank; :meth:`augment` must then return one row per row of its batch, in order (the
    loop gives each rank its shard of it), and a loss computed from :meth:`start_batch`'s batch
    is computed on every rank (its weighted mean is still the global batch's gradient)."""
    config_cls: ClassVar[type[MethodConfig]] = MethodConfig

    def __init__(self, config: MethodConfig, teacher: ModelShape, student: ModelShape) -> None:
        """Build the method for these models (call :meth:`check` first; the registry does).

        Args:
            config: the method's settings (an instance of ``config_cls``).
            teacher, student: the models' shapes.
        """
        self.config = config_as(config, self.config_cls)
        self.teacher_shape = teacher
        self.student_shape = student
        self.stage: Stage | None = None

    @classmethod
    def check(
        cls,
        config: MethodConfig,
        teacher: ModelShape,
        student: ModelShape,
        training: TrainingSpec,
    ) -> None:
        """Check that the method fits these model shapes and training settings, allocating
        nothing. Subclasses extend it (and call ``super().check``).

        Raises:
            SpecError: the models or settings do not fit, naming the field.
        """
        check_student_architecture(cls, config.name, student)

    def stages(self, training: TrainingSpec) -> list[Stage]:
        """The method's stages, in order (default: one stage of ``training.epochs`` epochs with
        the job's optimiser settings)."""
        return [Stage(name="train", epochs=training.epochs)]

    def begin_stage(self, stage: Stage) -> None:
        """Called by the loop when ``stage`` starts (before its optimiser is built)."""
        self.stage = stage

    def stage_label(self) -> str:
        """What progress shows for the current step: the stage's name (a method whose loss
        changes within a stage, such as Annealing-KD's temperature, says more)."""
        return self.stage.name if self.stage is not None else ""

    def prepare(self, train_data: Encoded) -> None:  # noqa: B027
        """Called once before the first stage with the encoded transfer set (its ``labels`` and
        ``ids``); a method that keeps per-example state (a memory bank indexed by example, the
        class of every example for class-conditional negatives) sets it up here."""

    def start_batch(self, batch: dict[str, torch.Tensor]) -> None:  # noqa: B027
        """Called before each micro-batch's loss with the collated batch (``example_ids`` (B,)
        int64 are the examples' row ids in the transfer set; ``labels`` (B,))."""

    def start_step(self, epoch: int, step: int) -> None:  # noqa: B027
        """Called before each training step's loss (epoch 1-based over the whole job, step =
        optimiser steps taken so far in the job); methods with schedules use it."""

    def bind(self, resources: Resources) -> None:  # noqa: B027
        """Called by the hop before training with the models and what else the method's
        settings name (a generator checkpoint, an unlabelled corpus). An augmentation method
        builds its generator or neighbour index here.

        Raises:
            SpecError: what the settings name cannot be used (names the field), or the job
                cannot fit in the worker's memory (names the setting to lower).
        """

    def augment(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """An augmented batch for the current student step (called after :meth:`start_batch`
        with the same batch), or None. When a batch is returned the loop runs the teacher and
        the student on it too, and the loss finds their outputs in ``StepOutputs.augmented``.

        The returned batch holds ``input_ids`` and ``attention_mask`` (B', T') int64, and
        ``token_type_ids`` when the models use them."""
        return None

    def generator_steps(self, stage_step: int) -> int:
        """How many generator (max) steps to run before the student's optimiser step number
        ``stage_step`` (0-based within the stage) of the current stage; 0 for a method with no
        adversary (every method but the MATE-KD family)."""
        return 0

    def generator_step(self, batch: dict[str, torch.Tensor]) -> LossParts:
        """One generator (max) step on ``batch``: the method updates its own generator with its
        own optimiser and returns the named values to report (the divergence reached), as
        detached 0-d tensors that the loop reads back when it reports. Never leaves gradients
        on the student or the teacher.

        Raises:
            NotImplementedError: the method has no generator (it returned 0 steps).
        """
        raise NotImplementedError(f"{self.config.name} has no generator")

    def augmentation_samples(self) -> list[dict[str, object]]:
        """Examples of augmented inputs for the job's artifacts, as token ids: each record has
        ``original`` and ``augmented`` (lists of ids; the hop decodes them), and may carry more
        (``stage``, ``step``, ``replaced`` positions, ``kl``). Empty for methods that do not
        augment."""
        return []

    def report(self) -> dict[str, object]:
        """What the method has to say about the hop after training, for ``metrics.json``
        (the hop's ``method_report``) and the training log (a ``method_report`` record): an
        augmentation method's corpus and candidate counts. Empty for most methods."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """The method's own state that is not a parameter of :meth:`param_groups` and changes
        during training (RNG generators, memory banks, schedules, counters), for a checkpoint.
        Values are tensors, plain Python data (JSON-like), or nested dicts/lists of them.
        Default: nothing."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:  # noqa: B027
        """Restore what :meth:`extra_state` returned (called on resume after :meth:`bind` and
        :meth:`prepare`, before the loop continues). Default: nothing."""

    def param_groups(self) -> list[ParamGroup]:
        """The method's own trainable modules (projections, probes) as named groups; the loop
        adds the student's group (:data:`~kd_engine.stages.STUDENT`)."""
        return []

    def schedule_warnings(self, stage_steps: list[int]) -> list[str]:
        """Warnings about a schedule that runs but cannot do what the settings ask, given the
        optimiser steps of each stage (after ``training.max_steps``). Recorded in
        ``metrics.json`` (``warnings``) and the training log."""
        return []

    @abstractmethod
    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        """Return the training loss of the current stage for one batch.

        Args:
            student: student outputs, logits (B, C).
            teacher: teacher outputs (None when ``needs.teacher`` is False).
            labels: (B,) gold class ids (float targets for regression).
            attention_mask: (B, T), 1 for real tokens and 0 for padding.
        """


def check_student_architecture(method: type[Method], name: str, student: ModelShape) -> None:
    """Reject a non-transformer student for a method that matches transformer states.

    Raises:
        SpecError: ``student`` explaining why, when the method needs hidden states or
            attentions aligned token by token with a transformer's and the student is not one.
    """
    needs_states = method.needs.hidden_states or method.needs.attentions
    if needs_states and not student.transformer and not method.any_student_architecture:
        raise SpecError(
            "student",
            f"{name} matches the student's transformer hidden states or attention maps "
            "with the teacher's, layer by layer and token by token; this student is not a "
            "transformer and has none. Use universal_kd, or an output-only method such as "
            "vanilla_kd, for a BiLSTM or CNN student",
        )


def teacher_outputs(teacher: StepOutputs | None, method: str) -> StepOutputs:
    """The teacher's outputs of a step, which a KD loss cannot do without.

    Raises:
        ValueError: the loop ran the method without the teacher's forward pass.
    """
    if teacher is None:
        raise ValueError(f"{method} needs the teacher's outputs")
    return teacher
