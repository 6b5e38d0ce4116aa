"""minimax_knn: the corpus, the angular filter, the largest-KL selection (hand-made tensors),
the loss (hand-computed), neighbour choice with real models, and a tiny job end to end."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_engine import registry
from kd_engine.augment.neighbours import (
    candidate_scores,
    filter_candidates,
    nearest_neighbours,
    select_largest_kl,
)
from kd_engine.data.batching import encode, encode_corpus
from kd_engine.data.builtins import BUILTIN_DATASETS
from kd_engine.data.corpus import load_corpus, split_sentences
from kd_engine.data.examples import TransferSet
from kd_engine.errors import SpecError
from kd_engine.evaluation import predict_logits
from kd_engine.methods.base import Resources, StepOutputs
from kd_engine.methods.minimax_knn import MinimaxKNN, MinimaxKNNConfig
from kd_engine.models.shapes import ModelShape
from kd_engine.run import LOG_FILE, METRICS_FILE, RunResult, run_job
from kd_engine.spec import JobSpec, TrainingSpec
from tests.checks import NO_EXTRAS

CPU = torch.device("cpu")
SHAPE = ModelShape(num_layers=6, hidden_size=384, num_labels=2, num_heads=12)


def no_files(ref: str) -> Path:
    raise ValueError(f"no file references here: {ref!r}")


def kl(t: list[float], s: list[float], tau: float) -> float:
    """KL(softmax(t / tau) || softmax(s / tau)) by hand."""

    def softmax(z: list[float]) -> list[float]:
        e = [math.exp(v / tau) for v in z]
        return [v / sum(e) for v in e]

    p, q = softmax(t), softmax(s)
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True))


# --- selection -------------------------------------------------------------------------


def test_candidate_scores_are_kl_teacher_to_student_at_tau() -> None:
    t, s = [2.0, -1.0, 0.5], [0.0, 1.0, 0.0]
    got = candidate_scores(torch.tensor([s]), torch.tensor([t]), 2.0)
    assert float(got[0]) == pytest.approx(kl(t, s, 2.0), rel=1e-5)
    assert float(got[0]) != pytest.approx(kl(s, t, 2.0), rel=1e-3)  # the direction matters


def test_candidate_scores_for_one_output_are_squared_differences() -> None:
    got = candidate_scores(torch.tensor([[1.5], [-1.0]]), torch.tensor([[0.5], [1.0]]), 2.0)
    assert got.tolist() == pytest.approx([1.0, 4.0])


def test_select_largest_kl_keeps_the_k_largest_never_masked_ties_to_the_closer() -> None:
    teacher = torch.zeros(2, 4, 2)
    # KL(uniform || softmax(s / tau)) grows with |s0 - s1|.
    student = torch.tensor(
        [
            [[0.0, 1.0], [0.0, 4.0], [0.0, 9.0], [0.0, 2.0]],  # largest: 2, 1, then 3
            [[0.0, 3.0], [0.0, 3.0], [0.0, 8.0], [0.0, 3.0]],  # 2 is masked; 0, 1, 3 tie
        ]
    )
    mask = torch.tensor([[True, True, True, True], [True, True, False, True]])
    sel = select_largest_kl(student, teacher, mask, 2, 2.0)
    assert sel.index.tolist() == [[2, 1], [0, 1]]
    assert sel.valid.all()
    expected = [
        [kl([0, 0], [0, 9], 2.0), kl([0, 0], [0, 4], 2.0)],
        [kl([0, 0], [0, 3], 2.0)] * 2,
    ]
    assert sel.score.tolist() == [pytest.approx(row, rel=1e-5) for row in expected]
    k3 = select_largest_kl(student, teacher, mask, 3, 2.0)
    assert k3.index.tolist() == [[2, 1, 3], [0, 1, 3]]


def test_select_largest_kl_marks_missing_candidates_invalid() -> None:
    student = torch.tensor([[[0.0, 5.0], [0.0, 1.0], [0.0, 9.0]]])
    mask = torch.tensor([[False, True, False]])
    sel = select_largest_kl(student, torch.zeros_like(student), mask, 2, 1.0)
    assert sel.index[0, 0] == 1 and sel.valid.tolist() == [[True, False]]
    assert sel.score[0, 1] == -math.inf


def test_select_largest_kl_rejects_bad_shapes() -> None:
    with pytest.raises(ValueError, match="mask"):
        select_largest_kl(torch.zeros(2, 3, 2), torch.zeros(2, 3, 2), torch.ones(2, 4).bool(), 1, 1)


# --- retrieval and filter ----------------------------------------------------------------


def unit(degrees: float) -> list[float]:
    return [math.cos(math.radians(degrees)), math.sin(math.radians(degrees))]


def test_nearest_neighbours_and_the_angular_filter_on_hand_made_vectors() -> None:
    # corpus rows at 50, 0 (a duplicate of the query), 90, 10 and 30 degrees from the query
    corpus = torch.tensor([unit(50), unit(0), unit(90), unit(10), unit(30)])
    query = torch.tensor([unit(0)])
    rows, cosine = nearest_neighbours(query, corpus, 5)
    assert rows.tolist() == [[1, 3, 4, 0, 2]]  # closest first
    assert cosine[0].tolist() == pytest.approx(
        [math.cos(math.radians(a)) for a in (0, 10, 30, 50, 90)]
    )
    # d = angle / 180: 0, 0.056, 0.167, 0.278, 0.5
    pool = filter_candidates(rows, cosine, 0.0, 0.22, 8)
    assert pool.rows.tolist() == [[3, 4, -1, -1, -1]]  # the duplicate (d = 0) is out
    assert pool.mask.tolist() == [[True, True, False, False, False]]
    assert pool.distance[0, :2].tolist() == pytest.approx([10 / 180, 30 / 180], rel=1e-5)
    band = filter_candidates(rows, cosine, 0.1, 0.3, 8)
    assert band.rows[0, :2].tolist() == [4, 0] and int(band.mask.sum()) == 2
    closest = filter_candidates(rows, cosine, 0.0, 0.0, 2)  # max 0: no upper bound
    assert closest.rows.tolist() == [[3, 4]]
    assert filter_candidates(rows, cosine, 0.0, 0.0, 8).mask.sum() == 4


# --- the corpus ----------------------------------------------------------------------------


def test_split_sentences() -> None:
    text = 'He runs. "Then?" She (Holmes) waits!\n\nDr. No is 2 hours.  Done'
    assert split_sentences(text) == [
        "He runs.",
        '"Then?"',
        "She (Holmes) waits!",
        "Dr.",
        "No is 2 hours.",
        "Done",
    ]


def test_builtin_plot_corpus_is_not_the_labelled_set() -> None:
    texts = load_corpus("builtin:rotten_tomatoes_plot", "text", no_files)
    assert len(texts) > 5000 and len(set(texts)) == len(texts)
    assert all(len(t.split()) >= 4 for t in texts)
    reviews, _ = BUILTIN_DATASETS["rotten_tomatoes"]()
    labelled = {e.text.strip() for e in reviews}
    assert not labelled & set(texts)
    capped = load_corpus("builtin:rotten_tomatoes_plot", "text", no_files, 200, seed=0)
    assert len(capped) == 200 and set(capped) <= set(texts)
    assert capped == load_corpus("builtin:rotten_tomatoes_plot", "text", no_files, 200, seed=0)
    assert capped != load_corpus("builtin:rotten_tomatoes_plot", "text", no_files, 200, seed=1)


def test_file_corpus_and_its_errors(tmp_path: Path) -> None:
    good = tmp_path / "c.jsonl"
    good.write_text('{"sentence": "a b c d"}\n{"sentence": "e f g h"}\n', encoding="utf-8")
    resolve = {"file://c.jsonl": good}.__getitem__
    assert load_corpus("file://c.jsonl", "sentence", resolve) == ["a b c d", "e f g h"]
    with pytest.raises(SpecError) as info:
        load_corpus("file://c.jsonl", "text", resolve)
    assert info.value.field == "method.corpus_text_column"
    empty = tmp_path / "e.csv"
    empty.write_text("text\n", encoding="utf-8")
    for ref, resolver in [
        ("builtin:nope", no_files),
        ("file://missing.csv", no_files),
        ("s3://x", no_files),
        ("file://e.csv", {"file://e.csv": empty}.__getitem__),
    ]:
        with pytest.raises(SpecError) as info:
            load_corpus(ref, "text", resolver)
        assert info.value.field == "method.corpus", ref


# --- settings and loss ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "epochs", "field"),
    [
        ({"num_augments": 9}, 3, "method.num_augments"),
        ({"num_candidates": 40}, 3, "method.num_candidates"),
        ({"min_distance": 0.3, "max_distance": 0.2}, 3, "method.min_distance"),
        ({"augment_start_epoch": 7}, 6, "method.augment_start_epoch"),
    ],
)
def test_check_names_the_setting(settings: dict[str, Any], epochs: int, field: str) -> None:
    config = MinimaxKNNConfig(**settings)
    with pytest.raises(SpecError) as info:
        registry.check(config, SHAPE, SHAPE, TrainingSpec(epochs=epochs))
    assert info.value.field == field


def test_defaults() -> None:
    c = MinimaxKNNConfig()
    assert (c.corpus, c.num_candidates, c.num_augments, c.max_distance) == (
        "builtin:rotten_tomatoes_plot",
        8,
        1,
        0.0,
    )
    assert (c.temperature, c.alpha_ce, c.alpha_true, c.alpha_aug) == (2.0, 0.5, 0.5, None)
    assert c.augment_start_epoch == 1 and c.num_neighbors >= c.num_candidates


def test_loss_sums_kd_ce_and_a_kd_per_rank() -> None:
    method = MinimaxKNN(MinimaxKNNConfig(alpha_ce=0.4, alpha_true=0.6, alpha_aug=0.3), SHAPE, SHAPE)
    method.start_step(1, 0)
    s, t = [[1.0, 0.0], [0.0, 2.0]], [[2.0, 0.0], [0.0, 0.0]]
    s_aug = [[0.5, 0.0], [0.0, 1.0], [3.0, 0.0]]
    t_aug = [[0.0, 0.5], [1.0, 1.0], [0.0, 0.0]]
    method.ranks = torch.tensor([1, 1, 2])
    student = StepOutputs(torch.tensor(s), augmented=StepOutputs(torch.tensor(s_aug)))
    teacher = StepOutputs(torch.tensor(t), augmented=StepOutputs(torch.tensor(t_aug)))
    res = method.loss(student, teacher, torch.tensor([0, 1]), torch.ones(2, 3))
    tau = 2.0
    kd = tau**2 * (kl(t[0], s[0], tau) + kl(t[1], s[1], tau)) / 2
    ce = (
        -math.log(math.exp(1) / (math.exp(1) + 1)) - math.log(math.exp(2) / (1 + math.exp(2)))
    ) / 2
    rank1 = tau**2 * (kl(t_aug[0], s_aug[0], tau) + kl(t_aug[1], s_aug[1], tau)) / 2
    rank2 = tau**2 * kl(t_aug[2], s_aug[2], tau)
    assert float(res.total) == pytest.approx(0.4 * kd + 0.6 * ce + 0.3 * (rank1 + rank2), rel=1e-5)
    assert res.parts["kd_augmented"] == pytest.approx(rank1 + rank2, rel=1e-5)
    method.ranks = None  # a batch with no candidate: originals only
    plain = method.loss(student, teacher, torch.tensor([0, 1]), torch.ones(2, 3))
    assert float(plain.total) == pytest.approx(0.4 * kd + 0.6 * ce, rel=1e-5)


# --- neighbour choice with real models ------------------------------------------------------


@pytest.mark.slow  # MiniLM over a 96-row corpus, three times
def test_chooses_the_largest_kl_candidates_of_the_current_student(
    minilm_classifier: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    rotten_tomatoes: TransferSet,
) -> None:
    torch.manual_seed(0)
    teacher = minilm_classifier
    student = copy.deepcopy(minilm_classifier).train()
    torch.nn.init.normal_(student.classifier.weight, std=0.5)
    texts = load_corpus("builtin:rotten_tomatoes_plot", "text", no_files, 96, seed=0)
    corpus = encode_corpus(texts, tokenizer, 32)
    train = encode(rotten_tomatoes.train[:12], tokenizer, 32)
    config = MinimaxKNNConfig(num_neighbors=6, num_candidates=4, num_augments=2)
    method = MinimaxKNN(config, SHAPE, SHAPE)
    pad = int(tokenizer.pad_token_id)
    method.bind(Resources(student=student, teacher=teacher, device=CPU, pad_id=pad, corpus=corpus))
    method.prepare(train)
    assert method.report()["corpus_rows"] == 96
    assert method.report()["candidates_per_example_mean"] == 4.0
    pool = method.candidates
    assert pool is not None
    t_all = predict_logits(teacher, corpus, 32, pad, CPU)
    assert torch.allclose(method.corpus_logits, t_all, atol=1e-4)  # type: ignore[arg-type]

    def expected_choices() -> list[list[int]]:
        s_all = predict_logits(student, corpus, 32, pad, CPU)
        out = []
        for row in pool.rows:
            scores = candidate_scores(s_all[row], t_all[row], 2.0)
            out.append([int(row[j]) for j in scores.argsort(descending=True)[:2]])
        return out

    from kd_engine.data.batching import collate

    batch = collate(train, list(range(len(train))), pad)
    method.start_step(1, 0)
    augmented = method.augment(batch)
    assert augmented is not None and method.ranks is not None
    assert method.ranks.tolist() == [1] * 12 + [2] * 12  # grouped by rank
    chosen = [[r for e, rank, r, _ in method.chosen if e == i] for i in train.ids]
    before = expected_choices()
    assert chosen == before
    assert augmented["input_ids"].shape[0] == 24
    first = method.chosen[0][2]
    assert (
        augmented["input_ids"][0, : len(corpus.input_ids[first])].tolist()
        == corpus.input_ids[first]
    )
    with torch.no_grad():  # the student changes: the choice follows it
        torch.nn.init.normal_(student.classifier.weight, std=0.5)
    method.augment(batch)
    after = [[r for e, rank, r, _ in method.chosen if e == i] for i in train.ids]
    assert after == expected_choices() and after != before
    assert student.training  # the student's mode is given back


# --- a tiny job end to end -----------------------------------------------------------------

DATASET = {"source": "builtin:rotten_tomatoes", "max_train_examples": 48, "max_eval_examples": 32}
TRAINING = {"epochs": 1, "batch_size": 16, "max_seq_length": 32, "device": "cpu"}


def make_spec(method: dict[str, Any], teacher: str = "builtin:minilm-l6") -> JobSpec:
    return JobSpec.model_validate(
        {
            "teacher": teacher,
            "student": {"type": "from_teacher", "num_layers": 2},
            "method": method,
            "dataset": DATASET,
            "training": TRAINING,
            "export": NO_EXTRAS,  # exported and checked in test_onnx_export
        }
    )


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    out = tmp_path_factory.mktemp("teacher")
    run_job(make_spec({"name": "finetune"}), minilm_path, no_files, out)
    return out


def test_run_job_writes_the_chosen_neighbours(
    teacher_dir: Path, tmp_path: Path, tokenizer: PreTrainedTokenizerBase
) -> None:
    method = {"name": "minimax_knn", "max_corpus_examples": 200}
    out = tmp_path / "job"
    result: RunResult = run_job(make_spec(method, "job:x"), teacher_dir, no_files, out)
    report = result.metrics["hops"][0]["method_report"]
    assert report["corpus_rows"] == 200 and report["training_examples"] == 48
    assert report["candidates_per_example_mean"] == 8.0
    assert report["examples_without_candidates"] == 0
    samples = [
        json.loads(line) for line in (out / "augmented_samples.jsonl").read_text().splitlines()
    ]
    assert len(samples) == 3  # one example per step, 3 steps
    texts = load_corpus("builtin:rotten_tomatoes_plot", "text", no_files, 200, seed=0)
    corpus = encode_corpus(texts, tokenizer, 32)
    for s in samples:
        assert s["epoch"] == 1 and s["rank"] == 1 and s["kl"] >= 0
        decoded = tokenizer.decode(corpus.input_ids[s["corpus_row"]], skip_special_tokens=True)
        assert s["augmented"] == decoded and s["augmented"] != s["original"]
    records = [json.loads(x) for x in (out / LOG_FILE).read_text().splitlines()]
    assert any(r["event"] == "corpus" and r["rows"] == 200 for r in records)
    assert any(r["event"] == "method_report" for r in records)
    steps = [r for r in records if r["event"] == "step"]
    assert steps and all("kd_augmented" in r for r in steps)
    written = json.loads((out / METRICS_FILE).read_text())
    assert written["hops"][0]["augmented_samples"] == "augmented_samples.jsonl"


def test_run_job_refuses_a_bad_corpus(teacher_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError) as info:
        run_job(
            make_spec({"name": "minimax_knn", "corpus": "builtin:nope"}, "job:x"),
            teacher_dir,
            no_files,
            tmp_path / "bad",
        )
    assert info.value.field == "method.corpus"


def test_run_job_refuses_a_filter_that_keeps_no_neighbour(
    teacher_dir: Path, tmp_path: Path
) -> None:
    method = {"name": "minimax_knn", "max_corpus_examples": 50, "max_distance": 0.01}
    with pytest.raises(SpecError) as info:
        run_job(make_spec(method, "job:x"), teacher_dir, no_files, tmp_path / "far")
    assert info.value.field == "method.max_distance"
    assert "median distance to the nearest one" in info.value.reason
