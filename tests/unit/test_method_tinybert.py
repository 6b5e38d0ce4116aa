"""tinybert: its three losses by hand, attention-score capture on a real tiny BERT, the two
stages with the authors' recipe, fit checks."""

from __future__ import annotations

import math
import re

import pytest
import torch
from pydantic import ValidationError
from transformers import BertConfig, BertForSequenceClassification

from kd_engine import registry
from kd_engine.errors import SpecError
from kd_engine.losses.attention_mse import attention_mse
from kd_engine.losses.hidden_mse import hidden_mse
from kd_engine.losses.soft_cross_entropy import soft_cross_entropy
from kd_engine.methods.base import StepOutputs
from kd_engine.methods.tinybert import TinyBERT, TinyBERTConfig
from kd_engine.models.attention_scores import SCORES_IMPLEMENTATION, record_attentions
from kd_engine.models.shapes import ModelShape
from kd_engine.models.student import student_from_teacher
from kd_engine.spec import TrainingSpec
from kd_engine.stages import STUDENT

LN3 = math.log(3.0)


def shape(layers: int, width: int = 2, heads: int = 1) -> ModelShape:
    return ModelShape(num_layers=layers, hidden_size=width, num_labels=2, num_heads=heads)


def build(config: TinyBERTConfig, teacher: ModelShape, student: ModelShape) -> TinyBERT:
    method = registry.build(config, teacher, student, TrainingSpec())
    assert isinstance(method, TinyBERT)
    method.begin_stage(method.stages(TrainingSpec())[0])
    return method


def ones(batch: int, tokens: int) -> torch.Tensor:
    return torch.ones(batch, tokens, dtype=torch.long)


# --- attention_mse --------------------------------------------------------------------------


def test_attention_mse_by_hand() -> None:
    s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    t = torch.tensor([[[[0.0, 2.0], [3.0, 6.0]]]])
    # Differences 1, 0, 0, -2 over 4 real (query, key) pairs.
    assert float(attention_mse(s, t, ones(1, 2))) == pytest.approx((1 + 4) / 4)


def test_attention_mse_averages_heads() -> None:
    s = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 3.0]]]])  # (1, 2, 2, 2)
    t = torch.zeros(1, 2, 2, 2)
    # Head 0: 1/4, head 1: 9/4; 1/h sum_heads MSE = (1/4 + 9/4) / 2.
    assert float(attention_mse(s, t, ones(1, 2))) == pytest.approx((0.25 + 2.25) / 2)


def test_attention_mse_ignores_masked_queries_and_keys() -> None:
    inf = float("inf")
    # Token 1 is padding: only (query 0, key 0) is real. Masked keys hold -inf as after the
    # additive mask; the padding query row holds garbage.
    s = torch.tensor([[[[2.0, -inf], [50.0, -inf]]]], requires_grad=True)
    t = torch.tensor([[[[-1.0, -inf], [-70.0, -inf]]]])
    got = attention_mse(s, t, torch.tensor([[1, 0]]))
    assert float(got.detach()) == pytest.approx(9.0)
    got.backward()
    assert s.grad is not None
    assert torch.equal(s.grad, torch.tensor([[[[6.0, 0.0], [0.0, 0.0]]]]))


def test_attention_mse_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="same shape"):
        attention_mse(torch.zeros(1, 2, 3, 3), torch.zeros(1, 1, 3, 3), ones(1, 3))
    with pytest.raises(ValueError, match="does not fit"):
        attention_mse(torch.zeros(1, 1, 3, 3), torch.zeros(1, 1, 3, 3), ones(1, 4))
    with pytest.raises(ValueError, match="no real token"):
        attention_mse(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2), torch.zeros(1, 2))


# --- hidden_mse -----------------------------------------------------------------------------


def test_hidden_mse_by_hand_over_real_tokens() -> None:
    s = torch.tensor([[[1.0, 2.0], [100.0, 100.0]], [[0.0, 0.0], [1.0, 1.0]]])
    t = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[0.0, 3.0], [1.0, 0.0]]])
    mask = torch.tensor([[1, 0], [1, 1]])
    # Real tokens: (1,2) vs 0 -> 1 + 4; (0,0) vs (0,3) -> 9; (1,1) vs (1,0) -> 1. 3 tokens x 2.
    assert float(hidden_mse(s, t, mask)) == pytest.approx((1 + 4 + 9 + 1) / 6)


def test_hidden_mse_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="project the student"):
        hidden_mse(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), ones(1, 2))
    with pytest.raises(ValueError, match="does not fit"):
        hidden_mse(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), ones(1, 3))


# --- soft_cross_entropy ---------------------------------------------------------------------


def test_soft_cross_entropy_by_hand() -> None:
    # Row 0: p_t = (3/4, 1/4), p_s = (1/2, 1/2): CE = ln 2.
    # Row 1: p_t = (1/2, 1/2), p_s = (3/4, 1/4): CE = (ln(4/3) + ln 4) / 2.
    s = torch.tensor([[0.0, 0.0], [LN3, 0.0]])
    t = torch.tensor([[LN3, 0.0], [0.0, 0.0]])
    row0, row1 = math.log(2.0), (math.log(4 / 3) + math.log(4.0)) / 2
    assert float(soft_cross_entropy(s, t)) == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_soft_cross_entropy_temperature_divides_the_logits() -> None:
    # (ln 9, 0) / 2 = (ln 3, 0): the same p_t as above, and no t^2 factor.
    got = soft_cross_entropy(torch.zeros(1, 2), torch.tensor([[2 * LN3, 0.0]]), temperature=2.0)
    assert float(got) == pytest.approx(math.log(2.0), rel=1e-6)


def test_soft_cross_entropy_gradient_and_errors() -> None:
    s = torch.tensor([[0.5, -0.5]], requires_grad=True)
    t = torch.tensor([[1.0, 1.0]], requires_grad=True)
    soft_cross_entropy(s, t).backward()
    # d/dz_s = p_s - p_t.
    p0 = 1 / (1 + math.exp(-1.0))
    assert s.grad is not None
    assert s.grad.tolist()[0] == pytest.approx([p0 - 0.5, (1 - p0) - 0.5], rel=1e-5)
    assert t.grad is None
    with pytest.raises(ValueError, match="same shape"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="temperature"):
        soft_cross_entropy(torch.zeros(1, 2), torch.zeros(1, 2), 0.0)


# --- attention scores from a real (tiny, random) BERT ---------------------------------------


@pytest.fixture(scope="module")
def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=30,
        hidden_size=8,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=16,
        max_position_embeddings=16,
        num_labels=2,
    )
    return BertForSequenceClassification(config).eval()


def test_recorded_scores_are_q_k_over_sqrt_d_and_logits_unchanged(
    tiny_bert: BertForSequenceClassification,
) -> None:
    model = tiny_bert
    ids = torch.tensor([[2, 5, 7, 0], [3, 4, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    original = model.config._attn_implementation
    with torch.no_grad():
        reference = model(input_ids=ids, attention_mask=mask).logits
        restore = record_attentions([model, None], scores=True)
        assert model.config._attn_implementation == SCORES_IMPLEMENTATION
        out = model(
            input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True
        )
        restore()
    assert model.config._attn_implementation == original
    assert torch.allclose(out.logits, reference, atol=1e-5)
    layer = model.bert.encoder.layer[1].attention.self
    h = out.hidden_states[1]  # the input of layer 1
    q = layer.query(h).view(2, 4, 2, 4).transpose(1, 2)
    k = layer.key(h).view(2, 4, 2, 4).transpose(1, 2)
    scores = q @ k.transpose(2, 3) / 2.0  # sqrt(d_head = 4)
    got = out.attentions[1]
    assert got.shape == (2, 2, 4, 4)
    real_key = mask.bool()[:, None, None, :].expand_as(got)
    assert torch.allclose(got[real_key], scores.detach()[real_key], atol=1e-5)
    assert bool((got[~real_key] < -1e30).all())  # masked keys carry the additive mask


def test_recorded_probabilities_are_the_softmax_of_the_scores(
    tiny_bert: BertForSequenceClassification,
) -> None:
    ids, mask = torch.tensor([[2, 5, 7, 9]]), torch.tensor([[1, 1, 1, 0]])
    with torch.no_grad():
        restore = record_attentions([tiny_bert], scores=True)
        scores = tiny_bert(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        restore()
        restore = record_attentions([tiny_bert], scores=False)
        assert tiny_bert.config._attn_implementation == "eager"
        probs = tiny_bert(input_ids=ids, attention_mask=mask, output_attentions=True).attentions
        restore()
    for s, p in zip(scores, probs, strict=True):
        assert torch.allclose(torch.softmax(s, dim=-1), p, atol=1e-6)


def test_a_student_cut_from_the_teacher_switches_alone(
    tiny_bert: BertForSequenceClassification,
) -> None:
    # Its copied layers must read the student's config, not a copy of the teacher's.
    student = student_from_teacher(tiny_bert, [1])
    assert all(getattr(m, "config", student.config) is student.config for m in student.modules())
    original = tiny_bert.config._attn_implementation
    restore = record_attentions([student], scores=True)
    with torch.no_grad():
        out = student(input_ids=torch.tensor([[2, 5, 7]]), output_attentions=True)
    restore()
    assert len(out.attentions) == 1 and out.attentions[0].shape == (1, 2, 3, 3)
    assert tiny_bert.config._attn_implementation == original


# --- the method -----------------------------------------------------------------------------


def step_outputs(
    logits: list[float], hidden: list[list[list[float]]], attn: list[list[list[float]]]
) -> StepOutputs:
    """One example; ``hidden`` per hidden state (embeddings first), ``attn`` per layer (T x T,
    one head)."""
    return StepOutputs(
        torch.tensor([logits]),
        tuple(torch.tensor([h]) for h in hidden),
        tuple(torch.tensor([[a]]) for a in attn),
    )


def test_stage_one_loss_by_hand() -> None:
    # Teacher 2 layers, student 1: student layer 0 <- teacher layer 1 (g(1) = 1 * 2, 1-based).
    method = build(TinyBERTConfig(), shape(2), shape(1))
    assert method.mapping == [1]
    [group] = method.param_groups()  # W_e, W_h: the identity at equal widths
    assert (group.name, len(group.modules), group.weight_decay) == ("projections", 2, 0.0)
    student = step_outputs(
        [0.0, 0.0],
        [[[1.0, 0.0], [0.0, 1.0]], [[2.0, 2.0], [0.0, 0.0]]],
        [[[1.0, 2.0], [3.0, 4.0]]],
    )
    teacher = step_outputs(
        [5.0, 0.0],
        [[[1.0, 1.0], [0.0, 1.0]], [[9.0, 9.0], [9.0, 9.0]], [[2.0, 0.0], [1.0, 1.0]]],
        [[[9.0, 9.0], [9.0, 9.0]], [[0.0, 2.0], [3.0, 6.0]]],
    )
    res = method.loss(student, teacher, torch.tensor([1]), ones(1, 2))
    embedding = (0 + 1 + 0 + 0) / 4
    hidden = (0 + 4 + 1 + 1) / 4
    attention = (1 + 0 + 0 + 4) / 4
    assert res.parts == {
        "embedding": pytest.approx(embedding),
        "hidden": pytest.approx(hidden),
        "attention": pytest.approx(attention),
    }
    assert float(res.total.detach()) == pytest.approx(embedding + hidden + attention)


def test_stage_two_is_soft_cross_entropy() -> None:
    method = build(TinyBERTConfig(), shape(2), shape(1))
    method.begin_stage(method.stages(TrainingSpec())[1])
    student = StepOutputs(torch.zeros(1, 2))  # stage 2 needs no hidden states
    teacher = StepOutputs(torch.tensor([[LN3, 0.0]]))
    res = method.loss(student, teacher, torch.tensor([1]), ones(1, 1))
    assert res.parts == {"soft_ce": pytest.approx(math.log(2.0))}
    assert float(res.total.detach()) == pytest.approx(math.log(2.0))
    # The authors' reduction (.mean() over classes) divides by C = 2.
    halved = build(TinyBERTConfig(soft_ce_reduction="class_mean"), shape(2), shape(1))
    halved.begin_stage(halved.stages(TrainingSpec())[1])
    res = halved.loss(student, teacher, torch.tensor([1]), ones(1, 1))
    assert float(res.total.detach()) == pytest.approx(math.log(2.0) / 2)


def test_the_two_stages_follow_the_authors_recipe() -> None:
    """README/task_distill.py: stage 1 10 epochs at a constant 5e-5 (schedule 'none'), no
    evaluation; stage 2 3 epochs at 3e-5, warm-up 0.1, linear decay, eval every 100 steps, the
    student alone (W_e and W_h no longer train), the only stage that may be exported."""
    method = build(TinyBERTConfig(), shape(2), shape(1))
    one, two = method.stages(TrainingSpec(epochs=7, learning_rate=1e-3))
    assert (one.name, one.epochs, one.learning_rate, one.schedule, one.warmup_ratio) == (
        "tinybert intermediate",
        10,
        5e-5,
        "constant",
        0.0,
    )
    assert (one.selects_best, one.evaluates, one.trains) == (False, False, None)
    assert (two.name, two.epochs, two.learning_rate, two.schedule, two.warmup_ratio) == (
        "tinybert prediction",
        3,
        3e-5,
        "linear",
        0.1,
    )
    assert (two.selects_best, two.trains, two.eval_every_steps) == (True, (STUDENT,), 100)
    custom = TinyBERTConfig(intermediate_epochs=0, prediction_epochs=2)
    [only] = build(custom, shape(2), shape(1)).stages(TrainingSpec())
    assert (only.name, only.epochs) == ("tinybert prediction", 2)


def random_outputs(layers: int, g: torch.Generator, width: int = 4) -> StepOutputs:
    return StepOutputs(
        torch.randn(2, 3, generator=g),
        tuple(torch.randn(2, 5, width, generator=g) for _ in range(layers + 1)),
        tuple(torch.randn(2, 2, 5, 5, generator=g) for _ in range(layers)),
    )


def test_student_identical_to_teacher_has_zero_stage_one_loss() -> None:
    same = random_outputs(3, torch.Generator().manual_seed(0))
    method = build(TinyBERTConfig(), shape(3, width=4, heads=2), shape(3, width=4, heads=2))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    res = method.loss(same, same, torch.tensor([0, 1]), mask)
    assert float(res.total.detach()) == pytest.approx(0.0, abs=1e-10)


def test_probabilities_ignore_a_constant_shift_of_the_scores() -> None:
    teacher = random_outputs(2, torch.Generator().manual_seed(1))
    assert teacher.attentions is not None
    shifted = StepOutputs(
        teacher.logits, teacher.hidden_states, tuple(a + 3.0 for a in teacher.attentions)
    )
    mask = ones(2, 5)
    same_shape = shape(2, width=4, heads=2)
    probs = build(TinyBERTConfig(attention_target="probabilities"), same_shape, same_shape)
    scores = build(TinyBERTConfig(), same_shape, same_shape)
    assert probs.loss(shifted, teacher, torch.tensor([0, 1]), mask).parts[
        "attention"
    ] == pytest.approx(0.0, abs=1e-10)
    # Scores: each of the 2 layers is off by 3 everywhere.
    got = scores.loss(shifted, teacher, torch.tensor([0, 1]), mask).parts["attention"]
    assert got == pytest.approx(2 * 9.0, rel=1e-5)


def test_projections_train_when_widths_differ() -> None:
    g = torch.Generator().manual_seed(2)
    method = build(TinyBERTConfig(), shape(4, width=6, heads=2), shape(2, width=4, heads=2))
    assert method.mapping == [1, 3]
    w_e, w_h = method.param_groups()[0].modules
    assert isinstance(w_h, torch.nn.Linear) and (w_h.in_features, w_h.out_features) == (4, 6)
    res = method.loss(
        random_outputs(2, g), random_outputs(4, g, width=6), torch.tensor([0, 1]), ones(2, 5)
    )
    res.total.backward()
    for module in (w_e, w_h):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize(
    ("config", "teacher", "student", "field", "reason"),
    [
        (
            TinyBERTConfig(),
            shape(12, heads=12),
            shape(4, heads=4),
            "student.num_heads",
            r"12 heads, not 4",
        ),
        (
            TinyBERTConfig(layer_mapping=[2, 6]),
            shape(6),
            shape(2),
            "method.layer_mapping",
            r"^teacher layer 6 is out of",
        ),
        (
            TinyBERTConfig(layer_mapping=[0, 1, 2]),
            shape(6),
            shape(2),
            "method.layer_mapping",
            r"^lists 3 teacher layers",
        ),
        (TinyBERTConfig(), shape(2), shape(3), "student.num_layers", r"^the student has 3 layers"),
    ],
)
def test_impossible_models_are_rejected_naming_the_field(
    config: TinyBERTConfig, teacher: ModelShape, student: ModelShape, field: str, reason: str
) -> None:
    for call in (registry.check, registry.build):
        with pytest.raises(SpecError) as info:
            call(config, teacher, student, TrainingSpec())
        assert info.value.field == field
        assert re.search(reason, info.value.reason), info.value.reason


def test_an_explicit_mapping_is_used() -> None:
    assert build(TinyBERTConfig(layer_mapping=[4]), shape(6), shape(2)).mapping == [4]


def test_loss_needs_teacher_and_attentions() -> None:
    g = torch.Generator().manual_seed(3)
    out = random_outputs(2, g)
    method = build(TinyBERTConfig(), shape(2, width=4, heads=2), shape(2, width=4, heads=2))
    with pytest.raises(ValueError, match="teacher"):
        method.loss(out, None, torch.tensor([0, 1]), ones(2, 5))
    no_attn = StepOutputs(out.logits, out.hidden_states)
    with pytest.raises(ValueError, match="attentions"):
        method.loss(no_attn, out, torch.tensor([0, 1]), ones(2, 5))


def test_config_defaults_and_bounds() -> None:
    cfg = TinyBERTConfig()
    assert (cfg.intermediate_epochs, cfg.temperature, cfg.attention_target) == (10, 1.0, "scores")
    assert (cfg.prediction_epochs, cfg.soft_ce_reduction) == (3, "batchmean")
    assert (
        TinyBERT.needs.attentions
        and TinyBERT.needs.attention_scores
        and TinyBERT.needs.hidden_states
    )
    for bad in (
        {"intermediate_epochs": -1},
        {"prediction_epochs": 0},
        {"temperature": 0.0},
        {"attention_target": "x"},
    ):
        with pytest.raises(ValidationError):
            TinyBERTConfig.model_validate(bad)
    with pytest.raises(ValidationError, match="0-based"):
        TinyBERTConfig(layer_mapping=[0, -2])
