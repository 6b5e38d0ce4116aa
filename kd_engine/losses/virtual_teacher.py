"""Teacher-free KD towards a manually designed "virtual teacher" (Tf-KD_reg; Yuan, Tay, Li, Wang
and Feng, "Revisiting Knowledge Distillation via Label Smoothing Regularization", CVPR 2020,
section 4).

The virtual teacher puts probability a on the gold class and (1 - a)/(C - 1) on each other
class. Two ways of distilling from it are provided (see :data:`VirtualTeacherVariant`); the
authors' code is yuanli2333/Teacher-free-Knowledge-Distillation,
``my_loss_function.py::loss_kd_regularization``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F  # noqa: N812

from kd_engine.losses.soft_targets import kd_loss

VirtualTeacherVariant = Literal["paper", "authors_code"]
"""How the student distils from the virtual teacher p^d at temperature T:

- ``paper`` (no source: neither the authors' code nor a readable text of the paper has this
  formula; the default of ``teacher_free`` jobs submitted before 2026-12-07, kept so that their
  stored specs keep their meaning): KD as for any teacher: the virtual teacher's logits are
  log p^d (so it outputs p^d at T = 1), both sides are softened by T and the KL is scaled by
  T^2 (Hinton et al.'s scaling, as in the authors' ``loss_kd``/``loss_kd_self``):
  T^2 * KL(softmax(log p^d / T) || softmax(z_s / T)), averaged over the batch. At high T this
  is close to matching the student's centred logits to log p^d: a label-smoothing-like pull
  towards a gold-vs-rest logit gap of log(a (C - 1) / (1 - a)).
- ``authors_code`` (``teacher_free``'s default): what ``loss_kd_regularization`` computes:
  the temperature divides the PROBABILITY vector, which is soft-maxed again,
  target = softmax(p^d / T); the student is not softened (T = 1); no T^2;
  ``nn.KLDivLoss()``'s default reduction ``mean`` (sum over B * C elements / (B * C), i.e.
  the batch-mean KL / C). Because the entries of p^d lie in [0, 1],
  softmax(p^d / T) is almost uniform for the authors' T of 10-40 (C = 2, a = 0.99, T = 20:
  gold 0.512; C = 100: 0.0105 against the uniform 0.0100), so this variant pulls the student
  towards the uniform distribution (a confidence penalty) rather than towards p^d.
"""


def virtual_teacher_distribution(
    labels: torch.Tensor, num_classes: int, correct_prob: float
) -> torch.Tensor:
    """p^d: a on the gold class, (1 - a)/(C - 1) on every other class (paper, section 4).

    Args:
        labels: (B,) gold class ids in [0, C).
        num_classes: C >= 2.
        correct_prob: a, in (0, 1).

    Returns:
        (B, C) float32 rows that sum to 1, on ``labels``' device.

    Raises:
        ValueError: C < 2, a outside (0, 1), labels not (B,) or out of range.
    """
    if num_classes < 2:
        raise ValueError(f"the virtual teacher needs at least 2 classes, got {num_classes}")
    if not 0.0 < correct_prob < 1.0:
        raise ValueError(f"correct_prob must be in (0, 1), got {correct_prob}")
    if labels.dim() != 1:
        raise ValueError(f"labels must have shape (B,), got {tuple(labels.shape)}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be class ids in [0, {num_classes})")
    rest = (1.0 - correct_prob) / (num_classes - 1)
    dist = torch.full((labels.shape[0], num_classes), rest, device=labels.device)
    return dist.scatter(1, labels.long().unsqueeze(1), correct_prob)


def virtual_teacher_kd(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    correct_prob: float,
    temperature: float,
    variant: VirtualTeacherVariant = "authors_code",
) -> torch.Tensor:
    """The KD term towards the virtual teacher (without alpha or any multiplier).

    ``paper``: T^2 * KL(softmax(log p^d / T) || softmax(z_s / T)), batch mean.
    ``authors_code``: KL(softmax(p^d / T) || softmax(z_s)) summed over classes and divided by
    B * C. See :data:`VirtualTeacherVariant`.

    Args:
        student_logits: z_s, shape (B, C), C >= 2.
        labels: (B,) gold class ids.
        correct_prob: a, in (0, 1).
        temperature: T > 0.
        variant: ``paper`` or ``authors_code``.

    Returns:
        A scalar tensor (nats; nats per class for ``authors_code``).

    Raises:
        ValueError: bad shapes, C < 2, a or T out of range, or an unknown variant.
    """
    if student_logits.dim() != 2 or student_logits.shape[0] != labels.shape[0]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} must be (B, C) for labels "
            f"{tuple(labels.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    p_d = virtual_teacher_distribution(labels, student_logits.shape[1], correct_prob)
    if variant == "paper":
        return kd_loss(student_logits, p_d.log(), temperature)
    if variant == "authors_code":
        target = F.softmax(p_d / temperature, dim=1)
        log_p_s = F.log_softmax(student_logits.float(), dim=1)
        # nn.KLDivLoss()'s 'mean', written out: torch plans to make 'mean' mean 'batchmean'.
        return F.kl_div(log_p_s, target, reduction="sum") / student_logits.numel()
    raise ValueError(f"variant must be 'paper' or 'authors_code', got {variant!r}")
