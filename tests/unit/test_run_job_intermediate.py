"""The intermediate-layer methods end to end through run_job (one real, tiny MiniLM-L6
teacher for all of them; CPU)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoModelForSequenceClassification

from kd_engine.models.attention_scores import SCORES_IMPLEMENTATION
from kd_engine.run import RunResult, run_job
from kd_engine.spec import JobSpec
from tests.checks import NO_EXTRAS, check_classification_metrics

DATASET = {"source": "builtin:rotten_tomatoes", "max_train_examples": 32, "max_eval_examples": 16}
TRAINING = {"epochs": 1, "batch_size": 16, "max_seq_length": 32, "device": "cpu"}


def make_spec(**overrides: Any) -> JobSpec:
    body: dict[str, Any] = {
        "teacher": "builtin:minilm-l6",
        "method": {"name": "finetune"},
        "dataset": DATASET,
        "training": TRAINING,
        "export": NO_EXTRAS,  # exported and checked in test_onnx_export / test_run_job
    }
    body.update(overrides)
    return JobSpec.model_validate(body)


def no_files(ref: str) -> Path:
    raise ValueError(f"no file references in these tests: {ref!r}")


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory, minilm_path: Path) -> RunResult:
    """A tiny finetune of the built-in MiniLM: the teacher of the jobs below."""
    return run_job(make_spec(), minilm_path, no_files, tmp_path_factory.mktemp("teacher"))


@pytest.mark.parametrize(
    ("method", "epochs", "parts"),
    [
        ({"name": "pkd"}, 1, [{"ce", "kd", "patience"}]),
        ({"name": "ckd", "scheme": "overlap"}, 1, [{"ce", "kd", "internal"}]),
        (
            {"name": "tinybert", "intermediate_epochs": 1, "prediction_epochs": 1},
            2,
            # the intermediate stage is not evaluated: the one evaluation is stage 2's
            [{"soft_ce"}],
        ),
    ],
    ids=["pkd", "ckd", "tinybert"],
)
def test_pkd_tinybert_ckd_run_end_to_end(
    method: dict[str, Any],
    epochs: int,
    parts: list[set[str]],
    teacher_run: RunResult,
    tmp_path: Path,
) -> None:
    spec = make_spec(
        teacher="job:teacher",
        student={"num_layers": 2},
        method=method,
        training={**TRAINING, "epochs": epochs},
    )
    result = run_job(spec, teacher_run.out_dir, no_files, tmp_path)
    m = result.metrics
    assert m["method"] == method["name"]
    assert [h["epoch"] for h in m["epochs"]] == [epochs]
    for epoch, expected in zip(m["epochs"], parts, strict=True):
        losses = epoch["train_losses"]
        assert losses.keys() == {"loss", *expected}
        assert all(math.isfinite(v) and v >= 0.0 for v in losses.values())
    # TinyBERT's stage-1 epoch trains no classifier: the exported student is from stage 2.
    assert m["best_epoch"] == epochs
    assert m["best_stage"] == m["stages"][-1]["name"]
    assert [st["epochs"] for st in m["stages"]] == [1] * epochs
    if method["name"] == "tinybert":
        assert [st["name"] for st in m["stages"]] == [
            "tinybert intermediate",
            "tinybert prediction",
        ]
        log = (tmp_path / "train_log.jsonl").read_text().splitlines()
        steps = [json.loads(x) for x in log if '"event": "step"' in x]
        stage_one = [r for r in steps if r["stage"] == "tinybert intermediate"]
        assert stage_one and all(
            {"embedding", "hidden", "attention"} <= r.keys() for r in stage_one
        )
    check_classification_metrics(m, 16)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["num_hidden_layers"] == 2
    assert SCORES_IMPLEMENTATION not in json.dumps(config)
    AutoModelForSequenceClassification.from_pretrained(tmp_path)  # loads as a plain model


@pytest.mark.parametrize(
    ("method", "part"),
    [
        ({"name": "alp_kd", "variant": "alp_po"}, "alp"),
        ({"name": "rail_kd", "mode": "layerwise"}, "rail"),
        ({"name": "crd"}, "crd"),
        # the memory bank over the 32 training examples; K = 100 > the other-class pools, so
        # negatives are drawn with replacement (as the authors' code does)
        ({"name": "codir"}, "crd"),
    ],
    ids=["alp_kd", "rail_kd", "crd", "codir"],
)
def test_layer_method_runs_end_to_end(
    method: dict[str, Any], part: str, teacher_run: RunResult, tmp_path: Path
) -> None:
    spec = make_spec(teacher="job:teacher", student={"num_layers": 2}, method=method)
    result = run_job(spec, teacher_run.out_dir, no_files, tmp_path)
    m = result.metrics
    assert m["method"] == method["name"]
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == 2
    losses = m["epochs"][0]["train_losses"]
    assert {"loss", "ce", "kd", part} <= losses.keys()
    assert all(math.isfinite(v) for v in losses.values())
    assert losses[part] > 0.0  # each of these parts is a positive distance or contrast
    check_classification_metrics(m, 16)
