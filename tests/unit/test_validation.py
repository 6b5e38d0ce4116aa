"""The one check of a spec against its models (:func:`kd_engine.validation.check_models`), on
config dicts (nothing read, nothing allocated): each refusal is a :class:`SpecError` naming
the field, with the reason the API answers and the worker fails the job with; the submit
policy (memory budget, student size) applies only when given; the checked shapes come back."""

from __future__ import annotations

from typing import Any

import pytest

from kd_engine.errors import SpecError
from kd_engine.spec import JobSpec, stored_spec
from kd_engine.validation import (
    ModelConfigs,
    SubmitPolicy,
    base_encoder_reason,
    check_models,
    check_teacher_labels,
)

CLASSIFIER: dict[str, object] = {
    "model_type": "bert",
    "architectures": ["BertForSequenceClassification"],
    "num_hidden_layers": 4,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "intermediate_size": 37,
    "vocab_size": 100,
    "max_position_embeddings": 64,
    "id2label": {"0": "rotten", "1": "fresh"},
}
BASE = {k: v for k, v in CLASSIFIER.items() if k not in ("architectures", "id2label")}


def spec(**over: Any) -> JobSpec:
    data: dict[str, Any] = {
        "teacher": "file://teacher",
        "method": {"name": "vanilla_kd"},
        "dataset": {"source": "builtin:rotten_tomatoes"},
        "student": {"type": "from_teacher", "layers": [0, 3]},
    }
    data.update(over)
    return JobSpec.model_validate(data)


def refused(job: JobSpec, configs: ModelConfigs, policy: SubmitPolicy | None = None) -> SpecError:
    with pytest.raises(SpecError) as e:
        check_models(job, configs, policy)
    return e.value


def test_a_fitting_job_returns_the_checked_shapes() -> None:
    checked = check_models(spec(), ModelConfigs(CLASSIFIER))
    assert checked.teacher is not None and checked.student is not None
    assert (checked.teacher.num_layers, checked.teacher.num_labels) == (4, 2)
    assert checked.student.num_layers == 2 and checked.regression is False
    worker = check_models(spec(), ModelConfigs(CLASSIFIER), num_labels=3)  # the worker's count
    assert worker.teacher is not None and worker.teacher.num_labels == 3


def test_a_base_encoder_cannot_teach_but_can_be_finetuned() -> None:
    e = refused(spec(), ModelConfigs(BASE))
    assert e.field == "teacher" and e.reason == base_encoder_reason("file://teacher", "vanilla_kd")
    assert "run a finetune job first" in str(e) and str(e).startswith("teacher: ")
    check_models(
        spec(method={"name": "finetune"}, student={"type": "from_teacher"}), ModelConfigs(BASE)
    )


def test_each_refusal_names_its_field() -> None:
    e = refused(spec(student={"type": "from_teacher", "layers": [0, 4]}), ModelConfigs(CLASSIFIER))
    assert (e.field, e.reason) == (
        "student.layers",
        "index 4 is out of range: the teacher has 4 layers (0..3)",
    )
    other_labels = {**CLASSIFIER, "id2label": {"0": "neg", "1": "pos"}}
    e = refused(spec(), ModelConfigs(other_labels))
    assert e.field == "dataset.source" and "do not match the dataset's labels" in e.reason
    e = refused(spec(), ModelConfigs({**CLASSIFIER, "model_type": "gpt2"}))
    assert e.field == "teacher" and "teachers must be one of" in e.reason
    e = refused(
        spec(dataset={"source": "builtin:rotten_tomatoes", "task": "regression"}),
        ModelConfigs(CLASSIFIER),
    )
    assert e.field == "dataset.task"
    pretrained = spec(student={"type": "pretrained", "model": "file://student"})
    e = refused(pretrained, ModelConfigs(CLASSIFIER, student={**CLASSIFIER, "vocab_size": 7}))
    assert e.field == "student.model" and "vocabulary (7 tokens)" in e.reason
    mate = spec(method={"name": "mate_kd", "generator": "file://gen"})
    e = refused(mate, ModelConfigs(CLASSIFIER, generator={**CLASSIFIER}))
    assert e.field == "method.generator" and "not a masked-LM checkpoint" in e.reason


def test_the_method_fit_is_checked_with_the_shapes() -> None:
    pkd = spec(method={"name": "pkd", "layer_mapping": [0, 9]})
    e = refused(pkd, ModelConfigs(CLASSIFIER))
    assert e.field == "method.layer_mapping" and "teacher layer 9 is out of range" in e.reason


def test_the_submit_policy_applies_only_when_given() -> None:
    big = spec(
        student={
            "type": "fresh",
            "num_layers": 8,
            "hidden_size": 64,
            "num_heads": 2,
            "intermediate_size": 128,
        }
    )
    check_models(big, ModelConfigs(CLASSIFIER))  # the worker: no size rule, no budget
    e = refused(big, ModelConfigs(CLASSIFIER), SubmitPolicy("cpu"))
    assert e.field == "student.allow_larger_than_teacher"
    assert (
        e.details is not None and e.details["student_parameters"] > e.details["teacher_parameters"]
    )
    e = refused(spec(), ModelConfigs(CLASSIFIER), SubmitPolicy("tiny", limit_bytes=1000))
    assert e.details is not None and e.details["limit_bytes"] == 1000
    assert e.details["queue"] == "tiny" and e.field in ("teacher", "student", "training.batch_size")


def test_unknown_models_are_left_to_where_they_are_known() -> None:
    checked = check_models(spec(), ModelConfigs(None))  # a hub teacher at submit
    assert checked.teacher is None and checked.student is None


def test_labels_are_compared_in_any_order() -> None:
    check_teacher_labels(["a", "b"], ["b", "a"])
    with pytest.raises(SpecError, match=r"dataset\.source: the teacher's labels"):
        check_teacher_labels(["a", "b"], ["a", "c"])


def test_a_stored_spec_is_parsed_once_into_the_typed_spec_or_one_spec_error() -> None:
    job = spec()
    assert stored_spec(job.model_dump(mode="json")) == job
    bad = {**job.model_dump(mode="json"), "training": {"epochs": -1}}
    with pytest.raises(SpecError, match="the stored job spec is invalid") as e:
        stored_spec(bad)
    assert e.value.field == "training.epochs"
