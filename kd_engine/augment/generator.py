"""The masked-LM generator of MATE-KD and its family, and its straight-through samples.

Two ways to get one (Rashid et al., ACL 2021, section 3; the authors load a pre-trained MLM,
distilroberta-base or BERT-mini ``uncased_L-4_H-256_A-4``, in huawei-noah/Efficient-NLP
``MATE-KD/train_adversarial_student*.py``):

- :func:`load_generator`: any masked-LM checkpoint whose vocabulary is the teacher's;
- :func:`generator_from_teacher`: a copy of the teacher's encoder (its first ``num_layers``
  layers) under a new MLM head whose output matrix is tied to the copy's word embeddings. The
  head starts untrained, so the method warms it up with MLM on the transfer set first (a stage
  of its own). The copy costs one more encoder (the teacher's size, or its first layers) in
  memory, plus AdamW state while it trains.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812
from transformers import AutoConfig, AutoModelForMaskedLM, PreTrainedModel

from kd_engine.errors import SpecError


def generator_from_teacher(
    teacher: PreTrainedModel, num_layers: int | None = None
) -> PreTrainedModel:
    """A masked-LM built from the teacher's encoder: the teacher's embeddings and its first
    ``num_layers`` transformer layers (all when None), copied (the teacher is never changed),
    under the architecture's MLM head, newly initialised except its output matrix, tied to the
    copied word embeddings.

    Raises:
        SpecError: ``method.generator_layers`` out of range, or ``method.generator`` when the
            teacher's architecture has no masked-LM head in transformers.
    """
    n = int(teacher.config.num_hidden_layers)
    k = n if num_layers is None else num_layers
    if not 1 <= k <= n:
        raise SpecError(
            "method.generator_layers", f"must be between 1 and the teacher's {n} layers, got {k}"
        )
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = k
    config.architectures = None
    config.tie_word_embeddings = True
    try:
        mlm = AutoModelForMaskedLM.from_config(config)
    except ValueError:
        raise SpecError(
            "method.generator",
            f"a {config.model_type} teacher has no masked-LM head to build a generator from; "
            "name a masked-LM checkpoint with the teacher's vocabulary",
        ) from None
    base = teacher.base_model.state_dict()
    missing, _unexpected = mlm.base_model.load_state_dict(base, strict=False)
    if missing:
        raise SpecError(
            "method.generator",
            f"the teacher's encoder does not fit a {type(mlm).__name__} (missing {missing[:3]})",
        )
    mlm.tie_weights()
    return mlm


def load_generator(path: Path | str, vocab_size: int) -> PreTrainedModel:
    """A masked-LM checkpoint (local directory or hub id) checked to have ``vocab_size`` tokens.

    Raises:
        SpecError: ``method.generator`` when it is not a masked LM or its vocabulary differs.
    """
    config = AutoConfig.from_pretrained(str(path))
    if int(config.vocab_size) != vocab_size:
        raise SpecError(
            "method.generator",
            f"its vocabulary ({config.vocab_size} tokens) differs from the teacher's "
            f"({vocab_size}); the generator must share the teacher's tokenizer",
        )
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(str(path), output_loading_info=True)
    except (OSError, ValueError) as e:
        raise SpecError("method.generator", f"not a masked-LM checkpoint: {e}") from None
    # A base encoder loads too, with a new (random) head: refuse it, since a named generator
    # gets no warm-up. The output matrix tied to the word embeddings is never "missing".
    tied = {name for name, _ in model.named_parameters() if name.endswith("decoder.weight")}
    untrained = [k for k in info.get("missing_keys", []) if k not in tied]
    if untrained:
        raise SpecError(
            "method.generator",
            f"the checkpoint has no trained masked-LM head (missing {untrained[:3]}); name a "
            "masked-LM checkpoint, or leave method.generator unset to build one from the teacher",
        )
    return model


def mlm_loss(
    generator: PreTrainedModel,
    masked_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    original_ids: torch.Tensor,
    positions: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Masked-LM cross-entropy (nats per masked token) of predicting ``original_ids`` at the
    masked ``positions`` (B, T) bool from ``masked_ids`` (B, T); 0 (with a graph) when no
    position is masked."""
    logits = masked_logits(generator, masked_ids, attention_mask, positions, token_type_ids)
    if not bool(positions.any()):
        return logits.sum() * 0.0
    return F.cross_entropy(logits.float(), original_ids[positions])


def generator_logits(
    generator: PreTrainedModel,
    masked_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The generator's vocabulary logits (B, T, V) for ``masked_ids`` (B, T)."""
    kwargs = {"input_ids": masked_ids, "attention_mask": attention_mask}
    if token_type_ids is not None and "token_type_ids" in _forward_args(generator):
        kwargs["token_type_ids"] = token_type_ids
    logits: torch.Tensor = generator(**kwargs).logits
    return logits


POSITIONWISE_MLM_HEADS = ("cls", "lm_head")
"""Attribute names of the masked-LM heads that map each position's last hidden state to its
vocabulary logits on their own (BERT's ``cls``, RoBERTa's ``lm_head``): for these,
:func:`masked_logits` runs the head on the masked positions only."""


def masked_logits(
    generator: PreTrainedModel,
    masked_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    positions: torch.Tensor,
    token_type_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The generator's vocabulary logits (M, V) at the M masked ``positions`` (B, T) bool, in
    row-major order (as ``logits[positions]`` of :func:`generator_logits`).

    With a position-wise head (:data:`POSITIONWISE_MLM_HEADS`) the encoder runs over the whole
    batch and the head over the M masked positions only: the same values as the full logits
    (up to float rounding of a matrix product of another shape) for M/(B*T) of the head's
    cost, which dominates at a 30,522-token vocabulary. Other heads: the full logits, then
    the masked rows.
    """
    head = next(
        (getattr(generator, n) for n in POSITIONWISE_MLM_HEADS if hasattr(generator, n)), None
    )
    if head is None:
        return generator_logits(generator, masked_ids, attention_mask, token_type_ids)[positions]
    kwargs = {"input_ids": masked_ids, "attention_mask": attention_mask}
    if token_type_ids is not None and "token_type_ids" in _forward_args(generator.base_model):
        kwargs["token_type_ids"] = token_type_ids
    hidden: torch.Tensor = generator.base_model(**kwargs)[0]  # (B, T, d)
    logits: torch.Tensor = head(hidden[positions])
    return logits


def _forward_args(model: torch.nn.Module) -> tuple[str, ...]:
    code = type(model).forward.__code__
    return code.co_varnames[: code.co_argcount]


def straight_through_sample(
    logits: torch.Tensor, tau: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hard Gumbel-softmax samples at the masked positions, with straight-through gradients.

    ``y = softmax((log_softmax(l) + g) / tau)``, g ~ Gumbel(0, 1); the forward value is the
    one-hot of argmax y and the gradient is y's (Jang et al. 2017; the authors' ``gumbel_softmax``
    with tau 1.0, ``(y_hard - y).detach() + y``).

    Args:
        logits: (M, V) generator logits at the M masked positions (:func:`masked_logits`).
        tau: Gumbel-softmax temperature (> 0).

    Returns:
        ``(tokens, one_hot)``: the M sampled token ids (M,) int64, and their straight-through
        one-hot rows (M, V) float32 (forward values exactly 0 and 1).
    """
    chosen = logits.float()
    one_hot = F.gumbel_softmax(F.log_softmax(chosen, dim=-1), tau=tau, hard=True, dim=-1)
    return one_hot.argmax(dim=-1), one_hot
