"""The method registry, Finetune and VanillaKD losses."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, cast

import pytest
import torch
from pydantic import ValidationError
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kd_engine import registry
from kd_engine.data.batching import encode_corpus
from kd_engine.errors import SpecError
from kd_engine.methods.base import Method, Resources, StepOutputs
from kd_engine.methods.chain import ChainMethod
from kd_engine.methods.finetune import Finetune, FinetuneConfig
from kd_engine.methods.vanilla_kd import VanillaKD, VanillaKDConfig
from kd_engine.models.loading import load_tokenizer
from kd_engine.models.shapes import ModelShape, shape_from_config
from kd_engine.references import builtin_model_path
from kd_engine.spec import JobSpec, TrainingSpec
from kd_engine.stages import STUDENT as STUDENT_GROUP
from kd_engine.stages import Stage
from kd_engine.trainer import train

STUDENT = [[1.0, 2.0, 0.0], [0.0, 0.0, 1.0]]
TEACHER = [[3.0, 0.0, -1.0], [0.0, 2.0, 1.0]]
LABELS = [1, 2]
MASK = torch.ones(2, 4, dtype=torch.long)


def softmax(row: list[float], tau: float = 1.0) -> list[float]:
    exps = [math.exp(z / tau) for z in row]
    return [e / sum(exps) for e in exps]


def hand_ce() -> float:
    return -sum(math.log(softmax(r)[y]) for r, y in zip(STUDENT, LABELS, strict=True)) / 2


def hand_kd(tau: float) -> float:
    total = 0.0
    for s_row, t_row in zip(STUDENT, TEACHER, strict=True):
        p_s, p_t = softmax(s_row, tau), softmax(t_row, tau)
        total += sum(t * math.log(t / s) for s, t in zip(p_s, p_t, strict=True))
    return tau**2 * total / 2


def outputs(logits: list[list[float]]) -> StepOutputs:
    return StepOutputs(logits=torch.tensor(logits))


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_vanilla_kd_loss_mixes_ce_and_kd(alpha: float, tau: float) -> None:
    method = VanillaKD(VanillaKDConfig(alpha=alpha, temperature=tau), TEACHER_SHAPE, STUDENT_SHAPE)
    res = method.loss(outputs(STUDENT), outputs(TEACHER), torch.tensor(LABELS), MASK)
    ce, kd = hand_ce(), hand_kd(tau)
    assert float(res.total) == pytest.approx((1 - alpha) * ce + alpha * kd, rel=1e-5)
    assert res.parts["ce"] == pytest.approx(ce, rel=1e-5)
    assert res.parts["kd"] == pytest.approx(kd, rel=1e-5)


def test_vanilla_kd_alpha_zero_ignores_teacher() -> None:
    method = VanillaKD(VanillaKDConfig(alpha=0.0), TEACHER_SHAPE, STUDENT_SHAPE)
    a = method.loss(outputs(STUDENT), outputs(TEACHER), torch.tensor(LABELS), MASK)
    b = method.loss(outputs(STUDENT), outputs(STUDENT), torch.tensor(LABELS), MASK)
    assert float(a.total) == pytest.approx(float(b.total), rel=1e-6)


def test_vanilla_kd_without_teacher_raises() -> None:
    method = VanillaKD(VanillaKDConfig(), TEACHER_SHAPE, STUDENT_SHAPE)
    assert method.needs.teacher
    with pytest.raises(ValueError, match="teacher"):
        method.loss(outputs(STUDENT), None, torch.tensor(LABELS), MASK)


def test_vanilla_kd_config_defaults_and_bounds() -> None:
    cfg = VanillaKDConfig()
    assert (cfg.name, cfg.alpha, cfg.temperature) == ("vanilla_kd", 0.5, 2.0)
    with pytest.raises(ValidationError):
        VanillaKDConfig(alpha=-0.1)
    with pytest.raises(ValidationError):
        VanillaKDConfig(temperature=0.0)


def test_finetune_loss_is_ce_and_needs_no_teacher() -> None:
    method = Finetune(FinetuneConfig(), TEACHER_SHAPE, STUDENT_SHAPE)
    assert not method.needs.teacher
    res = method.loss(outputs(STUDENT), None, torch.tensor(LABELS), MASK)
    assert float(res.total) == pytest.approx(hand_ce(), rel=1e-6)
    assert res.parts == {"ce": pytest.approx(hand_ce(), rel=1e-6)}
    # A teacher, when given anyway, changes nothing.
    with_teacher = method.loss(outputs(STUDENT), outputs(TEACHER), torch.tensor(LABELS), MASK)
    assert float(with_teacher.total) == pytest.approx(hand_ce(), rel=1e-6)


def test_registry_names_include_builtin_methods() -> None:
    names = registry.names()
    assert {"finetune", "vanilla_kd"} <= set(names)
    assert names == sorted(names)
    assert registry.get("vanilla_kd").config_cls is VanillaKDConfig
    assert registry.get("vanilla_kd").method_cls is VanillaKD
    shapes = (TEACHER_SHAPE, STUDENT_SHAPE, TrainingSpec())
    assert isinstance(registry.build(VanillaKDConfig(), *shapes), VanillaKD)
    assert isinstance(registry.build(FinetuneConfig(), *shapes), Finetune)


def test_registry_duplicate_name_raises() -> None:
    before = registry.get("finetune")
    with pytest.raises(ValueError, match="finetune"):
        registry.register("finetune", Finetune)
    assert registry.get("finetune") is before


def test_registry_unknown_name_lists_known_names() -> None:
    with pytest.raises(KeyError) as info:
        registry.get("no_such_method")
    message = str(info.value)
    assert "no_such_method" in message
    for name in registry.names():
        assert name in message


# Small shapes every method is bound to before its loss: layer-mapping methods need a teacher
# deeper than the student; hidden states and attentions are drawn to match them.
CPU = torch.device("cpu")
TEACHER_SHAPE = ModelShape(num_layers=4, hidden_size=8, num_labels=3, num_heads=2)
STUDENT_SHAPE = ModelShape(num_layers=2, hidden_size=8, num_labels=3, num_heads=2)
# Methods whose student has the teacher's architecture are bound to a student of its shape.
SAME_ARCHITECTURE = {"born_again": TEACHER_SHAPE}


def _random_outputs(
    batch: int, classes: int, method: object, generator: torch.Generator, shape: ModelShape
) -> StepOutputs:
    hidden = attn = None
    seq, width, heads = 5, shape.hidden_size, shape.num_heads or 1
    if method.needs.hidden_states:
        hidden = tuple(
            torch.randn(batch, seq, width, generator=generator) for _ in range(shape.num_layers + 1)
        )
    if method.needs.attentions:
        attn = tuple(
            torch.rand(batch, heads, seq, seq, generator=generator) for _ in range(shape.num_layers)
        )
    return StepOutputs(torch.randn(batch, classes, generator=generator), hidden, attn)


@pytest.mark.parametrize("name", registry.names())
def test_every_registered_method_gives_a_finite_loss(name: str) -> None:
    entry = registry.get(name)
    config = entry.config_cls(name=name)
    assert config == entry.config_cls.model_validate({"name": name})
    # The job spec accepts the method by name with its defaults.
    spec = JobSpec.model_validate(
        {"teacher": "builtin:minilm-l6", "method": {"name": name}, "dataset": {"source": "x"}}
    )
    assert spec.method == config
    student_shape = SAME_ARCHITECTURE.get(name, STUDENT_SHAPE)
    built = registry.build(config, TEACHER_SHAPE, student_shape, TrainingSpec())
    # A chain (takd, born_again, ...) trains one model per hop, each with its own method.
    methods = built.hop_methods if isinstance(built, ChainMethod) else [built]
    for method in methods:
        stages = method.stages(TrainingSpec())
        assert stages
        if method.needs.models:
            # An augmentation method's loss needs real models bound to it (a generator, a
            # neighbour index): it trains a step of each stage on tiny real ones.
            _check_bound_training(config, classes=3)
            continue
        for stage in stages:  # every stage's loss
            method.begin_stage(stage)
            _check_one_loss(method, stage)


def _check_one_loss(method: Method, stage: Stage, classes: int = 3) -> None:
    """One batch of 4 through the stage's loss: finite, and its gradient reaches what the stage
    trains. ``classes`` 1 is a regression task (float targets)."""
    g = torch.Generator().manual_seed(0)
    student = _random_outputs(4, classes, method, g, STUDENT_SHAPE)
    student_tensors = [
        student.logits,
        *(student.hidden_states or ()),
        *(student.attentions or ()),
    ]
    for tensor in student_tensors:
        tensor.requires_grad_(True)
    teacher = (
        _random_outputs(4, classes, method, g, TEACHER_SHAPE) if method.needs.teacher else None
    )
    labels = torch.tensor([0, 1, 2, 1]) if classes > 1 else torch.tensor([0.5, -1.0, 2.0, 0.1])
    res = method.loss(student, teacher, labels, torch.ones(4, 5, dtype=torch.long))
    assert res.total.shape == ()
    assert torch.isfinite(res.total)
    assert all(math.isfinite(v) for v in res.parts.values())
    res.total.backward()
    if stage.trains is not None and STUDENT_GROUP not in stage.trains:
        # A stage that trains only the method's own modules (universal_kd's teacher probes):
        # the gradient reaches them.
        own = [p for g in method.param_groups() if g.name in stage.trains for p in g.parameters()]
        assert own and all(p.grad is not None and torch.isfinite(p.grad).all() for p in own)
        return
    # The gradient reaches the student's outputs (its logits, or, for a stage that matches
    # intermediate layers only, its hidden states or attentions), and it is finite.
    grads = [t.grad for t in student_tensors if t.grad is not None]
    assert grads, stage.name
    assert all(torch.isfinite(grad).all() for grad in grads)


def _tiny_bert(classes: int, seed: int) -> PreTrainedModel:
    """A random 2-layer, 32-wide BERT classifier (``classes`` 1: regression) on the MiniLM
    tokenizer's vocabulary (30522 ids), seeded."""
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=_tokenizer().vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        problem_type="regression" if classes == 1 else "single_label_classification",
    )
    config.num_labels = classes
    return BertForSequenceClassification(config)


@functools.cache
def _tokenizer() -> PreTrainedTokenizerBase:
    """The built-in MiniLM's tokenizer (it has a [MASK] token, which a generator needs)."""
    return load_tokenizer(builtin_model_path("minilm-l6"))


TINY_TEXTS = [
    "a moving, funny film", "dull and far too long", "the cast is superb", "a mess of a plot",
    "i laughed all the way", "nothing works here", "warm, clever and kind", "a tired sequel",
]  # fmt: skip


SMALL_BOUND = {
    "generator_steps": 1,
    "student_steps": 1,
    "generator_layers": 1,
    "num_neighbors": 4,
    "num_candidates": 2,
}
"""Small settings of the methods that bind models, each applied where the method has it."""


def _check_bound_training(config: Any, classes: int) -> None:
    """A method that binds models (a generator, a corpus of neighbours) bound to a tiny real
    teacher and student (:func:`_tiny_bert`) and trained by the real loop, one step per stage
    (``classes`` 1 is a regression task, float targets): every stage ran its step, its losses
    are finite, and the student's weights moved."""
    tokenizer = _tokenizer()
    pad = int(tokenizer.pad_token_id)
    labels: list[int | float] = (
        [0.5, -1.0, 2.0, 0.1, 1.5, -0.5, 0.0, 1.0] if classes == 1 else [0, 1, 2, 1, 0, 2, 1, 0]
    )
    data = dataclasses.replace(encode_corpus(TINY_TEXTS, tokenizer, 16), labels=labels)
    teacher, student = _tiny_bert(classes, 0).eval(), _tiny_bert(classes, 1)
    training = TrainingSpec(
        epochs=1, batch_size=4, max_seq_length=16, max_steps=1, learning_rate=1e-2, device="cpu"
    )
    t_shape, s_shape = (shape_from_config(m.config.to_dict(), classes) for m in (teacher, student))
    small = {k: v for k, v in SMALL_BOUND.items() if k in type(config).model_fields}
    config = type(config).model_validate({**config.model_dump(), **small})
    registry.check(config, t_shape, s_shape, training)
    method = registry.build(config, t_shape, s_shape, training)
    method.bind(
        Resources(
            student=student,
            teacher=teacher,
            device=CPU,
            pad_id=pad,
            mask_id=tokenizer.mask_token_id,
            special_ids=frozenset(int(i) for i in tokenizer.all_special_ids),
            corpus=encode_corpus(TINY_TEXTS[::-1] * 2, tokenizer, 16),
            training=training,
        )
    )
    before = [p.detach().clone() for p in student.parameters()]
    result = train(student, teacher, method, data, data, training, pad, CPU)
    assert [st["steps"] for st in result.stages] == [1] * len(method.stages(training))
    losses = [v for r in result.history for v in cast(dict[str, float], r["train_losses"]).values()]
    assert losses and all(math.isfinite(v) for v in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, student.parameters(), strict=True))


# Methods that compare class distributions of their own (pseudo classifiers, a virtual
# teacher, class-conditional negatives): a one-output regression task has none.
NOT_FOR_REGRESSION = {"universal_kd", "teacher_free", "codir"}


@pytest.mark.parametrize("name", registry.names())
def test_every_method_runs_a_regression_task_or_refuses_it_by_name(name: str) -> None:
    teacher = dataclasses.replace(TEACHER_SHAPE, num_labels=1)
    student = dataclasses.replace(SAME_ARCHITECTURE.get(name, STUDENT_SHAPE), num_labels=1)
    config = registry.get(name).config_cls.model_validate({"name": name})
    if name in NOT_FOR_REGRESSION:
        with pytest.raises(SpecError) as info:
            registry.check(config, teacher, student, TrainingSpec())
        assert info.value.field == "method.name"
        return
    built = registry.build(config, teacher, student, TrainingSpec())
    methods = built.hop_methods if isinstance(built, ChainMethod) else [built]
    for method in methods:
        if method.needs.models:  # its loss needs real models: a step of each stage on tiny ones
            _check_bound_training(config, classes=1)
            continue
        for stage in method.stages(TrainingSpec()):
            method.begin_stage(stage)
            _check_one_loss(method, stage, classes=1)


@pytest.mark.parametrize("name", registry.names())
def test_checking_a_method_allocates_no_parameters(name: str) -> None:
    """The API's check looks at shapes only: no module registers a parameter, however large
    the models and settings (a fresh 48 x 4096 student, crd.projection_size 8192 made the
    API allocate 2.1 GB when checking built the projections). Building does allocate."""
    big_teacher = ModelShape(num_layers=48, hidden_size=4096, num_labels=3, num_heads=64)
    big_student = ModelShape(num_layers=24, hidden_size=4096, num_labels=3, num_heads=64)
    if name in SAME_ARCHITECTURE:
        big_student = big_teacher
    settings = {"crd": {"projection_size": 8192}}.get(name, {})
    config = registry.get(name).config_cls.model_validate({"name": name, **settings})
    registered: list[str] = []
    handle = torch.nn.modules.module.register_module_parameter_registration_hook(
        lambda module, param_name, param: registered.append(param_name)
    )
    try:
        registry.check(config, big_teacher, big_student, TrainingSpec())
        assert registered == []
        small = registry.build(
            config, TEACHER_SHAPE, SAME_ARCHITECTURE.get(name, STUDENT_SHAPE), TrainingSpec()
        )
    finally:
        handle.remove()
    if small.needs.models:  # its modules (a generator) are built by bind(), from real models
        return
    own = [p for g in small.param_groups() for m in g.modules for p in m.parameters()]
    assert len(registered) >= len(own)


def test_every_method_declares_what_its_hooks_need() -> None:
    """The loop computes what a method's ``Needs`` declare and never looks at which hooks a
    class overrides: a method with its own ``augment``, generator steps or ``bind`` that did
    not declare them would silently train without them. (This test is the one place that
    looks at overrides.)"""
    declared = {}
    for name in registry.names():
        cls = registry.get(name).method_cls
        needs = cls.needs
        if cls.augment is not Method.augment:
            assert needs.augmented, name
        if cls.generator_step is not Method.generator_step:
            assert needs.generator, name
        if cls.bind is not Method.bind:
            assert needs.models, name
        if needs.attention_scores:
            assert needs.attentions, name
        declared[name] = needs
    assert declared["mate_kd"].generator and declared["minimax_knn"].augmented
    assert not declared["minimax_knn"].generator and not declared["finetune"].teacher
    assert declared["vanilla_kd"].teacher_inference_only
    assert not declared["cilda"].teacher_inference_only
