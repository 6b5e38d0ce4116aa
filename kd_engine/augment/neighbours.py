"""Nearest-neighbour augmentation (Minimax-kNN): sentence embeddings, the kNN search, the
angular-distance filter and the largest-divergence selection, as functions on tensors.

Sources: Kamalloo, Rezagholizadeh, Passban and Ghodsi, "Not Far Away, Not So Close: Sample
Efficient Nearest Neighbour Data Augmentation via MiniMax", Findings of ACL 2021; the authors'
code huawei-noah/Efficient-NLP ``Minimax-kNN/src/knnkd`` (read, not copied):
``cls/run_glue.py::_filter_augments`` (the filter) and ``modeling.py::MinimaxKnnHeadFast``
(the selection). The kNN search is scikit-learn's exact ``NearestNeighbors`` (the authors
retrieve with SentAugment's encoder and a faiss index over CommonCrawl sentences, which is not
reachable here).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F  # noqa: N812
from sklearn.neighbors import NearestNeighbors

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from kd_engine.data.batching import Encoded

DUPLICATE_DISTANCE = 1e-3
"""Angular distance at or below which a neighbour counts as the example itself. The authors
require d > 0 (exact duplicates out); a float32 cosine of two identical vectors can be
1 - 1e-7, i.e. d ~ 1.4e-4, so a strict d > 0 would keep them. 1e-3 is cos > 0.999995."""


@torch.inference_mode()
def embeddings_and_logits(
    model: PreTrainedModel,
    data: Encoded,
    batch_size: int,
    pad_id: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sentence embeddings and logits of ``model`` on every row of ``data``, in order.

    The embedding is the last layer's hidden states averaged over the real tokens (attention
    mask 1): masked mean pooling, as sentence encoders do (Sentence-BERT; SentAugment's SASE).
    The model runs in eval mode (no dropout) and gets its own mode back.

    Returns:
        (embeddings (N, H), logits (N, C)), float32 on the CPU.
    """
    was_training = model.training
    model.eval()
    embeddings, logits = [], []
    # Imported here: kd_engine.data imports the job spec, whose method union needs every method
    # module registered first (this module is imported while they register).
    from kd_engine.data.batching import batches
    from kd_engine.evaluation import model_inputs

    for batch in batches(data, batch_size, pad_id):
        inputs = model_inputs(batch, device)
        out = model(**inputs, output_hidden_states=True)
        hidden = out.hidden_states[-1].float()
        mask = inputs["attention_mask"].unsqueeze(-1).float()
        embeddings.append(((hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)).cpu())
        logits.append(out.logits.float().cpu())
    model.train(was_training)
    return torch.cat(embeddings), torch.cat(logits)


def nearest_neighbours(
    queries: torch.Tensor, index: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` rows of ``index`` most cosine-similar to each query, closest first
    (scikit-learn ``NearestNeighbors``, exact brute-force search with the cosine metric).

    Args:
        queries: (Q, H) embeddings.
        index: (N, H) embeddings of the corpus.
        k: neighbours per query (at most N are returned).

    Returns:
        (rows (Q, k') int64 into ``index``, cosine similarities (Q, k') float64), k' = min(k, N).
    """
    k = min(k, index.shape[0])
    search = NearestNeighbors(n_neighbors=k, metric="cosine", algorithm="brute")
    search.fit(index.double().numpy())
    distance, rows = search.kneighbors(queries.double().numpy())
    return torch.from_numpy(rows).long(), 1.0 - torch.from_numpy(distance)


def angular_distance(cosine: torch.Tensor) -> torch.Tensor:
    """d = arccos(clamp(cos, -1, 1)) / pi, in [0, 1] (the authors' ``_filter_augments``)."""
    return torch.arccos(cosine.clamp(-1.0, 1.0)) / math.pi


@dataclass(frozen=True)
class Candidates:
    """Each example's candidate pool, closest first.

    Attributes:
        rows: (Q, P) int64 corpus rows; -1 where ``mask`` is False.
        distance: (Q, P) angular distances (inf where ``mask`` is False).
        mask: (Q, P) bool, True for a real candidate.
    """

    rows: torch.Tensor
    distance: torch.Tensor
    mask: torch.Tensor


def filter_candidates(
    rows: torch.Tensor,
    cosine: torch.Tensor,
    min_distance: float,
    max_distance: float,
    keep: int,
) -> Candidates:
    """The authors' angular-distance filter (``run_glue.py::_filter_augments``, cached mode):
    keep the neighbours with ``min_distance <= d <= max_distance`` and d > 0 (the example
    itself and exact duplicates out; see :data:`DUPLICATE_DISTANCE`), then the ``keep``
    closest survivors. A ``max_distance`` of 0 means no upper bound (the authors' "0 is off").

    Args:
        rows: (Q, K) corpus rows of each query's neighbours.
        cosine: (Q, K) their cosine similarities to the query.
        min_distance, max_distance: bounds on d, in [0, 1].
        keep: P, the pool size (the authors' ``--num_aug_candidates``).

    Returns:
        The pools, (Q, min(P, K)).
    """
    d = angular_distance(cosine.double())
    ok = (d > DUPLICATE_DISTANCE) & (d >= min_distance)
    if max_distance > 0:
        ok &= d <= max_distance
    ranked = torch.where(ok, d, torch.full_like(d, math.inf))
    order = torch.sort(ranked, dim=1, stable=True).indices[:, : min(keep, rows.shape[1])]
    kept_ok = ok.gather(1, order)
    kept_rows = torch.where(kept_ok, rows.gather(1, order), torch.full_like(order, -1))
    return Candidates(kept_rows, ranked.gather(1, order).float(), kept_ok)


def candidate_scores(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
) -> torch.Tensor:
    """How far the student is from the teacher on each candidate (no tau^2, as the authors'
    ``KLDivLoss(reduction="none")(...).sum(-1)``):
    KL(softmax(z_t / tau) || softmax(z_s / tau)) summed over the C classes; for one output
    (regression, C = 1) the squared difference (z_s - z_t)^2, the divergence of
    :func:`kd_engine.losses.kd_loss` for C = 1.

    Args:
        student_logits, teacher_logits: (..., C).
        temperature: tau > 0.

    Returns:
        (...) float32, nats (squared output units for C = 1).
    """
    s, t = student_logits.float(), teacher_logits.float()
    if s.shape[-1] == 1:
        return (s - t).squeeze(-1) ** 2
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)


@dataclass(frozen=True)
class Selection:
    """The chosen candidates of each example, largest divergence first.

    Attributes:
        index: (B, k) int64 positions in the example's pool (0 where ``valid`` is False).
        valid: (B, k) bool; False where the example has fewer than k candidates.
        score: (B, k) their divergences (-inf where ``valid`` is False).
    """

    index: torch.Tensor
    valid: torch.Tensor
    score: torch.Tensor


def select_largest_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    candidate_mask: torch.Tensor,
    k: int,
    temperature: float,
) -> Selection:
    """Minimax-kNN's max step: per example, the ``k`` candidates (k1, ``--num_augments``) with
    the largest KL(T || S) at ``temperature`` (:func:`candidate_scores`); masked candidates are
    never chosen, ties go to the earlier (closer) candidate.

    The authors (``modeling.py::MinimaxKnnHeadFast``) take rank j's winner with ``scatter_max``
    after setting the j - 1 earlier winners to -inf: the same k candidates in the same order.

    Args:
        student_logits, teacher_logits: (B, P, C) on each example's P candidates.
        candidate_mask: (B, P) bool, True for a real candidate.
        k: candidates kept per example.
        temperature: tau > 0.

    Returns:
        The :class:`Selection`, (B, min(k, P)).

    Raises:
        ValueError: shapes disagree, or k < 1.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 3:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} "
            "logits must both be (B, P, C)"
        )
    if candidate_mask.shape != student_logits.shape[:2]:
        raise ValueError(
            f"candidate mask {tuple(candidate_mask.shape)} is not (B, P) = "
            f"{tuple(student_logits.shape[:2])}"
        )
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    scores = candidate_scores(student_logits, teacher_logits, temperature)
    scores = torch.where(candidate_mask, scores, torch.full_like(scores, -math.inf))
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    index = order[:, : min(k, scores.shape[1])]
    valid = candidate_mask.gather(1, index)
    return Selection(torch.where(valid, index, 0), valid, scores.gather(1, index))
