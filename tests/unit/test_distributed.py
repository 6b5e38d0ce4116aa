"""Data-parallel training on the CPU: two gloo ranks started by ``torchrun``, real tiny MiniLM
models.

* Every registered method runs a tiny job through ``run_job`` on two ranks (one torchrun
  group runs them all, tests/unit/ddp_ranks.py: starting one costs more than the jobs), and
  both ranks end with the same student (``metrics.json``'s ``data_parallel.same_weights``).
* Two ranks train like one process for vanilla_kd, pkd and mate_kd (dropout off): the same
  step counts, logged losses within ``LOSS_RTOL`` and final weights within ``WEIGHT_ATOL``
  (max absolute difference). The runs differ by floating-point summation order only (two
  shard backward passes whose gradients gloo sums and halves, against one full-batch pass;
  rows padded to their own shard's length), amplified a little by Adam over a few steps.
* A job through the worker's entry (:func:`kd_engine.torchrun.run_job_distributed`) writes
  checkpoints from rank 0, pauses on both ranks and, resumed from the pause checkpoint under
  DDP, ends with the same student bit for bit as the uninterrupted run (each rank's RNG state
  is in the checkpoint).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kd_engine import registry
from kd_engine.checkpoint import CheckpointPolicy, Paused, SavedCheckpoint
from kd_engine.methods.chain import ChainMethod
from kd_engine.models.loading import load_classifier, load_tokenizer
from kd_engine.models.student import student_from_teacher
from kd_engine.plan import overridden_training_fields, plan_job
from kd_engine.ranks import DistContext, check_supported, worker_gpus
from kd_engine.references import builtin_model_path
from kd_engine.spec import JobSpec
from kd_engine.torchrun import run_job_distributed
from kd_engine.trainer import Progress, TrainHooks
from tests.checks import NO_EXTRAS

HERE = Path(__file__).resolve().parent
WEIGHT_ATOL = 2e-5  # observed: vanilla_kd 3.2e-6, pkd 1.6e-6, mate_kd 3.0e-8
LOSS_RTOL = 1e-5  # observed: at most 1.2e-6 (pkd)
EQUIVALENCE = ["vanilla_kd", "pkd", "mate_kd", "codir"]

SMALL_AUGMENTATION = {
    "epochs": 1,
    "student_steps": 2,
    "generator_steps": 1,
    "generator_warmup_epochs": 1,
}
"""Small settings for a method that binds models (as in the e2e registry matrix)."""
OVERRIDES: dict[str, dict[str, Any]] = {"minimax_knn": {"max_corpus_examples": 128}}
DATA = {"source": "builtin:rotten_tomatoes", "max_train_examples": 24, "max_eval_examples": 16}
TRAINING = {
    "epochs": 2,
    "max_steps": 2,
    "batch_size": 8,
    "max_seq_length": 16,
    "device": "cpu",
    "eval_batch_size": 16,
}


def method_of(name: str) -> dict[str, Any]:
    entry = registry.get(name)
    small: dict[str, Any] = {}
    if entry.method_cls.needs.models:
        fields = entry.method_cls.config_cls.model_fields
        small = {k: v for k, v in SMALL_AUGMENTATION.items() if k in fields}
    return {"name": name, **small, **OVERRIDES.get(name, {})}


def job_spec(name: str) -> dict[str, Any]:
    """A tiny job of ``name``: 2-layer student (born_again: the teacher's 4), 2 steps a stage,
    without the training settings the method's recipe sets itself."""
    training = dict(TRAINING)
    body = {
        "teacher": "t",
        "student": {} if name == "born_again" else {"num_layers": 2},
        "method": method_of(name),
        "dataset": DATA,
        "training": training,
        "export": NO_EXTRAS,
    }
    if not issubclass(registry.get(name).method_cls, ChainMethod):
        spec = JobSpec.model_validate(body)
        unused = overridden_training_fields(spec, plan_job(spec))
        body["training"] = {k: v for k, v in training.items() if f"training.{k}" not in unused}
    return body


@pytest.fixture(scope="module")
def teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 4-layer MiniLM classifier (layers 0, 1, 3, 5; a seeded random head)."""
    out = tmp_path_factory.mktemp("teacher")
    path = builtin_model_path("minilm-l6")
    torch.manual_seed(0)
    model = student_from_teacher(load_classifier(path, ["rotten", "fresh"]), [0, 1, 3, 5])
    model.save_pretrained(out)
    load_tokenizer(path).save_pretrained(out)
    return out


def run_jobs_on_ranks(out: Path, plan: dict[str, Any], timeout: float = 1500) -> None:
    """tests/unit/ddp_ranks.py on two gloo ranks under torchrun."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes", "1"]
    cmd += ["--nproc-per-node", "2", str(HERE / "ddp_ranks.py"), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def ranks_out(tmp_path_factory: pytest.TempPathFactory, teacher: Path) -> Path:
    out = tmp_path_factory.mktemp("ranks")
    jobs = [
        {"name": name, "spec": job_spec(name), "teacher": str(teacher)} for name in registry.names()
    ]
    run_jobs_on_ranks(out, {"equivalence": EQUIVALENCE, "jobs": jobs})
    return out


@pytest.mark.parametrize("method", registry.names())
def test_every_method_runs_on_two_ranks(ranks_out: Path, method: str) -> None:
    answer = json.loads((ranks_out / f"{method}.json").read_text())
    assert "error" not in answer, answer.get("error")
    metrics = answer["metrics"]
    assert metrics["method"] == method
    assert metrics["data_parallel"] == {"ranks": 2, "same_weights": True}
    assert (ranks_out / method / "model.safetensors").is_file()
    assert sum(s["steps"] for s in metrics["stages"]) > 0
    assert set(metrics["test"]) >= {"accuracy", "macro_f1"}


@pytest.mark.parametrize("method", EQUIVALENCE)
def test_two_gloo_ranks_train_like_one_process(ranks_out: Path, method: str) -> None:
    a = torch.load(ranks_out / f"{method}.one.pt")
    b = torch.load(ranks_out / f"{method}.two.pt")
    assert a["steps"] == b["steps"]
    assert len(a["losses"]) == len(b["losses"]) > 0
    assert b["losses"] == pytest.approx(a["losses"], rel=LOSS_RTOL)
    moved = max((a["state"][k] - a["init"][k]).abs().max().item() for k in a["state"])
    diff = max((a["state"][k] - b["state"][k]).abs().max().item() for k in a["state"])
    assert diff < WEIGHT_ATOL, f"{method}: max abs weight difference {diff}"
    # it trained, and the difference is small against the updates (mate_kd's student trains
    # 3 steps at its own small learning rate after the generator's warm-up)
    assert moved > 1e-5 and diff < moved / 100, (diff, moved)
    print(f"{method}: max abs weight difference {diff:.2e}, largest update {moved:.2e}")


def test_a_job_pauses_and_resumes_under_ddp_bit_for_bit(tmp_path: Path, teacher: Path) -> None:
    """Through the worker's entry: rank 0's progress and checkpoints reach the caller's hooks;
    a pause asked for at once stops both ranks at step 1 with a checkpoint (mid-epoch: 3 steps
    an epoch, 6 in all), and two ranks resumed from it end with the uninterrupted 2-rank run's
    student, bit for bit."""
    body = job_spec("vanilla_kd")
    body["training"] = {**body["training"], "max_steps": None}  # 24 rows / 8: 3 steps an epoch
    spec = JobSpec.model_validate({**body, "teacher": "job:t"})
    progress: list[Progress] = []
    saved: list[SavedCheckpoint] = []
    hooks = TrainHooks(on_progress=progress.append, on_checkpoint=saved.append, every=1)
    policy = CheckpointPolicy(tmp_path / "ckpt", every_steps=2, at_stage_end=False)
    full = run_job_distributed(spec, teacher, Path, tmp_path / "full", 2, hooks, checkpoints=policy)
    assert [p.step for p in progress if p.stage == "train"] == [1, 2, 3, 4, 5, 6]
    assert [(c.step, c.reason) for c in saved] == [(2, "interval"), (4, "interval")]
    assert full.metrics["data_parallel"] == {"ranks": 2, "same_weights": True}

    pausing = TrainHooks(should_pause=lambda: True, every=1)
    with pytest.raises(Paused) as paused:
        run_job_distributed(
            spec,
            teacher,
            Path,
            tmp_path / "paused",
            2,
            pausing,
            checkpoints=CheckpointPolicy(tmp_path / "ckpt-paused"),
        )
    ckpt = paused.value.checkpoint
    assert (ckpt.step, ckpt.reason) == (1, "pause")
    resumed = run_job_distributed(
        spec, teacher, Path, tmp_path / "resumed", 2, resume_from=ckpt.path
    )
    a = load_file(str(tmp_path / "full" / "model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed.metrics["test"] == full.metrics["test"]
    assert [e["step"] for e in resumed.metrics["epochs"]] == [3, 6]


def test_shard_splits_rows_and_weights_partial_batches() -> None:
    batch = {
        "input_ids": torch.arange(15).reshape(5, 3),
        "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]),
        "labels": torch.arange(5),
    }
    s0, w0 = DistContext(0, 2).shard(batch)
    s1, w1 = DistContext(1, 2).shard(batch)
    assert s0["labels"].tolist() == [0, 1, 2] and w0 == pytest.approx(1.2)
    assert s1["labels"].tolist() == [3, 4] and w1 == pytest.approx(0.8)
    assert s1["input_ids"].shape == (2, 2)  # padding beyond the shard's longest row is cut
    # Fewer rows than ranks: the empty rank runs one row with weight 0.
    one = {k: v[:1] for k, v in batch.items()}
    s, w = DistContext(1, 2).shard(one)
    assert s["labels"].tolist() == [0] and w == 0.0


def _spec(method: str, batch_size: int = 8) -> JobSpec:
    return JobSpec.model_validate(
        {
            "teacher": "builtin:minilm-l6",
            "method": {"name": method},
            "dataset": {"source": "builtin:rotten_tomatoes"},
            "training": {"batch_size": batch_size, "device": "cpu"},
        }
    )


def test_what_several_ranks_cannot_do_is_refused_naming_the_setting() -> None:
    check_supported(_spec("tinybert", batch_size=1), 1)  # one rank: anything goes
    check_supported(_spec("tinybert"), 2)  # every method runs on several ranks
    with pytest.raises(ValueError, match=r"training\.batch_size"):
        check_supported(_spec("vanilla_kd", batch_size=2), 4)


def test_worker_gpus_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from kd_engine import ranks

    monkeypatch.delenv(ranks.WORKER_GPUS_ENV, raising=False)
    assert worker_gpus() == 1
    monkeypatch.setenv(ranks.WORKER_GPUS_ENV, "4")
    assert worker_gpus() == 4
    monkeypatch.setenv(ranks.WORKER_GPUS_ENV, "zero")
    with pytest.raises(ValueError, match=ranks.WORKER_GPUS_ENV):
        worker_gpus()
