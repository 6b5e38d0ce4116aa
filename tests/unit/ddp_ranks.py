"""The ranks' side of tests/unit/test_distributed.py, started once by ``torchrun`` (2 gloo CPU
processes): ``python -m torch.distributed.run --standalone --nproc-per-node 2
tests/unit/ddp_ranks.py OUT``. One group of ranks runs everything, since starting one costs
more than the tiny jobs themselves.

``OUT/plan.json`` says what to run:

* ``equivalence``: method names; each is trained with :func:`kd_engine.trainer.train` (MiniLM
  layers, dropout off) once in one process (before the ranks join, rank ``i % 2`` runs case
  ``i``) and once on the two ranks; rank 0 saves ``OUT/<name>.one.pt`` and ``<name>.two.pt``
  (final weights, initial weights, logged losses, steps);
* ``jobs``: ``{"name", "spec", "teacher"}``; each runs through :func:`kd_engine.run.run_job`
  on both ranks; rank 0 writes ``OUT/<name>.json`` (the metrics, or the error).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel

from kd_engine import registry
from kd_engine.data.batching import encode
from kd_engine.data.builtins import load_builtin
from kd_engine.methods.base import Resources
from kd_engine.models.loading import load_classifier, load_tokenizer
from kd_engine.models.shapes import shape_from_config
from kd_engine.models.student import student_from_teacher
from kd_engine.ranks import current, joined
from kd_engine.references import builtin_model_path
from kd_engine.run import run_job
from kd_engine.spec import JobSpec, TrainingSpec
from kd_engine.trainer import TrainHooks, train

# 21 rows in batches of 8: 8, 8, 5; the last splits 3 + 2 between two ranks (unequal shards).
N_TRAIN, BATCH = 21, 8
CFG = TrainingSpec(
    epochs=2,
    batch_size=BATCH,
    learning_rate=1e-3,
    warmup_ratio=0.0,
    max_seq_length=16,
    seed=11,
    device="cpu",
    eval_batch_size=16,
)
METHODS: dict[str, dict[str, Any]] = {
    "vanilla_kd": {},
    "pkd": {},
    # small: one warm-up epoch, then 2 student steps per cycle with one generator step
    "mate_kd": {"epochs": 1, "student_steps": 2, "generator_steps": 1},
    # memory banks and negatives drawn per row: kept as one process keeps them
    "codir": {},
}


def no_dropout(model: PreTrainedModel) -> PreTrainedModel:
    """Dropout off: its masks are random per rank, and one process drawing one mask for the
    whole batch cannot be matched by two drawing theirs."""
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def train_case(name: str) -> dict[str, Any]:
    """Train ``name`` on the small data (here alone, or on every rank of a joined group);
    returns the student's final and initial weights, the logged losses and the steps."""
    path = builtin_model_path("minilm-l6")
    tok = load_tokenizer(path)
    data = load_builtin("rotten_tomatoes")
    torch.manual_seed(0)
    teacher = no_dropout(load_classifier(path, ["rotten", "fresh"]).eval())
    student = no_dropout(student_from_teacher(teacher, [0, 3]))
    init = {k: v.clone() for k, v in student.state_dict().items()}
    config = registry.get(name).config_cls.model_validate({"name": name, **METHODS[name]})
    shape = shape_from_config(teacher.config.to_dict(), 2)
    s_shape = shape_from_config(student.config.to_dict(), 2)
    method = registry.build(config, shape, s_shape, CFG)
    method.bind(
        Resources(
            student=student,
            teacher=teacher,
            device=torch.device("cpu"),
            pad_id=0,
            mask_id=tok.mask_token_id,
            special_ids=frozenset(int(i) for i in tok.all_special_ids),
            training=CFG,
        )
    )
    for group in method.param_groups():  # a generator's dropout too
        for module in group.modules:
            no_dropout(module)  # type: ignore[arg-type]
    losses: list[float] = []

    def log(record: dict[str, object]) -> None:
        if record.get("event") == "step":
            losses.append(float(record["loss"]))  # type: ignore[arg-type]

    result = train(
        student,
        teacher,
        method,
        encode(data.train[:N_TRAIN], tok, 16),
        encode(data.dev[:16], tok, 16),
        CFG,
        0,
        torch.device("cpu"),
        TrainHooks(log=log, every=1),
    )
    return {
        "state": student.state_dict(),
        "init": init,
        "losses": losses,
        "steps": [s["steps"] for s in result.stages],
    }


def run_jobs(out: Path, jobs: list[dict[str, Any]], rank: int) -> None:
    """Each job through run_job on every rank; rank 0 writes its metrics (or error)."""
    for job in jobs:
        spec = JobSpec.model_validate(job["spec"])
        target = out / job["name"] if rank == 0 else Path(tempfile.mkdtemp())
        try:
            result = run_job(spec, job["teacher"], Path, target, TrainHooks())
            answer: dict[str, Any] = {"metrics": result.metrics}
        except ValueError as e:  # raised by every rank alike (a spec the method refuses)
            answer = {"error": f"{type(e).__name__}: {e}"}
        if rank == 0:
            (out / f"{job['name']}.json").write_text(json.dumps(answer, default=str))
        else:
            shutil.rmtree(target, ignore_errors=True)


def main(out: Path) -> None:
    plan = json.loads((out / "plan.json").read_text())
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    cases: list[str] = plan["equivalence"]
    for i, name in enumerate(cases):  # one process each, before the ranks join
        if i % 2 == rank:
            torch.save(train_case(name), out / f"{name}.one.pt")
    with joined(use_cuda=False):
        assert current() is not None
        for name in cases:
            two = train_case(name)
            if rank == 0:
                torch.save(two, out / f"{name}.two.pt")
        run_jobs(out, plan["jobs"], rank)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
