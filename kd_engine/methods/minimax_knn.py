"""``minimax_knn``: Kamalloo, Rezagholizadeh, Passban and Ghodsi, "Not Far Away, Not So Close:
Sample Efficient Nearest Neighbour Data Augmentation via MiniMax", Findings of ACL 2021; the
authors' code is huawei-noah/Efficient-NLP ``Minimax-kNN/src/knnkd`` (read, not copied).

Before training (once):

- the unlabelled corpus ``corpus`` (:mod:`kd_engine.data.corpus`), encoded like the transfer
  set, at most ``max_corpus_examples`` rows;
- sentence embeddings of corpus and transfer set: the teacher's last-layer hidden states,
  mean-pooled over real tokens, in eval mode (:func:`~kd_engine.augment.neighbours.
  embeddings_and_logits`); the teacher's logits on every corpus row are kept from the same
  pass, indexed by corpus row (the authors' ``cached_model_outputs``);
- the ``num_neighbors`` nearest corpus rows of each training example by cosine (scikit-learn
  ``NearestNeighbors``), then the authors' angular filter
  ``min_distance <= arccos(cos) / pi <= max_distance``, d > 0, and the ``num_candidates``
  closest survivors: each example's fixed candidate pool (``_filter_augments``, cached mode).

Per student step from epoch ``augment_start_epoch`` (the max step, no gradient): the current
student's logits on every candidate of the batch's examples (eval mode), KL(T || S) at tau
against the cached teacher logits, and per example the ``num_augments`` (k1) candidates with the
largest KL (:func:`~kd_engine.augment.neighbours.select_largest_kl`), chosen again at every
visit of the example (the authors' ``MinimaxKnnHeadFast``). The min step:

    L = alpha_ce tau^2 KL(T(x) || S(x)) + alpha_true CE(y, S(x))
        + alpha_aug sum_j tau^2 KL(T(x_j) || S(x_j))

with x_j the rank-j choices of the batch's examples (mean over them, summed over the k1 ranks:
the authors' rank groups, each a mean, summed in ``training_step``). For a one-output
(regression) model the KL terms are MSE and the selection score is (z_s - z_t)^2, as
:func:`kd_engine.losses.kd_loss` does for C = 1 (the authors' code has no regression task).

Differences from the authors, deliberate:

- retrieval: the authors' neighbours come from SentAugment (its SASE sentence encoder and a
  faiss index over CommonCrawl sentences), precomputed into a jsonl file; here the encoder is
  the job's teacher (mean-pooled last layer) and the bank is the job's ``corpus``. The authors'
  filter measures distances with the teacher's [CLS] state; here with the same mean-pooled
  embedding that retrieval uses.
- batches: the authors flatten each example into 1 + k1 items (the original, and one per rank)
  shuffled into separate minibatches; here each step's batch of B originals brings its own
  chosen neighbours (up to B k1 more rows), so an epoch keeps the number of steps of plain KD
  (the authors' epochs are 1 + k1 times longer).
- the student is scored in eval mode (the authors' scoring runs inside the training step with
  dropout on).
- the augmented KD term uses the teacher's logits that the loop computes on the augmented batch
  (the same teacher in eval mode as the cache; under bf16 autocast on a GPU they may differ
  from the cached float32 ones in the last digits).
- epochs: ``augment_start_epoch`` counts from 1 (the loop's epochs), the authors' 0-based
  ``--augment_start_epoch`` E is our E + 1.

Defaults (the authors' ``run_glue.py`` argparse unless said): ``alpha_ce`` 0.5, ``alpha_true``
0.5, ``alpha_aug`` None = ``alpha_ce`` (``_load_default_args``), ``temperature`` 2.0 (the code's
default; the design notes quote 5 from the README), ``num_candidates`` 8 (the README's SST-5
minimax example; the code's default is 4), ``max_distance`` 0, i.e. no upper bound (the code's
default; the README's example uses 0.22, a threshold for SentAugment's encoder over
CommonCrawl: with the teacher's embeddings and a corpus of thousands of sentences the nearest
neighbour is usually farther than that, see docs/methods.md), ``num_augments`` 1 (the README
example), ``min_distance`` 0, ``augment_start_epoch`` 1 (the code's default 0: augmentation
from the first epoch; the README's example says 7 with 6 epochs, which would never start).
``num_neighbors`` (the K retrieved before the filter) 32 and ``max_corpus_examples`` 20,000 are
ours: the paper's K and corpus size could not be read (its body was not reachable), and the
code reads neighbours from a file. The learning rate and epochs are the job's ``training``
settings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field

from kd_engine.augment.neighbours import (
    Candidates,
    angular_distance,
    embeddings_and_logits,
    filter_candidates,
    nearest_neighbours,
    select_largest_kl,
)
from kd_engine.augment.samples import SampleKeeper
from kd_engine.errors import SpecError
from kd_engine.losses import ce_loss, kd_loss
from kd_engine.methods.base import (
    LossResult,
    Method,
    MethodConfig,
    Needs,
    Resources,
    StepOutputs,
    teacher_outputs,
)
from kd_engine.ranks import current as current_rank
from kd_engine.registry import register

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kd_engine.data.batching import Encoded
    from kd_engine.models.shapes import ModelShape
    from kd_engine.spec import TrainingSpec

NAME = "minimax_knn"
DEFAULT_CORPUS = "builtin:rotten_tomatoes_plot"
SCORING_BATCH = 64
"""Candidates per student forward when scoring (without ``training``: its eval batch size)."""


class MinimaxKNNConfig(MethodConfig):
    """Settings of ``minimax_knn`` (sources in the module docstring).

    Attributes:
        corpus: the unlabelled corpus (:mod:`kd_engine.data.corpus`): ``builtin:<name>`` or a
            ``file://`` .csv / .jsonl.
        corpus_text_column: the text column of a file corpus.
        max_corpus_examples: at most this many corpus rows are used (a sample seeded with
            ``dataset.split_seed``): each costs one teacher forward before training.
        num_neighbors: K, corpus rows retrieved per training example before the filter.
        num_candidates: P, the pool kept after the filter (``--num_aug_candidates``).
        num_augments: k1, candidates chosen per example and visit (``--num_augments``).
        min_distance, max_distance: bounds on the angular distance arccos(cos) / pi, in
            [0, 1]; a ``max_distance`` of 0 is no upper bound (``--min_distance``,
            ``--max_distance``).
        augment_start_epoch: the first epoch (1-based) that trains on neighbours (the authors'
            0-based ``--augment_start_epoch`` + 1).
        temperature: tau of the KD terms and of the selection's KL (``--temperature``).
        alpha_ce: weight of KD on the originals (``--alpha_ce``).
        alpha_true: weight of CE with the gold labels (``--alpha_true``).
        alpha_aug: weight of KD on the chosen neighbours; None means ``alpha_ce``
            (``--alpha_aug``).
    """

    name: Literal["minimax_knn"] = "minimax_knn"
    corpus: str = Field(DEFAULT_CORPUS, min_length=1, max_length=2048)
    corpus_text_column: str = Field("text", min_length=1, max_length=256)
    max_corpus_examples: int = Field(20_000, ge=1, le=1_000_000)
    num_neighbors: int = Field(32, ge=1, le=1024)
    num_candidates: int = Field(8, ge=1, le=256)
    num_augments: int = Field(1, ge=1, le=64)
    min_distance: float = Field(0.0, ge=0.0, le=1.0)
    max_distance: float = Field(0.0, ge=0.0, le=1.0)
    augment_start_epoch: int = Field(1, ge=1, le=1000)
    temperature: float = Field(2.0, gt=0.0, le=100.0)
    alpha_ce: float = Field(0.5, ge=0.0, le=10.0)
    alpha_true: float = Field(0.5, ge=0.0, le=10.0)
    alpha_aug: float | None = Field(None, ge=0.0, le=10.0)


class MinimaxKNN(Method):
    """Minimax-kNN: KD on the originals plus, per example, the corpus neighbours the current
    student disagrees with the teacher most on (see the module docstring)."""

    config_cls = MinimaxKNNConfig
    config: MinimaxKNNConfig
    needs = Needs(models=True, augmented=True)

    def __init__(self, config: MethodConfig, teacher: ModelShape, student: ModelShape) -> None:
        """Nothing is computed until :meth:`bind` and :meth:`prepare` (they need the models and
        the data)."""
        super().__init__(config, teacher, student)
        self.resources: Resources | None = None
        self.corpus: Encoded | None = None
        self.corpus_embeddings: torch.Tensor | None = None  # (N, H)
        self.corpus_logits: torch.Tensor | None = None  # (N, C), teacher, by corpus row
        self.candidates: Candidates | None = None  # (N_train, P), by transfer-set row
        self.row_of: dict[int, int] = {}  # transfer-set example id -> row
        self.epoch = 0
        self.step = 0
        self.ranks: torch.Tensor | None = None  # (B',) rank of each augmented row
        self.chosen: list[tuple[int, int, int, float]] = []  # (example id, rank, corpus row, kl)
        self.samples = SampleKeeper()
        self._train_data: Encoded | None = None
        self._stats: dict[str, object] = {}

    @classmethod
    def check(
        cls,
        config: MethodConfig,
        teacher: ModelShape,
        student: ModelShape,
        training: TrainingSpec,
    ) -> None:
        """The pool sizes must nest (k1 <= P <= K), the distance bounds must leave room, and
        augmentation must start within the job's epochs.

        Raises:
            SpecError: ``method.num_augments``, ``method.num_candidates``,
                ``method.min_distance`` or ``method.augment_start_epoch``.
        """
        super().check(config, teacher, student, training)
        c = config
        assert isinstance(c, MinimaxKNNConfig)
        if c.num_augments > c.num_candidates:
            raise SpecError(
                "method.num_augments",
                f"{c.num_augments} chosen per example cannot exceed the pool of "
                f"method.num_candidates ({c.num_candidates})",
            )
        if c.num_candidates > c.num_neighbors:
            raise SpecError(
                "method.num_candidates",
                f"a pool of {c.num_candidates} cannot exceed the {c.num_neighbors} neighbours "
                "retrieved (method.num_neighbors)",
            )
        if c.max_distance > 0 and c.min_distance > c.max_distance:
            raise SpecError(
                "method.min_distance",
                f"{c.min_distance} is above method.max_distance ({c.max_distance}): no "
                "neighbour could pass the filter",
            )
        if c.augment_start_epoch > training.epochs:
            raise SpecError(
                "method.augment_start_epoch",
                f"epoch {c.augment_start_epoch} is after the last epoch (training.epochs "
                f"{training.epochs}): the student would never see a neighbour",
            )

    # --- before training ----------------------------------------------------------------

    def _batch_size(self) -> int:
        res = self.resources
        return res.training.eval_batch_size if res and res.training else SCORING_BATCH

    def bind(self, resources: Resources) -> None:
        """Embed the corpus with the teacher, keep its logits by corpus row.

        Raises:
            SpecError: ``teacher`` (none), ``method.corpus`` (no corpus was loaded).
        """
        teacher = resources.teacher
        if teacher is None:
            raise SpecError("teacher", f"{NAME} needs the teacher")
        corpus = resources.corpus
        if corpus is None or len(corpus) == 0:
            raise SpecError("method.corpus", "no corpus was loaded for this job")
        self.resources = resources
        teacher.to(resources.device)  # type: ignore[arg-type]
        self.corpus = corpus
        self.corpus_embeddings, self.corpus_logits = embeddings_and_logits(
            teacher, corpus, self._batch_size(), resources.pad_id, resources.device
        )

    def _bound(self) -> tuple[Resources, Encoded, torch.Tensor, torch.Tensor]:
        if (
            self.resources is None
            or self.corpus is None
            or self.corpus_embeddings is None
            or self.corpus_logits is None
        ):
            raise RuntimeError(f"{NAME}: bind() must run before training")
        return self.resources, self.corpus, self.corpus_embeddings, self.corpus_logits

    def prepare(self, train_data: Encoded) -> None:
        """Retrieve and filter each training example's candidate pool (fixed for the run).

        Raises:
            SpecError: ``method.max_distance`` (or ``method.min_distance`` without an upper
                bound) when no training example keeps a single candidate: the job would be
                plain KD.
        """
        res, corpus, corpus_emb, _ = self._bound()
        assert res.teacher is not None
        c = self.config
        self._train_data = train_data
        self.row_of = {int(i): r for r, i in enumerate(train_data.ids)}
        train_emb, _ = embeddings_and_logits(
            res.teacher, train_data, self._batch_size(), res.pad_id, res.device
        )
        rows, cosine = nearest_neighbours(train_emb, corpus_emb, c.num_neighbors)
        self.candidates = filter_candidates(
            rows, cosine, c.min_distance, c.max_distance, c.num_candidates
        )
        ranks = current_rank()
        if ranks is not None:  # rank 0's pools on every rank (a near-tie may differ by device)
            self.candidates = ranks.broadcast(self.candidates)
        pool = self.candidates
        per_example = pool.mask.sum(1)
        nearest = angular_distance(cosine[:, 0])
        self._stats = {
            "corpus_rows": len(corpus),
            "training_examples": len(train_data),
            "neighbors_retrieved": int(rows.shape[1]),
            "nearest_distance_median": float(nearest.median()),
            "candidates_per_example_mean": float(per_example.float().mean()),
            "candidate_distance_mean": float(pool.distance[pool.mask].mean())
            if bool(pool.mask.any())
            else None,
            "examples_without_candidates": int((per_example == 0).sum()),
        }
        if not bool(pool.mask.any()):
            field = "method.max_distance" if c.max_distance > 0 else "method.min_distance"
            raise SpecError(
                field,
                f"no training example has a corpus neighbour within the distance bounds "
                f"[{c.min_distance}, {c.max_distance or 1.0}] (the median distance to the "
                f"nearest one is {float(nearest.median()):.3f}, in the teacher's embedding "
                "space): widen the bounds (max_distance 0 removes the upper one) or use a "
                "larger or closer method.corpus",
            )

    # --- the loop's hooks ---------------------------------------------------------------

    def extra_state(self) -> dict[str, Any]:
        """The job's epoch and step last seen and the kept samples (the neighbour index is
        rebuilt from the data by :meth:`prepare`)."""
        return {"epoch": self.epoch, "step": self.step, "samples": self.samples.state()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`extra_state` returned."""
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.samples.load_state(state["samples"])

    def start_step(self, epoch: int, step: int) -> None:
        """Keep the job's epoch (1-based) and step: augmentation starts at an epoch."""
        self.epoch, self.step = epoch, step

    def augmenting(self) -> bool:
        """Whether the current epoch trains on neighbours."""
        return self.epoch >= self.config.augment_start_epoch

    @torch.no_grad()
    def _student_logits(self, rows: list[int]) -> torch.Tensor:
        """The current student's logits (len(rows), C) on corpus rows, in eval mode."""
        from kd_engine.data.batching import collate  # lazily: see adversarial.py
        from kd_engine.evaluation import model_inputs  # lazily: see adversarial.py

        res, corpus, _, _ = self._bound()
        student: PreTrainedModel = res.student
        was_training = student.training
        student.eval()
        out = []
        size = self._batch_size()
        for start in range(0, len(rows), size):
            batch = collate(corpus, rows[start : start + size], res.pad_id)
            out.append(student(**model_inputs(batch, res.device)).logits.float().cpu())
        student.train(was_training)
        return torch.cat(out)

    def augment(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """The batch's chosen neighbours (from ``augment_start_epoch`` on): per example, the
        ``num_augments`` candidates of largest KL(T || S) under the current student, as one
        padded batch grouped by rank (rank 1 of every example, then rank 2, ...); None when
        no example of the batch has a candidate."""
        from kd_engine.data.batching import collate  # lazily: see adversarial.py

        self.ranks = None
        self.chosen = []
        if not self.augmenting():
            return None
        res, corpus, _, corpus_logits = self._bound()
        assert self.candidates is not None
        c = self.config
        example_ids = [int(i) for i in batch["example_ids"]]
        rows = torch.tensor([self.row_of[i] for i in example_ids])
        cand_rows, mask = self.candidates.rows[rows], self.candidates.mask[rows]  # (B, P)
        if not bool(mask.any()):
            return None
        unique = sorted({int(r) for r in cand_rows[mask]})
        position = {r: n for n, r in enumerate(unique)}
        s_unique = self._student_logits(unique)
        gather = torch.tensor([[position.get(int(r), 0) for r in row] for row in cand_rows])
        s_logits = s_unique[gather]  # (B, P, C)
        t_logits = corpus_logits[cand_rows.clamp_min(0)]  # (B, P, C)
        selection = select_largest_kl(s_logits, t_logits, mask, c.num_augments, c.temperature)
        chosen_rows: list[int] = []
        ranks: list[int] = []
        for rank in range(selection.index.shape[1]):
            for b, example in enumerate(example_ids):
                if not bool(selection.valid[b, rank]):
                    continue
                corpus_row = int(cand_rows[b, int(selection.index[b, rank])])
                chosen_rows.append(corpus_row)
                ranks.append(rank + 1)
                self.chosen.append((example, rank + 1, corpus_row, float(selection.score[b, rank])))
        self.ranks = torch.tensor(ranks)
        self._keep_samples(batch)
        augmented = collate(corpus, chosen_rows, res.pad_id)
        return {k: v for k, v in augmented.items() if k not in ("labels", "example_ids")}

    def _keep_samples(self, batch: dict[str, torch.Tensor]) -> None:
        """Keep the first example's choices of this batch for the artifact."""
        assert self.corpus is not None
        first = self.chosen[0][0]
        b = [int(i) for i in batch["example_ids"]].index(first)
        n = int(batch["attention_mask"][b].sum())
        original = batch["input_ids"][b, :n].tolist()
        for example, rank, corpus_row, kl in self.chosen:
            if example != first:
                continue
            record: dict[str, object] = {
                "epoch": self.epoch,
                "step": self.step,
                "example_id": example,
                "corpus_row": corpus_row,
                "rank": rank,
                "kl": kl,
                "original": original,
                "augmented": list(self.corpus.input_ids[corpus_row]),
            }
            self.samples.offer(record)

    def augmentation_samples(self) -> list[dict[str, object]]:
        """The first and the last kept (original, chosen neighbour) pairs as token ids, with
        ``kl`` (the selection score), ``rank`` (1 = largest KL), ``epoch``, ``step``,
        ``example_id`` and ``corpus_row``."""
        return self.samples.records()

    def report(self) -> dict[str, object]:
        """Corpus rows, neighbours retrieved, mean pool size after the filter and examples
        without any candidate (they train on their originals only)."""
        return dict(self._stats)

    # --- the loss -----------------------------------------------------------------------

    def loss(
        self,
        student: StepOutputs,
        teacher: StepOutputs | None,
        labels: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> LossResult:
        """alpha_ce KD(x) + alpha_true CE(y, S(x)) + alpha_aug sum over ranks of KD on that
        rank's chosen neighbours (logits (B, C) on the originals, (B', C) on the neighbours).

        Raises:
            ValueError: no teacher outputs, or the loop ran no model on the neighbours.
        """
        c = self.config
        t = teacher_outputs(teacher, NAME)
        tau = c.temperature
        kd = kd_loss(student.logits, t.logits, tau)
        ce = ce_loss(student.logits, labels)
        total = c.alpha_ce * kd + c.alpha_true * ce
        parts = {"kd": kd.detach(), "ce": ce.detach()}
        if self.augmenting():
            parts["kd_augmented"] = parts["kl_chosen"] = torch.zeros((), device=kd.device)
        if self.ranks is not None:
            if student.augmented is None or t.augmented is None:
                raise ValueError(f"{NAME}: the step has no outputs on the chosen neighbours")
            s_aug, t_aug = student.augmented.logits, t.augmented.logits
            ranks = self.ranks.to(s_aug.device)
            kd_aug = sum(
                (
                    kd_loss(s_aug[ranks == r], t_aug[ranks == r], tau)
                    for r in ranks.unique().tolist()
                ),
                start=torch.zeros((), device=s_aug.device),
            )
            alpha_aug = c.alpha_aug if c.alpha_aug is not None else c.alpha_ce
            total = total + alpha_aug * kd_aug
            parts["kd_augmented"] = kd_aug.detach()
            kl_chosen = sum(kl for *_, kl in self.chosen) / max(1, len(self.chosen))
            parts["kl_chosen"] = torch.tensor(float(kl_chosen), device=kd.device)
        return LossResult(total=total, parts=parts)


register(NAME, MinimaxKNN)
