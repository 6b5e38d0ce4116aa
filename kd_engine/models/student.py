"""Building a student: teacher layers kept, a pretrained encoder's layers kept, or a fresh
BERT configuration."""

from __future__ import annotations

import copy

import torch
from transformers import BertConfig, BertForSequenceClassification, PreTrainedModel

from kd_engine.errors import SpecError
from kd_engine.students_spec import FreshStudent, FromTeacherStudent, PretrainedStudent


def encoder_layers(model: PreTrainedModel) -> torch.nn.ModuleList:
    """The transformer blocks of a BERT-like model (``base_model.encoder.layer``).

    Raises:
        ValueError: the architecture has no such list.
    """
    layers = getattr(getattr(model.base_model, "encoder", None), "layer", None)
    if not isinstance(layers, torch.nn.ModuleList):
        raise ValueError(
            f"{type(model).__name__}: cannot find encoder layers; a student from teacher layers "
            "needs a BERT-like teacher"
        )
    return layers


def evenly_spaced(n_teacher: int, n_student: int) -> list[int]:
    """Teacher layers floor(i * n / m), i = 0..m-1 (0-based): 6 -> 2 gives [0, 3]."""
    return [(i * n_teacher) // n_student for i in range(n_student)]


def _chosen_layers(
    layers: list[int] | None, num_layers: int | None, available: int, owner: str
) -> list[int] | None:
    """Check an explicit ``layers`` list or a ``num_layers`` count against ``available``
    layers; the explicit list when given, else None (the caller picks the default).

    Raises:
        ValueError: "student.layers: ..." (an index >= available) or "student.num_layers: ..."
            (more than available); ``owner`` names whose layers they are ("the teacher").
    """
    if layers is not None:
        bad = [i for i in layers if i >= available]
        if bad:
            raise SpecError(
                "student.layers",
                f"index {bad[0]} is out of range; {owner} has {available} "
                f"layers (0..{available - 1})",
            )
        return list(layers)
    if num_layers is not None and num_layers > available:
        raise SpecError(
            "student.num_layers", f"{num_layers} is more than {owner}'s {available} layers"
        )
    return None


def resolve_layers(spec: FromTeacherStudent, n_teacher: int) -> list[int]:
    """The 0-based teacher layers a from-teacher student keeps (evenly spaced by default).

    Raises:
        ValueError: an index is out of range, or more layers are asked than the teacher has.
    """
    chosen = _chosen_layers(spec.layers, spec.num_layers, n_teacher, "the teacher")
    if chosen is not None:
        return chosen
    return evenly_spaced(n_teacher, spec.num_layers or n_teacher)


def resolve_pretrained_layers(spec: PretrainedStudent, n_pretrained: int) -> list[int]:
    """The 0-based layers of a pretrained student's own checkpoint that it keeps.

    ``layers`` when given; else the FIRST ``num_layers`` (PKD initialises a k-layer student
    with pre-trained BERT's layers 0..k-1: intersun/PKD-for-BERT-Model-Compression
    src/utils.py ``load_model``, mode "student"); else all ``n_pretrained``.

    Raises:
        ValueError: "student.layers: ..." or "student.num_layers: ..." when the checkpoint has
            too few layers.
    """
    chosen = _chosen_layers(spec.layers, spec.num_layers, n_pretrained, "the pretrained model")
    if chosen is not None:
        return chosen
    return list(range(spec.num_layers or n_pretrained))


def cut_pretrained(student: PreTrainedModel, spec: PretrainedStudent) -> PreTrainedModel:
    """Cut a loaded pretrained student IN PLACE to the layers ``spec`` chooses (all when it
    chooses none) and return it: embeddings and pooler kept, the head left as loaded (the new
    one :func:`kd_engine.models.loading.load_classifier` draws for a base encoder).

    Raises:
        ValueError: "student.layers: ..." / "student.num_layers: ..." out of range of its own
            layers (see :func:`resolve_pretrained_layers`), or not a BERT-like encoder.
    """
    if spec.layers is None and spec.num_layers is None:
        return student
    kept = resolve_pretrained_layers(spec, len(encoder_layers(student)))
    return keep_layers(student, kept)


def keep_layers(model: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """Cut ``model`` IN PLACE to the given transformer layers, in order, and return it.

    Everything else (embeddings, pooler, classifier head) is untouched; new layer i is the old
    layer ``layers[i]`` (the same module, not a copy), ``config.num_hidden_layers`` becomes
    ``len(layers)`` and each attention's ``layer_idx`` is renumbered.

    Raises:
        ValueError: not a BERT-like model (see :func:`encoder_layers`), or an index out of
            range of its layers.
    """
    old = encoder_layers(model)
    bad = [i for i in layers if not 0 <= i < len(old)]
    if bad:
        raise ValueError(
            f"student.layers: index {bad[0]} is out of range; the model has {len(old)} layers"
        )
    model.base_model.encoder.layer = torch.nn.ModuleList(  # type: ignore[union-attr]
        [old[i] for i in layers]
    )
    model.config.num_hidden_layers = len(layers)
    for i, layer in enumerate(encoder_layers(model)):
        attn = getattr(layer, "attention", None)
        self_attn = getattr(attn, "self", None)
        if self_attn is not None and hasattr(self_attn, "layer_idx"):
            self_attn.layer_idx = i
    return model


def student_from_teacher(teacher: PreTrainedModel, layers: list[int]) -> PreTrainedModel:
    """A copy of ``teacher`` that keeps only the given transformer layers, in order.

    Embeddings, pooler and classifier head are copied; student layer i starts from teacher
    layer ``layers[i]``. The teacher is not modified.

    Raises:
        ValueError: see :func:`keep_layers`.
    """
    # A whole deep copy: the copied layers share the student's config object (not each a copy
    # of the teacher's); their attention implementation is read from it at every forward.
    return keep_layers(copy.deepcopy(teacher), layers)


def fresh_student(
    spec: FreshStudent, vocab_size: int, label_names: list[str], max_positions: int
) -> PreTrainedModel:
    """A randomly initialised BERT classifier with the teacher's vocabulary size (one label
    name: a regression model, ``problem_type`` ``regression``)."""
    config = BertConfig(  # type: ignore[call-arg]
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        intermediate_size=spec.intermediate_size,
        max_position_embeddings=max_positions,
        num_labels=len(label_names),
        id2label=dict(enumerate(label_names)),
        label2id={n: i for i, n in enumerate(label_names)},
        problem_type="regression" if len(label_names) == 1 else None,
    )
    return BertForSequenceClassification(config)


def reinitialised(teacher: PreTrainedModel) -> PreTrainedModel:
    """A new model of ``teacher``'s class and configuration (same layers, sizes, labels and
    head) with every weight drawn by the architecture's own initialiser (transformers'
    ``_init_weights``), on the teacher's device; the teacher is not modified. Seed the RNG
    first: the draw is all that makes two such models differ (Born-Again Networks' "a new
    identical model initialised from a different random seed")."""
    model: PreTrainedModel = type(teacher)(copy.deepcopy(teacher.config))
    model.to(next(teacher.parameters()).device)  # type: ignore[arg-type]
    return model
