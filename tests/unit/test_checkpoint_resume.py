"""Checkpoints and bit-exact resume through run_job (CPU, tiny data, real MiniLM layers).

Each case runs a job uninterrupted, runs it again with checkpoints and a hook that "kills" it
right after a mid-epoch checkpoint, resumes from that checkpoint into a fresh output directory,
and compares: same optimiser steps, the same final student bit for bit, the same test metrics
and the same artifacts."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification

from kd_engine.checkpoint import (
    MANIFEST,
    CheckpointPolicy,
    Paused,
    SavedCheckpoint,
    read_checkpoint_info,
    write_atomically,
)
from kd_engine.run import LOG_FILE, METRICS_FILE, RunResult, run_job
from kd_engine.spec import JobSpec
from kd_engine.trainer import TrainHooks
from tests.checks import NO_EXTRAS

# 40 train rows in batches of 8: 5 micro-batches (optimiser steps) per epoch.
DATASET = {"source": "builtin:rotten_tomatoes", "max_train_examples": 40, "max_eval_examples": 16}
TRAINING = {
    "epochs": 2,
    "batch_size": 8,
    "max_seq_length": 24,
    "device": "cpu",
    "eval_every_steps": 3,
}


def make_spec(**overrides: Any) -> JobSpec:
    body: dict[str, Any] = {
        "teacher": "job:teacher",
        "method": {"name": "vanilla_kd"},
        "student": {"num_layers": 1},
        "dataset": DATASET,
        "training": TRAINING,
        "export": NO_EXTRAS,  # exported and checked in test_onnx_export / test_run_job
    }
    body.update(overrides)
    return JobSpec.model_validate(body)


def no_files(ref: str) -> Path:
    raise ValueError(f"no file references in these tests: {ref!r}")


class Killed(Exception):
    """Stands for the worker process dying right after a checkpoint was written."""


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """A 2-layer classifier (MiniLM layers, one fine-tuning step): the job teacher."""
    out = tmp_path_factory.mktemp("teacher")
    spec = make_spec(
        teacher="builtin:minilm-l6",
        method={"name": "finetune"},
        student={"num_layers": 2},
        training={**TRAINING, "epochs": 1, "max_steps": 1, "eval_every_steps": None},
    )
    run_job(spec, minilm_path, no_files, out)
    return out


def weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out_dir / "model.safetensors"))


def metrics(out_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out_dir / METRICS_FILE).read_text())
    return data


def steps_of(result: RunResult) -> list[tuple[object, object]]:
    """(stage, steps) of every stage of every hop."""
    return [(s.get("hop"), s["steps"]) for s in result.metrics["stages"]]


def assert_same_run(a: RunResult, b: RunResult) -> None:
    wa, wb = weights(a.out_dir), weights(b.out_dir)
    assert wa.keys() == wb.keys()
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    assert steps_of(a) == steps_of(b)
    ma, mb = metrics(a.out_dir), metrics(b.out_dir)
    assert ma["test"] == mb["test"]
    assert ma["best_dev"] == mb["best_dev"]
    assert ma["best_step"] == mb["best_step"]
    assert [h["test"] for h in ma["hops"]] == [h["test"] for h in mb["hops"]]
    assert [(e["step"], e["dev"]) for e in ma["epochs"]] == [
        (e["step"], e["dev"]) for e in mb["epochs"]
    ]
    files_a = sorted(p.name for p in a.out_dir.iterdir())
    files_b = sorted(p.name for p in b.out_dir.iterdir())
    assert files_a == files_b


def interrupted(
    spec: JobSpec,
    teacher: Path,
    tmp: Path,
    kill_at: Callable[[SavedCheckpoint], bool],
    every_steps: int = 2,
) -> tuple[SavedCheckpoint, list[SavedCheckpoint]]:
    """Run ``spec`` with checkpoints every ``every_steps`` and die right after the first
    checkpoint ``kill_at`` accepts; returns it and every checkpoint written."""
    seen: list[SavedCheckpoint] = []

    def on_checkpoint(c: SavedCheckpoint) -> None:
        seen.append(c)
        if kill_at(c):
            raise Killed(c.name)

    policy = CheckpointPolicy(tmp / "ckpt", every_steps=every_steps)
    with pytest.raises(Killed):
        run_job(
            spec,
            teacher,
            no_files,
            tmp / "killed",
            TrainHooks(on_checkpoint=on_checkpoint),
            checkpoints=policy,
        )
    return seen[-1], seen


def resumed(spec: JobSpec, teacher: Path, tmp: Path, ckpt: SavedCheckpoint) -> RunResult:
    return run_job(
        spec,
        teacher,
        no_files,
        tmp / "resumed",
        checkpoints=CheckpointPolicy(tmp / "ckpt2", every_steps=2),
        resume_from=ckpt.path,
    )


@pytest.fixture(scope="module")
def vanilla_full(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path) -> RunResult:
    return run_job(make_spec(), teacher_dir, no_files, tmp_path_factory.mktemp("full"))


def test_vanilla_kd_resumes_mid_epoch_bit_for_bit(
    vanilla_full: RunResult, teacher_dir: Path, tmp_path: Path
) -> None:
    spec = make_spec()
    # Step 6 of 10: the first step of epoch 2 (5 steps per epoch), after step evaluations.
    ckpt, seen = interrupted(spec, teacher_dir, tmp_path, lambda c: c.step == 6)
    assert [c.step for c in seen] == [2, 4, 6]
    assert ckpt.reason == "interval" and ckpt.name == "step-00000006"
    assert ckpt.total_steps == 10 and ckpt.hop == 1 and ckpt.num_hops == 1
    assert ckpt.dev  # the step-3 and epoch-1 evaluations ran before it
    result = resumed(spec, teacher_dir, tmp_path, ckpt)
    assert_same_run(vanilla_full, result)
    # The resumed run's log continues the interrupted one's.
    events = [json.loads(line)["event"] for line in (result.out_dir / LOG_FILE).open()]
    assert events.count("resumed") == 1 and events.count("done") == 1
    assert events.index("resumed") > events.index("data")


def test_annealing_kd_resumes_in_stage_one_and_across_stages(
    teacher_dir: Path, tmp_path: Path
) -> None:
    spec = make_spec(
        method={
            "name": "annealing_kd",
            "tau_max": 2,
            "epochs_per_temperature": 1,
            "stage_two_epochs": 1,
            "stage_one_learning_rate": 1e-4,
        },
    )
    full = run_job(spec, teacher_dir, no_files, tmp_path / "full")
    # Stage I: 2 epochs of 5 steps; kill at step 6 (epoch 2, T=1) mid-epoch.
    ckpt, _ = interrupted(spec, teacher_dir, tmp_path, lambda c: c.step == 6)
    assert ckpt.stage_index == 1
    assert_same_run(full, resumed(spec, teacher_dir, tmp_path / "a", ckpt))
    # A stage-end checkpoint: resume at the start of stage II.
    ckpt, _ = interrupted(
        spec, teacher_dir, tmp_path / "b", lambda c: c.reason == "stage_end", every_steps=100
    )
    assert ckpt.step == 10 and ckpt.stage_index == 1 and ckpt.stage == "annealing"
    assert_same_run(full, resumed(spec, teacher_dir, tmp_path / "b", ckpt))


def test_codir_memory_bank_state_resumes_with_grad_accumulation(
    teacher_dir: Path, tmp_path: Path
) -> None:
    # 10 micro-batches of 4, 2 per optimiser step: the step-2 checkpoint is 4 micro-batches in.
    spec = make_spec(
        method={"name": "codir", "negatives": 4, "projection_size": 16},
        training={**TRAINING, "epochs": 1, "batch_size": 4, "grad_accumulation_steps": 2},
    )
    full = run_job(spec, teacher_dir, no_files, tmp_path / "full")
    ckpt, _ = interrupted(spec, teacher_dir, tmp_path, lambda c: c.step == 2)
    assert_same_run(full, resumed(spec, teacher_dir, tmp_path, ckpt))


def test_born_again_resumes_in_a_later_hop(teacher_dir: Path, tmp_path: Path) -> None:
    """Generations drawn at random (the default ``init``): the finished generation is rebuilt
    from the checkpoint, the next one drawn with its own seed as in an uninterrupted run."""
    spec = make_spec(
        method={"name": "born_again", "generations": 2, "init": "random"},
        training={**TRAINING, "epochs": 1},
    )
    full = run_job(spec, teacher_dir, no_files, tmp_path / "full")
    ckpt, seen = interrupted(spec, teacher_dir, tmp_path, lambda c: c.hop == 2 and c.step == 2)
    assert ckpt.name == "hop2-step-00000002" and ckpt.num_hops == 2
    assert any(c.hop == 1 for c in seen)
    result = resumed(spec, teacher_dir, tmp_path, ckpt)
    assert_same_run(full, result)
    assert metrics(result.out_dir)["ensemble"] == metrics(full.out_dir)["ensemble"]


def test_pause_writes_a_checkpoint_and_resumes(
    vanilla_full: RunResult, teacher_dir: Path, tmp_path: Path
) -> None:
    spec = make_spec()
    saved: list[SavedCheckpoint] = []
    calls = {"n": 0}

    def should_pause() -> bool:
        calls["n"] += 1
        return calls["n"] >= 2  # the second check: step 2 with every=1

    hooks = TrainHooks(on_checkpoint=saved.append, should_pause=should_pause, every=1)
    policy = CheckpointPolicy(tmp_path / "ckpt")
    with pytest.raises(Paused) as info:
        run_job(spec, teacher_dir, no_files, tmp_path / "paused", hooks, checkpoints=policy)
    ckpt = info.value.checkpoint
    assert ckpt.reason == "pause" and ckpt.step == 2
    assert saved == [ckpt]
    assert read_checkpoint_info(ckpt.path) == ckpt
    result = resumed(spec, teacher_dir, tmp_path, ckpt)
    assert_same_run(vanilla_full, result)


def test_checkpoint_info_and_student_dir_load(teacher_dir: Path, tmp_path: Path) -> None:
    spec = make_spec(training={**TRAINING, "epochs": 1})
    ckpt, _ = interrupted(spec, teacher_dir, tmp_path, lambda c: c.step == 2)
    info = read_checkpoint_info(ckpt.path)
    assert info == ckpt
    assert info.student_dir == ckpt.path / "student"
    model = AutoModelForSequenceClassification.from_pretrained(info.student_dir)
    assert model.config.num_hidden_layers == 1
    assert (info.student_dir / "tokenizer_config.json").exists()
    # No partial directories are left next to it.
    assert sorted(p.name for p in ckpt.path.parent.iterdir()) == ["step-00000002"]
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        read_checkpoint_info(tmp_path)


def test_a_checkpoint_of_another_spec_is_refused(teacher_dir: Path, tmp_path: Path) -> None:
    spec = make_spec(training={**TRAINING, "epochs": 1})
    ckpt, _ = interrupted(spec, teacher_dir, tmp_path, lambda c: c.step == 2)
    other = make_spec(training={**TRAINING, "epochs": 1, "seed": 7})
    with pytest.raises(ValueError, match="resume_from") as info:
        run_job(other, teacher_dir, no_files, tmp_path / "other", resume_from=ckpt.path)
    assert "another job spec" in str(info.value)
    with pytest.raises(ValueError, match="resume_from"):
        run_job(spec, teacher_dir, no_files, tmp_path / "none", resume_from=tmp_path / "nope")


def test_write_atomically_leaves_nothing_when_writing_fails(tmp_path: Path) -> None:
    final = tmp_path / "ckpt" / "step-00000004"

    def failing(tmp: Path) -> None:
        (tmp / MANIFEST).write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(final, failing)
    assert list((tmp_path / "ckpt").iterdir()) == []

    write_atomically(final, lambda tmp: (tmp / "a").write_text("1"))
    write_atomically(final, lambda tmp: (tmp / "b").write_text("2"))  # replaces the older one
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["step-00000004"]
    assert sorted(p.name for p in final.iterdir()) == ["b"]
