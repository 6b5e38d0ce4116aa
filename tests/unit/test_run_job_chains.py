"""Chain methods end to end through run_job (CPU, tiny data): takd, born_again and
teacher_free_self train every hop, report it, keep intermediate models as artifacts, and each
hop's teacher is the previous hop's model."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from kd_engine import registry
from kd_engine.data import load_transfer_set, relabel
from kd_engine.data.batching import Encoded, encode
from kd_engine.evaluation import agreement, classification_metrics, predict_logits
from kd_engine.methods.vanilla_kd import VanillaKDConfig
from kd_engine.models.loading import load_classifier, load_tokenizer
from kd_engine.models.shapes import shape_from_config
from kd_engine.models.student import student_from_teacher
from kd_engine.run import LOG_FILE, METRICS_FILE, RunResult, run_job
from kd_engine.spec import JobSpec
from kd_engine.trainer import Progress, TrainHooks, seed_everything, train
from tests.checks import NO_EXTRAS, check_agreement, check_classification_metrics

DATASET = {"source": "builtin:rotten_tomatoes", "max_train_examples": 32, "max_eval_examples": 16}
TRAINING = {"epochs": 1, "batch_size": 16, "max_seq_length": 32, "device": "cpu", "max_steps": 2}
CPU = torch.device("cpu")


def make_spec(**overrides: Any) -> JobSpec:
    body: dict[str, Any] = {
        "teacher": "job:teacher",
        "method": {"name": "finetune"},
        "dataset": DATASET,
        "training": TRAINING,
        "export": NO_EXTRAS,  # exported and checked in test_onnx_export / test_run_job
    }
    body.update(overrides)
    return JobSpec.model_validate(body)


def no_files(ref: str) -> Path:
    raise ValueError(f"no file references in these tests: {ref!r}")


def encoded_test_split(spec: JobSpec, model_dir: Path) -> Encoded:
    data = relabel(load_transfer_set(spec.dataset, no_files), ["rotten", "fresh"])
    return encode(data.test, load_tokenizer(model_dir), spec.training.max_seq_length)


def logits_of(model_dir: Path, enc: Encoded) -> torch.Tensor:
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    return predict_logits(model, enc, 64, 0, CPU)


def unpack(archive: Path, into: Path) -> Path:
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        tar.extractall(into, filter="data")
    top = {n.split("/")[0] for n in names}
    assert top == {archive.name.removesuffix(".tar.gz")}, names
    return into / top.pop()


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """A 3-layer classifier (MiniLM layers, briefly fine-tuned): the job teacher below."""
    out = tmp_path_factory.mktemp("teacher")
    spec = make_spec(teacher="builtin:minilm-l6", student={"num_layers": 3})
    run_job(spec, minilm_path, no_files, out)
    return out


@pytest.fixture(scope="module")
def takd_run(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path) -> RunResult:
    spec = make_spec(
        student={"num_layers": 1},
        method={"name": "takd", "assistants": [{"num_layers": 2}], "alpha": 0.7},
    )
    progress: list[Progress] = []
    hooks = TrainHooks(on_progress=progress.append, every=1)
    result = run_job(spec, teacher_dir, no_files, tmp_path_factory.mktemp("takd"), hooks)
    result.metrics["_progress"] = progress
    return result


def test_takd_reports_every_hop(takd_run: RunResult) -> None:
    m = takd_run.metrics
    written = json.loads((takd_run.out_dir / METRICS_FILE).read_text())
    assert written["hops"] == m["hops"]
    assistant, student = m["hops"]
    assert (assistant["name"], assistant["teacher"], assistant["artifact"]) == (
        "assistant_1",
        "teacher",
        "assistant_1.tar.gz",
    )
    assert (student["name"], student["teacher"], student["artifact"]) == (
        "student",
        "assistant_1",
        None,
    )
    check_classification_metrics(m, 16)  # the final student against the job's teacher
    assert student["test"] == m["test"]
    # Each hop's agreement with its own teacher: the job's teacher, then the assistant.
    teacher_accuracy = {
        "teacher": m["teacher_test"]["accuracy"],
        "assistant_1": assistant["test"]["accuracy"],
    }
    for hop in m["hops"]:
        assert hop["method"] == {"name": "vanilla_kd", "alpha": 0.7, "temperature": 2.0}
        assert set(hop["test"]) == {"accuracy", "macro_f1", "mcc"}
        check_agreement(
            hop["teacher_agreement"],
            16,
            hop["test"]["accuracy"],
            teacher_accuracy[hop["teacher"]],
        )
        assert [s["steps"] for s in hop["stages"]] == [2]
    assert assistant["student"]["num_layers"] == 2 and student["student"]["num_layers"] == 1
    assert assistant["parameters"] > student["parameters"]
    # The job's own metrics are the student's; stages and epochs of every hop, tagged.
    assert m["test"] == student["test"]
    assert [(s["hop"], s["steps"]) for s in m["stages"]] == [("assistant_1", 2), ("student", 2)]
    assert [e["hop"] for e in m["epochs"]] == ["assistant_1", "student"]
    assert "ensemble" not in m
    # The job's teacher taught the first hop: its metrics are reported as for vanilla_kd.
    assert "teacher_test" in m and m["teacher"]["parameters"] > assistant["parameters"]


def test_takd_assistant_is_an_artifact_that_reproduces_its_metrics(
    takd_run: RunResult, tmp_path: Path
) -> None:
    out = takd_run.out_dir
    files = sorted(p.name for p in out.iterdir())
    assert "assistant_1.tar.gz" in files and "model.safetensors" in files
    assert all(not p.is_dir() for p in out.iterdir())  # only regular files: the worker's rule
    assistant_dir = unpack(out / "assistant_1.tar.gz", tmp_path)
    config = json.loads((assistant_dir / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert (assistant_dir / "tokenizer.json").is_file()
    enc = encoded_test_split(make_spec(), assistant_dir)
    a_logits, s_logits = logits_of(assistant_dir, enc), logits_of(out, enc)
    assistant, student = takd_run.metrics["hops"]
    assert classification_metrics(a_logits, enc.labels) == assistant["test"]
    assert student["teacher_agreement"] == pytest.approx(agreement(s_logits, a_logits))


def test_takd_student_was_taught_by_the_assistant(
    takd_run: RunResult, teacher_dir: Path, tmp_path: Path
) -> None:
    """Hop 2 redone by hand with the assistant artifact as teacher gives the exported student,
    weight for weight (the CPU loop is deterministic for a seed)."""
    spec = make_spec(student={"num_layers": 1})
    assistant = AutoModelForSequenceClassification.from_pretrained(
        unpack(takd_run.out_dir / "assistant_1.tar.gz", tmp_path)
    )
    tokenizer = load_tokenizer(teacher_dir)
    data = relabel(load_transfer_set(spec.dataset, no_files), ["rotten", "fresh"])
    train_enc, dev_enc = (encode(split, tokenizer, 32) for split in (data.train, data.dev))
    job_teacher = load_classifier(teacher_dir, ["rotten", "fresh"])
    seed_everything(spec.training.seed)
    student: PreTrainedModel = student_from_teacher(job_teacher, [0])  # 3 -> 1 keeps layer 0
    shape = shape_from_config
    method = registry.build(
        VanillaKDConfig(alpha=0.7),
        shape(assistant.config.to_dict(), 2),
        shape(student.config.to_dict(), 2),
        spec.training,
    )
    train(student, assistant, method, train_enc, dev_enc, spec.training, 0, CPU)
    exported = load_file(str(takd_run.out_dir / "model.safetensors"))
    state = student.state_dict()
    assert exported.keys() <= state.keys()
    assert all(torch.equal(state[k], v) for k, v in exported.items())


def test_takd_progress_names_the_hop(takd_run: RunResult) -> None:
    progress: list[Progress] = takd_run.metrics["_progress"]
    training = [p for p in progress if p.step > 0 and p.stage.endswith("train")]
    assert [(p.stage, p.hop, p.num_hops, p.step) for p in training] == [
        ("hop 1/2 assistant_1: train", 1, 2, 1),
        ("hop 1/2 assistant_1: train", 1, 2, 2),
        ("hop 2/2 student: train", 2, 2, 1),
        ("hop 2/2 student: train", 2, 2, 2),
    ]
    stages = [p.stage for p in progress if p.step == 0]
    # the teacher's logits are cached for the first hop (the only one taught by the job's
    # teacher) right after "prepare", with progress reports of its own
    assert stages[:2] == ["prepare", "teacher cache"]
    assert [s for s in stages if s != "teacher cache"] == [
        "prepare",
        "hop 1/2 assistant_1: evaluate",
        "hop 1/2 assistant_1: export",
        "hop 2/2 student: evaluate",
        "export",
    ]
    records = [json.loads(line) for line in (takd_run.out_dir / LOG_FILE).read_text().splitlines()]
    assert {r["hop"] for r in records if r["event"] == "step"} == {"assistant_1", "student"}
    assert next(r for r in records if r["event"] == "hops")["hops"] == ["assistant_1", "student"]


@pytest.fixture(scope="module")
def born_again_run(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path) -> RunResult:
    spec = make_spec(
        student={"type": "from_teacher"},
        method={"name": "born_again", "generations": 2, "alpha": 0.5, "temperature": 2.0},
    )
    return run_job(spec, teacher_dir, no_files, tmp_path_factory.mktemp("ban"))


def test_born_again_generations_and_ensemble(born_again_run: RunResult, tmp_path: Path) -> None:
    m, out = born_again_run.metrics, born_again_run.out_dir
    gen1, gen2 = m["hops"]
    assert (gen1["name"], gen1["teacher"], gen1["artifact"]) == (
        "generation_1",
        "teacher",
        "generation_1.tar.gz",
    )
    assert (gen2["name"], gen2["teacher"], gen2["artifact"]) == (
        "generation_2",
        "generation_1",
        None,
    )
    assert gen1["parameters"] == gen2["parameters"] == m["teacher"]["parameters"]
    assert not (out / "generation_2.tar.gz").exists()
    # The exported student is the last generation, with the teacher's architecture.
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 3
    gen1_dir = unpack(out / "generation_1.tar.gz", tmp_path)
    enc = encoded_test_split(make_spec(), gen1_dir)
    l1, l2 = logits_of(gen1_dir, enc), logits_of(out, enc)
    assert classification_metrics(l1, enc.labels) == gen1["test"]
    assert classification_metrics(l2, enc.labels) == m["test"] == gen2["test"]
    assert gen2["teacher_agreement"] == pytest.approx(agreement(l2, l1))
    # The ensemble: the mean of the generations' softmax outputs.
    mean = (l1.softmax(-1) + l2.softmax(-1)) / 2
    assert m["ensemble"]["members"] == ["generation_1", "generation_2"]
    assert m["ensemble"]["test"] == classification_metrics(mean.log(), enc.labels)
    # Generation 2 starts again from the student spec (the teacher's weights), not from gen 1.
    assert not torch.equal(l1, l2)


@pytest.fixture(scope="module")
def confident_teacher_dir(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path) -> Path:
    """``teacher_dir``'s teacher with its classifier's output layer scaled by 20: the same
    predictions, confident ones (the 2-step teacher is nearly uniform, so any student's KD
    loss against it is near 0)."""
    model = AutoModelForSequenceClassification.from_pretrained(teacher_dir)
    with torch.no_grad():
        model.classifier.weight.mul_(20.0)
        model.classifier.bias.mul_(20.0)
    out = tmp_path_factory.mktemp("confident_teacher")
    model.save_pretrained(out)
    load_tokenizer(teacher_dir).save_pretrained(out)
    return out


def test_born_again_by_default_starts_each_generation_at_random(
    confident_teacher_dir: Path, tmp_path: Path
) -> None:
    """Issue 23: with no student given, each generation is the teacher's architecture drawn
    anew with its own seed (the paper), not a copy of the teacher (whose KD loss at tau = 1
    starts near 0). A job that names its student (every stored spec does) keeps it."""
    one_step = {**TRAINING, "max_steps": 1}
    spec = make_spec(method={"name": "born_again", "generations": 2}, training=one_step)
    assert spec.method.model_dump()["init"] == "random"
    named = make_spec(student={"type": "from_teacher"}, method={"name": "born_again"})
    assert named.method.model_dump()["init"] == "student"
    stored = make_spec().model_dump(mode="json")  # a spec stored before init existed
    stored["method"] = {"name": "born_again", "generations": 3, "alpha": 1.0, "temperature": 1.0}
    assert JobSpec.model_validate(stored).method.model_dump()["init"] == "student"
    result = run_job(spec, confident_teacher_dir, no_files, tmp_path, TrainHooks(every=1))
    gen1, gen2 = result.metrics["hops"]
    assert [gen1["student"]["seed"], gen2["student"]["seed"]] == [42, 43]
    assert gen1["student"]["type"] == gen2["student"]["type"] == "random"
    assert gen1["parameters"] == gen2["parameters"] == result.metrics["teacher"]["parameters"]
    copy = make_spec(
        student={"type": "from_teacher"},
        method={"name": "born_again", "generations": 1},
        training=one_step,
    )
    run_job(copy, confident_teacher_dir, no_files, tmp_path / "copy", TrainHooks(every=1))
    first = {}
    for name, out in (("random", tmp_path), ("copy", tmp_path / "copy")):
        records = [json.loads(x) for x in (out / LOG_FILE).read_text().splitlines()]
        first[name] = next(
            r["kd"]
            for r in records
            if r["event"] == "step" and r.get("hop", "generation_1") == "generation_1"
        )
    # A copy of the teacher starts near 0 (dropout alone); a network drawn at random far above.
    assert first["random"] > 0.1 and first["random"] > 5 * first["copy"], first


def test_born_again_needs_the_teachers_architecture(teacher_dir: Path, tmp_path: Path) -> None:
    spec = make_spec(student={"num_layers": 2}, method={"name": "born_again"})
    with pytest.raises(ValueError, match=r"^student: born_again trains generations"):
        run_job(spec, teacher_dir, no_files, tmp_path)
    assert not (tmp_path / "model.safetensors").exists()


def test_teacher_free_self_from_a_base_encoder(minilm_path: Path, tmp_path: Path) -> None:
    """The job's teacher only gives the tokenizer and vocabulary: a base encoder will do."""
    student = {
        "type": "fresh",
        "num_layers": 1,
        "hidden_size": 32,
        "num_heads": 2,
        "intermediate_size": 64,
    }
    spec = make_spec(
        teacher="builtin:minilm-l6", student=student, method={"name": "teacher_free_self"}
    )
    m = run_job(spec, minilm_path, no_files, tmp_path).metrics
    first, second = m["hops"]
    assert (first["name"], first["teacher"], first["method"]) == (
        "self_teacher",
        None,
        {"name": "finetune"},
    )
    assert "teacher_agreement" not in first
    assert (second["name"], second["teacher"]) == ("student", "self_teacher")
    assert second["method"] == {"name": "vanilla_kd", "alpha": 0.95, "temperature": 20.0}
    assert first["parameters"] == second["parameters"]
    assert (tmp_path / "self_teacher.tar.gz").is_file()
    assert "teacher_test" not in m and "teacher" not in m
    assert set(first["stages"][0]["best_dev"]) == {"accuracy", "macro_f1", "mcc"}
