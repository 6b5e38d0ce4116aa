"""Validation of the typed job spec."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kd_engine.methods.vanilla_kd import VanillaKDConfig
from kd_engine.spec import FreshStudent, FromTeacherStudent, JobSpec, PretrainedStudent


def job(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "teacher": "builtin:minilm-l6",
        "method": {"name": "finetune"},
        "dataset": {"source": "builtin:rotten_tomatoes"},
    }
    base.update(overrides)
    return base


def error_locs(info: pytest.ExceptionInfo[ValidationError]) -> list[tuple[str, ...]]:
    return [tuple(str(p) for p in e["loc"]) for e in info.value.errors()]


def test_defaults() -> None:
    spec = JobSpec.model_validate(job())
    assert spec.student == FromTeacherStudent()
    assert spec.student.num_layers is None and spec.student.layers is None
    t = spec.training
    assert (t.epochs, t.batch_size, t.eval_batch_size) == (3, 32, 64)
    assert (t.learning_rate, t.warmup_ratio, t.weight_decay) == (5e-5, 0.1, 0.01)
    assert (t.max_seq_length, t.grad_accumulation_steps, t.max_steps) == (128, 1, None)
    assert (t.seed, t.device) == (42, "auto")
    d = spec.dataset
    assert (d.text_column, d.text_pair_column, d.label_column) == ("text", None, "label")
    assert (d.dev_fraction, d.test_fraction, d.split_seed) == (0.1, 0.1, 0)
    assert d.max_train_examples is None and d.max_eval_examples is None


def test_method_is_discriminated_by_name() -> None:
    spec = JobSpec.model_validate(job(method={"name": "vanilla_kd", "alpha": 0.9}))
    assert isinstance(spec.method, VanillaKDConfig)
    assert spec.method.alpha == 0.9
    assert spec.method.temperature == 2.0


def test_student_omitted_is_from_teacher() -> None:
    spec = JobSpec.model_validate(job())
    assert isinstance(spec.student, FromTeacherStudent)
    assert spec.student.type == "from_teacher"


def test_student_without_type_parses_as_from_teacher() -> None:
    spec = JobSpec.model_validate(job(student={"num_layers": 2}))
    assert isinstance(spec.student, FromTeacherStudent)
    assert spec.student.num_layers == 2


def test_fresh_student_parses() -> None:
    spec = JobSpec.model_validate(
        job(
            student={
                "type": "fresh",
                "num_layers": 2,
                "hidden_size": 128,
                "num_heads": 4,
                "intermediate_size": 256,
            }
        )
    )
    assert spec.student == FreshStudent(
        num_layers=2, hidden_size=128, num_heads=4, intermediate_size=256
    )


def test_round_trip_through_json() -> None:
    spec = JobSpec.model_validate(
        job(student={"layers": [0, 2, 4]}, method={"name": "vanilla_kd", "temperature": 4})
    )
    again = JobSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert isinstance(again.student, FromTeacherStudent)


# The layer choice is validated alike for a from-teacher and a pretrained student.
LAYER_CHOOSERS = [{}, {"type": "pretrained", "model": "builtin:minilm-l6"}]


@pytest.mark.parametrize("base", LAYER_CHOOSERS)
@pytest.mark.parametrize("layers", [[1, 1], [3, 1], [0, 2, 2]])
def test_layers_must_be_strictly_increasing(base: dict[str, Any], layers: list[int]) -> None:
    with pytest.raises(ValidationError, match="strictly increasing") as info:
        JobSpec.model_validate(job(student={**base, "layers": layers}))
    assert error_locs(info)[0][0] == "student" and error_locs(info)[0][-1] == "layers"


@pytest.mark.parametrize("base", LAYER_CHOOSERS)
def test_layers_must_be_non_negative(base: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match=">= 0") as info:
        JobSpec.model_validate(job(student={**base, "layers": [-1, 2]}))
    assert error_locs(info)[0][-1] == "layers"


@pytest.mark.parametrize("base", LAYER_CHOOSERS)
def test_num_layers_and_layers_must_agree(base: dict[str, Any]) -> None:
    with pytest.raises(ValidationError, match="num_layers is 2 but layers lists 3"):
        JobSpec.model_validate(job(student={**base, "num_layers": 2, "layers": [0, 1, 2]}))
    ok = JobSpec.model_validate(job(student={**base, "num_layers": 3, "layers": [0, 1, 2]}))
    assert ok.student.layers == [0, 1, 2]  # type: ignore[union-attr]


@pytest.mark.parametrize("num_layers", [0, 49])
def test_pretrained_num_layers_is_bounded(num_layers: int) -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(job(student={**LAYER_CHOOSERS[1], "num_layers": num_layers}))
    assert error_locs(info) == [("student", "pretrained", "num_layers")]


def test_pretrained_student_parses_with_and_without_a_layer_choice() -> None:
    whole = JobSpec.model_validate(job(student=LAYER_CHOOSERS[1])).student
    assert isinstance(whole, PretrainedStudent)
    assert (whole.num_layers, whole.layers) == (None, None)
    cut = JobSpec.model_validate(job(student={**LAYER_CHOOSERS[1], "num_layers": 2})).student
    assert isinstance(cut, PretrainedStudent)
    assert (cut.model, cut.num_layers, cut.layers) == ("builtin:minilm-l6", 2, None)


def test_fresh_student_hidden_size_must_divide_by_heads() -> None:
    with pytest.raises(ValidationError, match="not divisible by num_heads 12"):
        JobSpec.model_validate(
            job(
                student={
                    "type": "fresh",
                    "num_layers": 2,
                    "hidden_size": 100,
                    "num_heads": 12,
                    "intermediate_size": 256,
                }
            )
        )


def test_unknown_student_type_is_rejected() -> None:
    with pytest.raises(ValidationError):
        JobSpec.model_validate(job(student={"type": "pruned", "num_layers": 2}))


def test_unknown_method_name_is_rejected() -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(job(method={"name": "no_such_method"}))
    assert any(loc[0] == "method" for loc in error_locs(info))


def test_method_is_required() -> None:
    body = job()
    del body["method"]
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(body)
    assert ("method",) in error_locs(info)


@pytest.mark.parametrize(
    "overrides",
    [
        {"colour": "blue"},
        {"training": {"epoch": 3}},
        {"dataset": {"source": "builtin:trec6", "text": "x"}},
        {"method": {"name": "finetune", "alpha": 0.5}},
        {"student": {"num_layers": 2, "hidden_size": 64}},
    ],
)
def test_extra_fields_are_forbidden(overrides: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(job(**overrides))
    assert any(e["type"] == "extra_forbidden" for e in info.value.errors())


@pytest.mark.parametrize("alpha", [-0.01, 1.01, 5])
def test_alpha_out_of_range_names_alpha(alpha: float) -> None:
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(job(method={"name": "vanilla_kd", "alpha": alpha}))
    assert any("alpha" in loc for loc in error_locs(info))
    assert "alpha" in str(info.value)


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_alpha_bounds_are_inclusive(alpha: float) -> None:
    spec = JobSpec.model_validate(job(method={"name": "vanilla_kd", "alpha": alpha}))
    assert spec.method.alpha == alpha  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("training", "epochs", 0),
        ("training", "learning_rate", 0.0),
        ("training", "max_seq_length", 4),
        ("training", "device", "tpu"),
        ("dataset", "dev_fraction", 0.5),
        ("dataset", "max_train_examples", 1),
    ],
)
def test_out_of_range_settings_name_the_field(section: str, field: str, value: Any) -> None:
    body = job()
    body.setdefault(section, {})
    body[section] = {**body[section], field: value}
    with pytest.raises(ValidationError) as info:
        JobSpec.model_validate(body)
    assert (section, field) in error_locs(info)


def test_spec_is_frozen() -> None:
    spec = JobSpec.model_validate(job())
    with pytest.raises(ValidationError):
        spec.teacher = "builtin:other"  # type: ignore[misc]


@pytest.mark.slow  # a fresh interpreter (torch, transformers) per entry point
@pytest.mark.parametrize(
    "first", ["kd_engine.data", "kd_engine.methods", "kd_engine.spec", "kd_engine.run", "api.main"]
)
def test_the_spec_accepts_every_method_whatever_is_imported_first(first: str) -> None:
    """The method union of the job spec is built when kd_engine.spec is imported; a method
    module that imports kd_engine.data at import time made it snapshot a half-filled registry
    (only the methods registered so far were accepted). A fresh interpreter per entry point."""
    import subprocess
    import sys

    code = (
        f"import {first}\n"
        "from kd_engine import registry\n"
        "from kd_engine.spec import JobSpec\n"
        "for n in registry.names():\n"
        "    JobSpec.model_validate({'teacher': 'builtin:minilm-l6', 'method': {'name': n},"
        " 'dataset': {'source': 'x'}})\n"
        "print(len(registry.names()))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) >= 19
