"""``codir``: CoDIR, contrastive distillation on intermediate representations with a memory
bank (Sun, Gan, Cheng, Fang, Wang and Liu, "Contrastive Distillation on Intermediate
Representations for Language Model Compression", EMNLP 2020; the finetuning-stage variant),
implemented after the authors' code: intersun/CoDIR, ``fairseq/criterions/
sentence_prediction_crd.py`` (CRIT), ``crd/criterion.py`` and ``crd/memory.py`` (after Tian et
al.'s CRD, ICLR 2020), ``fairseq/options.py::add_crd_args`` (OPT).

    L = (1 - beta) CE(y, softmax(z_s)) + beta tau^2 KL(softmax(z_t/tau) || softmax(z_s/tau))
        + w L_CRD                                                      (CRIT, forward)

Representations (CRIT, forward): the student's is the concatenation of the [CLS] states of ALL
its transformer layers; the teacher's that of ``teacher_layers``, by default every second layer
starting with the first (0-based 0, 2, 4, ...: the authors' ``inner_states[1::2]``, whose index 0
is the embeddings; 12 layers -> 1-based 1, 3, ..., 11, leaving out the teacher's last layer;
an odd depth keeps it). Each is mapped by its own Linear (with bias) to ``projection_size``
(128, OPT ``--crd_feat_dim``) and L2-normalised (``Embed``).

L_CRD (``CRDLoss``, ``ContrastMemory``, ``ContrastLoss``): two memory banks of N x u hold the
student's and the teacher's projected representation of every training example. For each
example b of the batch, K negatives (``negatives``, 100, OPT ``--nce_k``) are drawn from
examples of OTHER classes (CRIT ``sample_neg_idx``: uniformly, without replacement unless K is
at least the smallest other-class pool, then with replacement for all); with the example
itself as column 0,

    P^s_bj = exp(<M_t[r_bj], f_s(b)>/tau) / Z_s    (student anchor vs the teacher's bank)
    P^t_bj = exp(<M_s[r_bj], f_t(b)>/tau) / Z_t    (teacher anchor vs the student's bank)

with tau = 0.07 (``nce_t``) and Z set once, at the first batch, to the mean score times N
(``ContrastMemory``), and L_CRD = (NCE(P^s) + NCE(P^t)) / 2 with Tian et al.'s NCE loss
(eq. 18, noise 1/N; :func:`kd_engine.losses.codir.nce_loss`). After the scores, the banks move
towards the batch's representations with momentum 0.5 (``nce_m``) and are re-normalised.
Banks start uniform in +-1/sqrt(u/3), as ``ContrastMemory``. Gradients reach the student and
both projections (the teacher's through its anchor side).

Defaults and their sources:
- beta 0.5, tau 2: the defaults of the authors' GLUE launcher (intersun/CoDIR,
  ``run_glue_script.py``: ``--beta 0.5``, ``--T 2``; its CRD mode reuses the learning rate,
  batch size, T and beta of the best KD run) and the paper's finetuning setting as our methods
  design notes record it (the paper's text was not reachable to re-check). OPT's own defaults
  (kd_weight 1, temperature 1) would drop CE.
- w (``crd_weight``) 0.1: OUR choice. OPT's default 0.0 disables the method; the launcher
  requires it as an argument (no default) and the paper's value was not reachable (only its
  introduction). Scale: the authors' L_CRD is a per-example mean that fairseq then divides by
  the batch size again (its trainer scales gradients by 1/sample_size), so their w_code equals
  our w x B; 0.1 is w_code 1.6-3.2 at batch sizes 16-32. The NCE term starts near
  log(K + 1) + 1 ~ 5.6 nats, against about 0.7 for binary CE: 0.1 keeps it from swamping CE
  and KD.
- K 100, tau 0.07, momentum 0.5, projection 128: CRIT/OPT as above.

Memory (per job, on the training device): two float32 banks of N x u, i.e. 2 * 4 * N * u
bytes (SST-2, N = 67,349, u = 128: 69 MB), plus 4 * 8 * N bytes on the CPU (labels, ids
and row indexes). ``check`` cannot reject a large N (it does not know it).

Per-job state lives on the instance: :meth:`CoDIR.prepare` builds the banks from the transfer
set (``train_data.labels`` for the class pools, ``train_data.ids`` for the rows);
:meth:`CoDIR.start_batch` records the batch's ``example_ids``. Without ``prepare`` (the method
called on its own, e.g. in the registry's shape tests) there is no bank: the loss then falls
back to :func:`kd_engine.losses.codir.in_batch_class_nce` (negatives: the batch's examples of
other classes; softmax form). Training through the engine always has the bank.

Regression (one output) is rejected: class-conditional negatives are undefined without
classes (the authors' launcher passes ``--regression-target`` for STS-B, but their class pools
index a list by the float target, which cannot work).

Differences from the authors' code: the projections do not decay (the engine's rule; fairseq
decays every parameter with the model's weight decay), the negatives come from a seeded
generator (NumPy's global one there), repeated example ids are rejected, and the CE/KD terms
are batch means (as in fairseq after its 1/sample_size scaling).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from kd_engine.errors import SpecError
from kd_engine.losses import ce_loss, kd_loss
from kd_engine.losses.codir import in_batch_class_nce, memory_scores, momentum_update, nce_loss
from kd_engine.methods.base import (
    LossResult,
    Method,
    MethodConfig,
    Needs,
    StepOutputs,
    config_as,
    teacher_outputs,
)
from kd_engine.methods.layer_maps import TeacherLayerSet, check_layer, cls_pool, paired_states
from kd_engine.ranks import DistContext
from kd_engine.ranks import current as current_rank
from kd_engine.registry import register
from kd_engine.stages import ParamGroup

if TYPE_CHECKING:
    from kd_engine.data.batching import Encoded
    from kd_engine.models.shapes import ModelShape
    from kd_engine.spec import TrainingSpec


class CoDIRConfig(MethodConfig):
    """Settings of ``codir`` (sources in the module docstring).

    Attributes:
        teacher_layers: 0-based teacher layers whose [CLS] states are concatenated; None =
            every second layer from the first (0, 2, 4, ...; the authors' ``inner_states[1::2]``).
        projection_size: u, the width of both projections and of the memory banks (128).
        negatives: K, negatives drawn per example from other classes (100).
        contrast_temperature: tau of the contrastive scores (0.07).
        momentum: of the memory-bank update (0.5).
        kd_weight: beta; 1 - beta weighs CE (0.5).
        temperature: tau of the soft-target term (2).
        crd_weight: w, weight of L_CRD (0.1, our choice; see the module docstring).
    """

    name: Literal["codir"] = "codir"
    teacher_layers: TeacherLayerSet | None = Field(None, min_length=1, max_length=48)
    projection_size: int = Field(128, ge=1, le=8192)
    negatives: int = Field(100, ge=1, le=100_000)
    contrast_temperature: float = Field(0.07, gt=0.0, le=100.0)
    momentum: float = Field(0.5, ge=0.0, lt=1.0)
    kd_weight: float = Field(0.5, ge=0.0, le=1.0)
    temperature: float = Field(2.0, gt=0.0, le=100.0)
    crd_weight: float = Field(0.1, ge=0.0, le=1000.0)


def codir_teacher_layers(config: CoDIRConfig, num_teacher: int) -> tuple[int, ...]:
    """The teacher layers (0-based, sorted) whose [CLS] states CoDIR concatenates (pure; used
    by both :meth:`CoDIR.check` and the constructor).

    Default: every second layer starting with the first, ``range(0, n, 2)`` (the authors'
    ``inner_states[1::2]`` on n + 1 hidden states; 12 -> 0, 2, ..., 10, i.e. 1-based 1, 3, ...,
    11, without the last layer; 5 -> 0, 2, 4).

    Raises:
        SpecError: ``method.teacher_layers`` names a layer the teacher lacks.
    """
    if config.teacher_layers is None:
        return tuple(range(0, num_teacher, 2))
    for k in config.teacher_layers:
        check_layer("method.teacher_layers", k, num_teacher, "teacher")
    return tuple(config.teacher_layers)


@dataclass(frozen=True)
class ClassPools:
    """The rows of a transfer set grouped by class, to draw negatives of other classes.

    Attributes:
        labels: (N,) int64 class of every row.
        by_class: (N,) int64 rows sorted by class (stable).
        starts: class -> first position of its rows in ``by_class``.
        counts: class -> its number of rows.
    """

    labels: torch.Tensor
    by_class: torch.Tensor
    starts: dict[int, int]
    counts: dict[int, int]

    @classmethod
    def from_labels(cls, labels: Sequence[int | float]) -> ClassPools:
        """Group the rows 0..N-1 by their class.

        Raises:
            ValueError: a label is not an integer class id, or fewer than two classes occur
                (no example would have a negative).
        """
        if any(float(y) != int(y) for y in labels):
            raise ValueError("dataset: codir needs integer class labels (a classification task)")
        t = torch.tensor([int(y) for y in labels], dtype=torch.long)
        classes, counts = torch.unique(t, return_counts=True)
        if len(classes) < 2:
            raise ValueError(
                "dataset: codir draws each example's negatives from other classes, and the "
                "transfer set holds examples of one class only"
            )
        order = torch.argsort(t, stable=True)
        ends = torch.cumsum(counts, 0)
        starts = {int(c): int(e - n) for c, e, n in zip(classes, ends, counts, strict=True)}
        return cls(t, order, starts, {int(c): int(n) for c, n in zip(classes, counts, strict=True)})

    def __len__(self) -> int:
        return len(self.labels)

    def smallest_pool(self) -> int:
        """The fewest other-class rows any class has."""
        return len(self) - max(self.counts.values())

    def draw(
        self, rows: torch.Tensor, k: int, replace: bool, generator: torch.Generator
    ) -> torch.Tensor:
        """K negatives for each row, uniformly among the rows of the other classes (CRIT
        ``sample_neg_idx``: ``np.random.choice(cls_negative[y], K, replace)``).

        Without replacement, candidates are drawn uniformly with replacement and repeats are
        skipped, which gives a uniformly random K-subset.

        Args:
            rows: (B,) int64 rows of the anchors.
            k: K.
            replace: draw with replacement (needed when a pool is smaller than K).
            generator: a CPU generator (seeded by the caller).

        Returns:
            (B, K) int64 rows, on the CPU.

        Raises:
            ValueError: K exceeds a pool and ``replace`` is False.
        """
        out = torch.empty(len(rows), k, dtype=torch.long)
        for b, row in enumerate(rows.tolist()):
            c = int(self.labels[row])
            start, count = self.starts[c], self.counts[c]
            pool = len(self) - count
            if replace:
                pos = torch.randint(pool, (k,), generator=generator)
            else:
                if k > pool:
                    raise ValueError(f"cannot draw {k} distinct negatives from {pool} rows")
                picked: dict[int, None] = {}
                while len(picked) < k:
                    for p in torch.randint(pool, (2 * k,), generator=generator).tolist():
                        picked.setdefault(p)
                        if len(picked) == k:
                            break
                pos = torch.tensor(list(picked), dtype=torch.long)
            # positions 0..pool-1 skip this class's block [start, start + count)
            pos = pos + count * (pos >= start).long()
            out[b] = self.by_class[pos]
        return out


class ContrastMemory:
    """The per-job memory banks of CoDIR and what drawing negatives needs.

    Attributes:
        student, teacher: (N, u) float32 banks (``memory_v1``, ``memory_v2`` of the authors).
        pools: the rows grouped by class.
        replace: draw negatives with replacement (K >= the smallest other-class pool; CRIT).
        z_student, z_teacher: the normalisation constants Z of the student-anchor and the
            teacher-anchor scores, set at the first batch (None before).
        generator: the CPU generator of the negatives.
    """

    def __init__(
        self,
        labels: Sequence[int | float],
        ids: Sequence[int],
        size: int,
        negatives: int,
        seed: int,
        device: torch.device,
    ) -> None:
        """Build both banks for a transfer set.

        Args:
            labels: the class of every example (row order).
            ids: every example's id (row order; ``example_ids`` of the batches).
            size: u.
            negatives: K.
            seed: seeds the banks' initial values and the negatives.
            device: where the banks live (the training device).

        Raises:
            ValueError: ids repeat, labels are not class ids, or one class only.
        """
        if len(ids) != len(labels):
            raise ValueError(f"{len(ids)} example ids for {len(labels)} labels")
        id_tensor = torch.tensor(list(ids), dtype=torch.long)
        self.sorted_ids, self.order = torch.sort(id_tensor)
        if len(self.sorted_ids) > 1 and bool((self.sorted_ids[1:] == self.sorted_ids[:-1]).any()):
            raise ValueError("dataset: codir needs a distinct id for every training example")
        self.pools = ClassPools.from_labels(labels)
        self.replace = negatives >= self.pools.smallest_pool()
        self.generator = torch.Generator().manual_seed(seed)
        stdv = 1.0 / math.sqrt(size / 3)  # crd/memory.py: uniform in [-stdv, stdv]
        n = len(labels)
        self.student = (torch.rand(n, size, generator=self.generator) * 2 - 1) * stdv
        self.teacher = (torch.rand(n, size, generator=self.generator) * 2 - 1) * stdv
        self.student, self.teacher = self.student.to(device), self.teacher.to(device)
        self.z_student: float | None = None
        self.z_teacher: float | None = None

    def __len__(self) -> int:
        return len(self.pools)

    def to(self, device: torch.device) -> None:
        """Move both banks to ``device`` (a no-op where they are)."""
        self.student, self.teacher = self.student.to(device), self.teacher.to(device)

    def rows(self, example_ids: torch.Tensor) -> torch.Tensor:
        """The bank rows of these example ids, (B,) int64 on the CPU.

        Raises:
            ValueError: an id is not in the transfer set.
        """
        ids = example_ids.detach().to("cpu", torch.long)
        pos = torch.searchsorted(self.sorted_ids, ids).clamp(max=len(self.sorted_ids) - 1)
        missing = self.sorted_ids[pos] != ids
        if bool(missing.any()):
            raise ValueError(f"example id {int(ids[missing][0])} is not in the transfer set")
        return self.order[pos]


class CoDIRHead(torch.nn.Module):
    """The two projections (``Embed`` of ``crd/criterion.py``: Linear with bias, then L2).

    Args:
        student_in: m d_s, the student's concatenated [CLS] width.
        teacher_in: |teacher_layers| d_t.
        size: u.
    """

    def __init__(self, student_in: int, teacher_in: int, size: int) -> None:
        super().__init__()
        self.student = torch.nn.Linear(student_in, size)
        self.teacher = torch.nn.Linear(teacher_in, size)

    def forward(self, h_s: torch.Tensor, h_t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, m d_s), (B, k d_t) -> two (B, u) float32 unit vectors."""
        f_s = torch.nn.functional.normalize(self.student(h_s).float(), dim=-1)
        f_t = torch.nn.functional.normalize(self.teacher(h_t).float(), dim=-1)
        return f_s, f_t


class CoDIR(Method):
    """(1 - beta) CE + beta tau^2 KL + w L_CRD with a memory bank and other-class negatives."""

    needs = Needs(hidden_states=True)
    config_cls = CoDIRConfig
    config: CoDIRConfig

    def __init__(self, config: MethodConfig, teacher: ModelShape, student: ModelShape) -> None:
        """Resolve the teacher layers and build the projections (call :meth:`check` first).
        The banks are built by :meth:`prepare`; the seed of the banks and the negatives is
        ``torch.initial_seed()`` now (the engine seeds torch with ``training.seed`` before it
        builds the method)."""
        super().__init__(config, teacher, student)
        c = self.config
        self.teacher_layers = codir_teacher_layers(c, teacher.num_layers)
        self.head = CoDIRHead(
            student.num_layers * student.hidden_size,
            len(self.teacher_layers) * teacher.hidden_size,
            c.projection_size,
        )
        self.seed = torch.initial_seed()
        self.memory: ContrastMemory | None = None
        self.pending_ids: torch.Tensor | None = None

    @classmethod
    def check(
        cls,
        config: MethodConfig,
        teacher: ModelShape,
        student: ModelShape,
        training: TrainingSpec,
    ) -> None:
        """Transformer student, classification task, valid teacher layers (allocates nothing).

        Raises:
            SpecError: ``student`` for a non-transformer student; ``method.name`` for a
                regression task (one output: there are no classes to draw negatives from);
                ``method.teacher_layers`` for a layer the teacher lacks.
        """
        super().check(config, teacher, student, training)
        c = config_as(config, CoDIRConfig)
        if student.num_labels == 1 or teacher.num_labels == 1:
            raise SpecError(
                "method.name",
                "codir draws each example's negatives from examples of other classes and "
                "needs a classification task; this is a regression task (one output). Use "
                "crd, pkd or vanilla_kd",
            )
        codir_teacher_layers(c, teacher.num_layers)

    def param_groups(self) -> list[ParamGroup]:
        """The two projections as group ``codir_head`` (no weight decay)."""
        return [ParamGroup("codir_head", [self.head])]

    def prepare(self, train_data: Encoded) -> None:
        """Build this job's memory banks for the transfer set, on the projections' device.

        Raises:
            ValueError: repeated example ids, non-integer labels, or one class only.
        """
        c = self.config
        self.memory = ContrastMemory(
            train_data.labels,
            train_data.ids,
            c.projection_size,
            c.negatives,
            self.seed,
            self.head.student.weight.device,
        )
        self.pending_ids = None

    def extra_state(self) -> dict[str, Any]:
        """The memory banks (both (N, u)), their normalisers and the negatives' generator."""
        memory = self.memory
        if memory is None:
            return {}
        return {
            "student": memory.student.detach().cpu().clone(),
            "teacher": memory.teacher.detach().cpu().clone(),
            "generator": memory.generator.get_state(),
            "z_student": memory.z_student,
            "z_teacher": memory.z_teacher,
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore the banks (after :meth:`prepare`, which builds them)."""
        memory = self.memory
        if memory is None or not state:
            return
        device = memory.student.device
        memory.student = state["student"].to(device)
        memory.teacher = state["teacher"].to(device)
        memory.generator.set_state(state["generator"])
        memory.z_student, memory.z_teacher = state["z_student"], state["z_teacher"]

    def start_batch(self, batch: dict[str, torch.Tensor]) -> None:
        """Remember the batch's ``example_ids`` for the next :meth:`loss`."""
        self.pending_ids = batch["example_ids"]

    def features(
        self, student: StepOutputs, teacher: StepOutputs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The projected, normalised representations f_s, f_t, each (B, u) float32.

        Raises:
            ValueError: hidden states are missing or their layer counts differ from the shapes
                the method was built for.
        """
        shapes = (self.student_shape.num_layers, self.teacher_shape.num_layers)
        s_states, t_states = paired_states(student, teacher, "codir", shapes)
        h_s = torch.cat([cls_pool(h) for h in s_states], dim=-1)
        h_t = torch.cat([cls_pool(t_states[k]) for k in self.teacher_layers], dim=-1)
        return self.head(h_s, h_t)

    def contrast(self, f_s: torch.Tensor, f_t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """L_CRD of one batch: with a memory bank, the authors' symmetric NCE loss (then the
        banks are updated); without one (no :meth:`prepare`), the in-batch fallback.

        Raises:
            ValueError: the bank is prepared but :meth:`start_batch` gave no ids for this
                batch, or their number differs from the batch's.
        """
        c, memory = self.config, self.memory
        if memory is None:
            return in_batch_class_nce(f_s, f_t, labels, c.contrast_temperature)
        ids, self.pending_ids = self.pending_ids, None
        if ids is None or len(ids) != len(f_s):
            raise ValueError(
                "codir: start_batch() must give the example ids of every batch before its loss"
            )
        memory.to(f_s.device)
        ranks = current_rank()
        if ranks is not None:
            return self._contrast_on_ranks(f_s, f_t, ids, ranks)
        rows = memory.rows(ids)
        negatives = memory.pools.draw(rows, c.negatives, memory.replace, memory.generator)
        index = torch.cat([rows.unsqueeze(1), negatives], dim=1).to(f_s.device)
        n = len(memory)
        tau = c.contrast_temperature
        e_s = memory_scores(f_s, memory.teacher, index, tau)  # student anchor, teacher bank
        e_t = memory_scores(f_t, memory.student, index, tau)  # teacher anchor, student bank
        if memory.z_student is None or memory.z_teacher is None:
            memory.z_student = float(e_s.detach().mean()) * n
            memory.z_teacher = float(e_t.detach().mean()) * n
        loss = (nce_loss(e_s / memory.z_student, n) + nce_loss(e_t / memory.z_teacher, n)) / 2
        device_rows = rows.to(f_s.device)
        momentum_update(memory.student, device_rows, f_s, c.momentum)
        momentum_update(memory.teacher, device_rows, f_t, c.momentum)
        return loss

    def _contrast_on_ranks(
        self, f_s: torch.Tensor, f_t: torch.Tensor, ids: torch.Tensor, ranks: DistContext
    ) -> torch.Tensor:
        """:meth:`contrast` on one rank of a data-parallel run, keeping the banks and the
        negatives' generator the same on every rank and as one process would: the global
        batch's ids are gathered (rank order is row order), its negatives drawn once per row,
        Z set from the global batch's mean score, and the banks moved with every rank's
        features (gathered, detached). A rank given a repeated row (an empty shard) adds
        nothing to the banks."""
        c, memory = self.config, self.memory
        assert memory is not None
        per_rank = ranks.gather_rows(ids.detach().to(f_s.device, torch.long))
        all_ids = [int(i) for i in torch.cat(per_rank).tolist()]
        seen: dict[int, int] = {}  # id -> its row in the global batch
        first: list[int] = []  # the position of each id's first occurrence among all_ids
        for j, i in enumerate(all_ids):
            if i not in seen:
                seen[i] = len(seen)
                first.append(j)
        global_ids = torch.tensor(list(seen), dtype=torch.long)
        rows = memory.rows(global_ids)
        negatives = memory.pools.draw(rows, c.negatives, memory.replace, memory.generator)
        mine = torch.tensor([seen[int(i)] for i in ids.tolist()], dtype=torch.long)
        index = torch.cat([rows[mine].unsqueeze(1), negatives[mine]], dim=1).to(f_s.device)
        n = len(memory)
        tau = c.contrast_temperature
        e_s = memory_scores(f_s, memory.teacher, index, tau)
        e_t = memory_scores(f_t, memory.student, index, tau)
        if memory.z_student is None or memory.z_teacher is None:
            sums = torch.stack([e_s.detach().sum(), e_t.detach().sum()]).double().reshape(1, 2)
            total = torch.cat(ranks.gather_rows(sums)).sum(0).tolist()
            count = sum(len(r) for r in per_rank) * e_s[0].numel()
            memory.z_student, memory.z_teacher = total[0] / count * n, total[1] / count * n
        loss = (nce_loss(e_s / memory.z_student, n) + nce_loss(e_t / memory.z_teacher, n)) / 2
        keep = torch.tensor(first, dtype=torch.long, device=f_s.device)
        device_rows = rows.to(f_s.device)
        for bank, f in ((memory.student, f_s), (memory.teacher, f_t)):
            gathered = torch.cat(ranks.gather_rows(f.detach()))
            momentum_update(bank, device_rows, gathered[keep], c.momentum)
        return loss

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        """Loss from logits (B, C), hidden states (m + 1 and n + 1 tensors (B, T, d)) and labels
        (B,); parts ``ce``, ``kd``, ``crd``.

        Raises:
            ValueError: no teacher outputs or hidden states, layer counts that differ from the
                models the method was built for, or (with a bank) no example ids for the batch.
        """
        t_out = teacher_outputs(teacher, "codir")
        c = self.config
        f_s, f_t = self.features(student, t_out)
        crd = self.contrast(f_s, f_t, labels)
        ce = ce_loss(student.logits, labels)
        kd = kd_loss(student.logits, t_out.logits, c.temperature)
        total = (1.0 - c.kd_weight) * ce + c.kd_weight * kd + c.crd_weight * crd
        parts = {"ce": ce.detach(), "kd": kd.detach(), "crd": crd.detach()}
        return LossResult(total=total, parts=parts)


register("codir", CoDIR)
