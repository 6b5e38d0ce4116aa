"""What the MATE-KD family (``mate_kd``, ``cilda``, ``combined_kd``) shares: a masked-LM
generator, its max steps, and the rewritten inputs x' its min steps train on.

Rashid et al., "MATE-KD: Masked Adversarial TExt, a Companion to Knowledge Distillation",
ACL 2021, section 3; the authors' code is huawei-noah/Efficient-NLP
``MATE-KD/train_adversarial_student.py`` (read, not copied). Per step:

- mask: each real, non-special token with probability p (0.3, ``--p_value``), all chosen ones
  become [MASK] (:mod:`kd_engine.augment.masking`);
- the generator predicts the masked positions; a straight-through Gumbel-softmax sample (tau 1)
  rewrites them; each model reads the sample as one-hot @ its word-embedding matrix through its
  own embedding path (:mod:`kd_engine.augment.embedding_path`);
- max step (the generator): maximise D(T(x'), S(x')) (:mod:`kd_engine.losses.adversarial`) with
  its own AdamW (lr 5e-7, clipping 5: the authors' ``gen_optimizer`` and ``clip_grad_norm_``);
  gradients reach the generator only (never the teacher's or the student's weights);
- min step (the student): the method's loss on x and on x' (sampled again, without gradient,
  from the current generator);
- schedule: n_G generator steps, then n_S student steps (the authors' hard-coded 10 and 100).

Differences from the authors' code, all deliberate: every batch of an epoch trains the student
(the authors give 10 of every 110 batches to the generator only; here the generator draws its
own shuffled batches from the transfer set); the generator's LR is constant (the authors'
linear schedule runs over all steps but only steps in generator phases, so it ends near 91% of
its peak); the student's optimiser is the loop's AdamW (the authors' MATE-KD uses Adam with
``weight_decay`` 0: set ``training.weight_decay`` 0 to match). When the job names no generator
checkpoint, the generator is the teacher's encoder under a new MLM head, warmed up with MLM on
the transfer set as a stage of its own (the authors always load a pre-trained MLM:
distilroberta-base or BERT-mini).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from kd_engine.augment.embedding_path import forward_rewritten
from kd_engine.augment.generator import (
    generator_from_teacher,
    load_generator,
    masked_logits,
    mlm_loss,
    straight_through_sample,
)
from kd_engine.augment.masking import apply_mask, choose_positions
from kd_engine.augment.memory import ModelCost, available_bytes, check_fits, estimate_bytes
from kd_engine.augment.samples import SampleKeeper
from kd_engine.errors import SpecError
from kd_engine.losses.adversarial import GeneratorObjective, generator_divergence
from kd_engine.methods.base import (
    LossParts,
    LossResult,
    Method,
    MethodConfig,
    Needs,
    Resources,
    StepOutputs,
)
from kd_engine.ranks import current as current_rank
from kd_engine.stages import STUDENT, ParamGroup, Stage

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kd_engine.data.batching import Encoded
    from kd_engine.models.shapes import ModelShape
    from kd_engine.spec import TrainingSpec

GENERATOR = "generator"
"""Name of the generator's parameter group (trained by the loop only in the MLM warm-up)."""
WARMUP, ADVERSARIAL = "mlm", "adversarial"


class AdversarialConfig(MethodConfig):
    """Settings shared by the MATE-KD family (defaults: the authors' code,
    huawei-noah/Efficient-NLP ``MATE-KD/train_adversarial_student.py``, unless said otherwise).

    Attributes:
        generator: a masked-LM checkpoint reference (``builtin:``, ``file://``, ``job:``,
            ``hf://``) whose vocabulary is the teacher's; None builds one from the teacher's
            encoder and warms it up first (our choice; see the module docstring).
        generator_layers: with no ``generator``: how many of the teacher's first layers the
            built generator keeps (None: all). Fewer cost less memory and time.
        generator_warmup_epochs: with no ``generator``: epochs of MLM on the transfer set that
            train the new head (and the copied encoder) before the adversarial stage (our
            choice: 1).
        generator_warmup_learning_rate: peak LR of that warm-up, linear decay (our choice: 5e-5,
            BERT's fine-tuning range).
        mask_probability: p, chance that each real non-special token is masked (``--p_value``
            default 0.3).
        gumbel_temperature: tau of the straight-through Gumbel-softmax (the authors' 1.0).
        generator_learning_rate: the generator's AdamW LR in max steps (the authors' 5e-7).
        generator_max_grad_norm: the generator's gradient clipping in max steps (the authors' 5).
        generator_steps: n_G, max steps per cycle (the authors' ``n_generator_iter`` 10).
        student_steps: n_S, student optimiser steps per cycle (``n_student_iter`` 100).
        generator_objective: ``kl`` (the paper) or ``cross_entropy`` (the authors' code); see
            :data:`kd_engine.losses.adversarial.GeneratorObjective`.
        temperature: tau of every KL term (the authors' ``KL_temperature`` 1.0).
    """

    generator: str | None = Field(None, min_length=1, max_length=2048)
    generator_layers: int | None = Field(None, ge=1, le=48)
    generator_warmup_epochs: int = Field(1, ge=1, le=50)
    generator_warmup_learning_rate: float = Field(5e-5, gt=0.0, le=1.0)
    mask_probability: float = Field(0.3, gt=0.0, le=1.0)
    gumbel_temperature: float = Field(1.0, gt=0.0, le=100.0)
    generator_learning_rate: float = Field(5e-7, gt=0.0, le=1.0)
    generator_max_grad_norm: float = Field(5.0, gt=0.0)
    generator_steps: int = Field(10, ge=1, le=10_000)
    student_steps: int = Field(100, ge=1, le=100_000)
    generator_objective: GeneratorObjective = "kl"
    temperature: float = Field(1.0, gt=0.0, le=100.0)


class AdversarialMethod(Method):
    """Base of the MATE-KD family: the generator, its warm-up, max steps and x' (see the module
    docstring). Subclasses give the stages after the warm-up and the losses."""

    needs = Needs(models=True, augmented=True, generator=True)
    sees_global_batch = True
    config: AdversarialConfig
    objective_name: Literal["generator_kl", "generator_mse"] = "generator_kl"

    def __init__(self, config: MethodConfig, teacher: ModelShape, student: ModelShape) -> None:
        """Nothing is built until :meth:`bind` (the generator needs the teacher's weights)."""
        super().__init__(config, teacher, student)
        self.generator: PreTrainedModel | None = None
        self.resources: Resources | None = None
        self.train_data: Encoded | None = None
        self.rng: torch.Generator | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.batch: dict[str, torch.Tensor] | None = None
        self._stream: list[int] = []
        self.samples = SampleKeeper()
        n_g = self.config.generator_steps
        self.n_generator: int = n_g if isinstance(n_g, int) else 10  # n_G (cilda resolves it)
        self._stage_step = 0
        if student.num_labels == 1:
            self.objective_name = "generator_mse"

    @classmethod
    def check(
        cls,
        config: MethodConfig,
        teacher: ModelShape,
        student: ModelShape,
        training: TrainingSpec,
    ) -> None:
        """The built generator's layers must exist in the teacher.

        Raises:
            SpecError: ``method.generator_layers`` beyond the teacher's layers, or set together
                with ``method.generator``.
        """
        super().check(config, teacher, student, training)
        c = config
        assert isinstance(c, AdversarialConfig)
        if c.generator_layers is not None:
            if c.generator is not None:
                raise SpecError(
                    "method.generator_layers",
                    "applies only to the generator built from the teacher; remove it or "
                    "method.generator",
                )
            if c.generator_layers > teacher.num_layers:
                raise SpecError(
                    "method.generator_layers",
                    f"the teacher has {teacher.num_layers} layers, fewer than {c.generator_layers}",
                )

    # --- binding -------------------------------------------------------------------------

    def bind(self, resources: Resources) -> None:
        """Load or build the generator on the job's device and check that teacher, student and
        generator fit in its memory.

        Raises:
            SpecError: ``teacher`` (no [MASK] token or no teacher), ``method.generator`` (not a
                masked LM, another vocabulary), ``training.batch_size`` (does not fit).
        """
        teacher = resources.teacher
        if teacher is None:
            raise SpecError("teacher", f"{self.config.name} needs the teacher")
        if resources.mask_id is None:
            raise SpecError(
                "teacher", "its tokenizer has no mask token, which the generator's inputs need"
            )
        vocab = int(teacher.config.vocab_size)
        if resources.generator_path is not None:
            generator = load_generator(resources.generator_path, vocab)
        else:
            generator = generator_from_teacher(teacher, self.config.generator_layers)
        if resources.training is not None:
            self._check_memory(resources, generator, vocab)
        self.generator = generator.to(resources.device).train()  # type: ignore[arg-type]
        self.resources = resources

    def _check_memory(self, resources: Resources, generator: PreTrainedModel, vocab: int) -> None:
        training = resources.training
        assert training is not None

        def cost(model: PreTrainedModel, trained: bool) -> ModelCost:
            cfg = model.config
            return ModelCost(
                parameters=sum(p.numel() for p in model.parameters()),
                trained=trained,
                hidden_size=int(getattr(cfg, "hidden_size", 0) or 0),
                num_layers=int(getattr(cfg, "num_hidden_layers", 0) or 0),
                backward=True,
            )

        models = [cost(resources.student, True), cost(generator, True)]
        if resources.teacher is not None:
            models.append(cost(resources.teacher, False))
        needed = estimate_bytes(models, training.batch_size, training.max_seq_length, vocab, 2)
        check_fits(needed, available_bytes(resources.device), self.config.name)

    def _bound(self) -> tuple[PreTrainedModel, Resources]:
        if self.generator is None or self.resources is None:
            raise RuntimeError(f"{self.config.name}: bind() must run before training")
        return self.generator, self.resources

    def param_groups(self) -> list[ParamGroup]:
        """The generator as group ``generator`` (trained by the loop only in the MLM warm-up;
        its max steps use the method's own optimiser)."""
        generator, _ = self._bound()
        return [
            ParamGroup(GENERATOR, [generator], max_grad_norm=self.config.generator_max_grad_norm)
        ]

    def warmup_stages(self) -> list[Stage]:
        """The MLM warm-up of a generator built from the teacher (none for a checkpoint)."""
        c = self.config
        if c.generator is not None:
            return []
        return [
            Stage(
                "generator warm-up",
                loss=WARMUP,
                epochs=c.generator_warmup_epochs,
                learning_rate=c.generator_warmup_learning_rate,
                warmup_ratio=0.0,
                schedule="linear",
                trains=(GENERATOR,),
                selects_best=False,
                evaluate=False,
            )
        ]

    def prepare(self, train_data: Encoded) -> None:
        """Keep the transfer set (the generator draws its own batches) and seed the method's
        random source from the loop's seeded global one."""
        self.train_data = train_data
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
        self.rng = torch.Generator().manual_seed(seed)

    def start_batch(self, batch: dict[str, torch.Tensor]) -> None:
        """Keep the batch (the MLM warm-up's loss reads its token ids)."""
        self.batch = batch

    def start_step(self, epoch: int, step: int) -> None:
        """Count the stage's student steps (for the samples' ``stage_step``)."""
        self._stage_step = step

    def extra_state(self) -> dict[str, Any]:
        """The method's random source, the generator's pending batch order, its own optimiser
        (max steps), the kept samples and the stage step (the generator's weights are a
        parameter group, saved with the others)."""
        return {
            "rng": self.rng.get_state() if self.rng is not None else None,
            "stream": list(self._stream),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "samples": self.samples.state(),
            "stage_step": self._stage_step,
            "n_generator": self.n_generator,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned (after :meth:`bind` and :meth:`prepare`).

        Raises:
            RuntimeError: bind() has not run.
        """
        generator, _ = self._bound()
        if state["rng"] is not None:
            self.rng = torch.Generator()
            self.rng.set_state(state["rng"])
        self._stream = [int(i) for i in state["stream"]]
        if state["optimizer"] is not None:
            params = list(generator.parameters())
            self.optimizer = torch.optim.AdamW(params, lr=self.config.generator_learning_rate)
            self.optimizer.load_state_dict(state["optimizer"])
        self.samples.load_state(state["samples"])
        self._stage_step = int(state["stage_step"])
        self.n_generator = int(state["n_generator"])

    def adversarial(self) -> bool:
        """Whether the current stage alternates generator and student steps."""
        return self.stage is not None and self.stage.loss != WARMUP

    # --- masking and sampling ------------------------------------------------------------

    def _device_batch(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # Imported here: kd_engine.data imports the job spec, whose method union needs every
        # method module registered first (this module is imported while they register).
        from kd_engine.evaluation import model_inputs

        _, res = self._bound()
        return model_inputs(batch, res.device)

    def _mask(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(positions, masked ids) for a device batch."""
        _, res = self._bound()
        positions = choose_positions(
            batch["input_ids"],
            batch["attention_mask"],
            res.special_ids,
            self.config.mask_probability,
            self.rng,
        )
        assert res.mask_id is not None
        return positions, apply_mask(batch["input_ids"], positions, res.mask_id)

    def _sample(
        self, batch: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """x' for a device batch: (the batch with the sampled ids, positions (B, T) bool,
        straight-through one-hot rows (M, V))."""
        generator, _ = self._bound()
        positions, masked = self._mask(batch)
        logits = masked_logits(
            generator, masked, batch["attention_mask"], positions, batch.get("token_type_ids")
        )
        tokens, one_hot = straight_through_sample(logits, self.config.gumbel_temperature)
        ids = batch["input_ids"].clone()
        ids[positions] = tokens
        return {**batch, "input_ids": ids}, positions, one_hot

    def _generator_batch(self) -> dict[str, torch.Tensor]:
        """The next batch of the generator's own shuffled pass over the transfer set."""
        from kd_engine.data.batching import collate  # see _device_batch

        _, res = self._bound()
        assert self.train_data is not None and res.training is not None
        size = min(res.training.batch_size, len(self.train_data))
        if len(self._stream) < size:
            self._stream = torch.randperm(len(self.train_data), generator=self.rng).tolist()
        rows, self._stream = self._stream[:size], self._stream[size:]
        return self._device_batch(collate(self.train_data, rows, res.pad_id))

    # --- the loop's hooks ----------------------------------------------------------------

    def generator_steps(self, stage_step: int) -> int:
        """n_G before every n_S-th student step of the adversarial stage(s)."""
        if not self.adversarial() or stage_step % self.config.student_steps:
            return 0
        return self.n_generator

    def generator_step(self, batch: dict[str, torch.Tensor]) -> LossParts:
        """One max step on a batch the generator draws itself (``batch`` is not used): sample
        x' with gradients, run both models on it through their embedding paths, ascend the
        divergence (:meth:`adversary_objective`) with the generator's own AdamW and clipping.
        Only the generator's parameters receive gradients.

        On several ranks every rank runs the same step (the method's random source, hence the
        generator's batch and masks, is the same on all: :attr:`sees_global_batch`) and the
        generator's gradients are averaged over the ranks before clipping, so that every rank
        keeps the same generator and optimiser state (equal gradients when the ranks' global
        random sources agree, as without dropout; their mean otherwise); the reported
        divergences are the ranks' mean."""
        generator, res = self._bound()
        assert res.teacher is not None
        params = [p for p in generator.parameters()]
        for p in params:
            p.requires_grad_(True)
        if self.optimizer is None:
            self.optimizer = torch.optim.AdamW(params, lr=self.config.generator_learning_rate)
        device_batch = self._generator_batch()
        with torch.enable_grad():
            x_prime, positions, one_hot = self._sample(device_batch)
            hidden = self.needs.hidden_states
            t_logits, t_states = forward_rewritten(res.teacher, x_prime, positions, one_hot, hidden)
            s_logits, s_states = forward_rewritten(res.student, x_prime, positions, one_hot, hidden)
            objective, parts = self.adversary_objective(
                StepOutputs(s_logits, s_states), StepOutputs(t_logits, t_states)
            )
            grads = torch.autograd.grad(-objective, params, allow_unused=True)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        ranks = current_rank()
        if ranks is not None:  # the same generator update on every rank (see the docstring)
            ranks.average_gradients(params)
            means = ranks.mean_losses([float(v) for v in parts.values()])
            parts = dict(zip(parts, (torch.tensor(m) for m in means), strict=True))
        torch.nn.utils.clip_grad_norm_(params, self.config.generator_max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return parts

    def adversary_objective(
        self, student: StepOutputs, teacher: StepOutputs
    ) -> tuple[torch.Tensor, LossParts]:
        """What the generator maximises on x' and the values to report: MATE-KD's
        D(T(x'), S(x')) at ``temperature``."""
        c = self.config
        d = generator_divergence(
            teacher.logits, student.logits, c.temperature, c.generator_objective
        )
        return d, {self.objective_name: d.detach()}

    def augment(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """x' for the student's step (adversarial stages only): the current generator's sample,
        without gradient. A few pairs are kept for the artifact."""
        if not self.adversarial():
            return None
        device_batch = self._device_batch(batch)
        with torch.no_grad():
            x_prime, positions, _ = self._sample(device_batch)
        self._keep_sample(device_batch, x_prime, positions)
        return x_prime

    def _keep_sample(
        self,
        batch: dict[str, torch.Tensor],
        x_prime: dict[str, torch.Tensor],
        positions: torch.Tensor,
    ) -> None:
        n = int(batch["attention_mask"][0].sum())
        record: dict[str, object] = {
            "stage": self.stage.name if self.stage is not None else "",
            "step": self._stage_step,
            "original": batch["input_ids"][0, :n].tolist(),
            "augmented": x_prime["input_ids"][0, :n].tolist(),
            "replaced": positions[0, :n].nonzero().squeeze(-1).tolist(),
        }
        self.samples.offer(record)

    def augmentation_samples(self) -> list[dict[str, object]]:
        """The first and the last kept (original, x') pairs, as token ids with the replaced
        positions."""
        return self.samples.records()

    # --- losses --------------------------------------------------------------------------

    def warmup_loss(self) -> LossResult:
        """MLM cross-entropy of the generator on the current batch's masked positions."""
        generator, _ = self._bound()
        assert self.batch is not None
        batch = self._device_batch(self.batch)
        positions, masked = self._mask(batch)
        loss = mlm_loss(
            generator,
            masked,
            batch["attention_mask"],
            batch["input_ids"],
            positions,
            batch.get("token_type_ids"),
        )
        return LossResult(total=loss, parts={"mlm": loss.detach()})


def trains_student(*extra: str) -> tuple[str, ...]:
    """The groups an adversarial stage's optimiser trains: the student and the method's own
    modules (the generator has its own optimiser)."""
    return (STUDENT, *extra)
