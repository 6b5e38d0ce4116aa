"""The final student weights of four tiny jobs, bit for bit (CPU, fixed seeds).

The digests were recorded from the training loop before its restructuring (issue 19, "a loop
you can read in one sitting"): the loop's steps, the methods' declared needs and the deferred
read-back of loss parts may change how the code reads, never what it computes. A change that
alters a digest changes the numbers a job produces; if that is intended, say why in the commit
and record the new digests.

Each job runs through :func:`kd_engine.run.run_job` (hops, stages, evaluation and selection,
gradient accumulation, a generator's max steps) on a 32-example slice of rotten_tomatoes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from kd_engine.run import run_job
from kd_engine.spec import JobSpec

DATASET = {"source": "builtin:rotten_tomatoes", "max_train_examples": 32, "max_eval_examples": 16}
# 4 micro-batches of 8 per epoch, 2 per optimiser step: 2 steps per epoch; a dev evaluation
# after every step, so that selection and restoring the best weights take part.
TRAINING = {
    "epochs": 2,
    "batch_size": 8,
    "grad_accumulation_steps": 2,
    "eval_every_steps": 1,
    "max_seq_length": 24,
    "device": "cpu",
    "seed": 7,
}

METHODS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "vanilla_kd": ({"num_layers": 1}, {"name": "vanilla_kd", "alpha": 0.7, "temperature": 2.0}),
    "tinybert": (
        {"num_layers": 1},
        {"name": "tinybert", "intermediate_epochs": 1, "prediction_epochs": 1},
    ),
    "mate_kd": (
        {"num_layers": 1},
        {
            "name": "mate_kd",
            "epochs": 1,
            "generator_layers": 1,
            "generator_steps": 2,
            "student_steps": 2,
        },
    ),
    "born_again": (
        {"type": "from_teacher"},
        {"name": "born_again", "generations": 2, "alpha": 0.5, "temperature": 2.0},
    ),
}

# Recorded from the loop as of d7c01c7 (before issue 19's restructuring).
DIGESTS = {
    "vanilla_kd": "1678bd5a140f3a341d39b3212582e06a515a8fefea49ac3fdbd4847c64be2fde",
    "tinybert": "5aaa6f7ce9d339ee960aebfa3ad460c3d3b528e83bb72395af295f9fd54efa98",
    "mate_kd": "a22e33494a88e1dff425ce957c9376beaf7691a6efb2bc3ce346e8db2c9a4b4a",
    "born_again": "a10e570ae93ae92debc614626b62f2c15a5dd062020c9179d5b0ec2c923d70f2",
}


def make_spec(**overrides: Any) -> JobSpec:
    body: dict[str, Any] = {
        "teacher": "job:teacher",
        "method": {"name": "finetune"},
        "dataset": DATASET,
        "training": TRAINING,
        "export": {"onnx": False},
    }
    body.update(overrides)
    return JobSpec.model_validate(body)


def no_files(ref: str) -> Path:
    raise ValueError(f"no file references in these tests: {ref!r}")


def weights_digest(model_dir: Path) -> str:
    """sha256 over the saved student's state dict: each tensor's name, dtype, shape and raw
    bytes, in sorted key order."""
    state = load_file(model_dir / "model.safetensors")
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The digests were recorded with one intra-op thread: the bits of a float reduction
    depend on how it is split over threads, so the test pins it (and gives it back)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> Path:
    """A 2-layer classifier built from MiniLM-L6, fine-tuned for 2 steps: the teacher."""
    out = tmp_path_factory.mktemp("teacher")
    spec = make_spec(
        teacher="builtin:minilm-l6",
        student={"num_layers": 2},
        training={**TRAINING, "epochs": 1, "eval_every_steps": None},
    )
    run_job(spec, minilm_path, no_files, out)
    return out


@pytest.mark.parametrize("method", list(METHODS))
def test_final_weights_are_bit_identical(method: str, teacher_dir: Path, tmp_path: Path) -> None:
    student, settings = METHODS[method]
    run_job(make_spec(student=student, method=settings), teacher_dir, no_files, tmp_path)
    digest = weights_digest(tmp_path)
    assert digest == DIGESTS[method], f"{method}: the final weights changed (digest {digest})"
