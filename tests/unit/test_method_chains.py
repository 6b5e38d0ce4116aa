"""Chain methods' plans and checks (pure: shapes only): takd, born_again, teacher_free_self."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from kd_engine import registry
from kd_engine.errors import SpecError
from kd_engine.methods.born_again import BornAgainConfig
from kd_engine.methods.chain import ChainMethod, plan_hops
from kd_engine.methods.finetune import FinetuneConfig
from kd_engine.methods.takd import TAKDConfig
from kd_engine.methods.teacher_free_self import TeacherFreeSelfConfig
from kd_engine.methods.vanilla_kd import VanillaKDConfig
from kd_engine.models.shapes import ModelShape
from kd_engine.spec import JobSpec, TrainingSpec
from kd_engine.students_spec import FreshStudent, FromTeacherStudent

TEACHER = ModelShape(num_layers=6, hidden_size=384, num_labels=2, num_heads=12)
STUDENT = ModelShape(num_layers=2, hidden_size=384, num_labels=2, num_heads=12)
BILSTM = ModelShape(num_layers=1, hidden_size=600, num_labels=2, transformer=False)


def takd(**settings: Any) -> TAKDConfig:
    return TAKDConfig.model_validate({"name": "takd", **settings})


def check(config: Any, student: ModelShape = STUDENT) -> None:
    registry.check(config, TEACHER, student, TrainingSpec())


def test_takd_default_assistant_is_midway_in_layers() -> None:
    hops = plan_hops(takd(), TEACHER, STUDENT)
    assert [h.name for h in hops] == ["assistant_1", "student"]
    assert hops[0].student == FromTeacherStudent(num_layers=4)  # (6 + 2) // 2
    assert hops[0].shape == ModelShape(4, 384, 2, 12)
    assert [h.teacher for h in hops] == ["job", "previous"]
    assert hops[1].student is None and hops[1].shape == STUDENT
    assert all(h.method == VanillaKDConfig(alpha=0.5, temperature=2.0) for h in hops)
    # A BiLSTM student counts as 0 transformer layers: 6 // 2.
    assert plan_hops(takd(), TEACHER, BILSTM)[0].student == FromTeacherStudent(num_layers=3)


def test_takd_settings_reach_every_hop() -> None:
    config = takd(
        assistants=[
            {"num_layers": 4},
            {
                "type": "fresh",
                "num_layers": 3,
                "hidden_size": 256,
                "num_heads": 4,
                "intermediate_size": 512,
            },
        ],
        alpha=0.9,
        temperature=5.0,
    )
    small = ModelShape(1, 128, 2, 2)
    hops = plan_hops(config, TEACHER, small)
    assert [h.name for h in hops] == ["assistant_1", "assistant_2", "student"]
    assert [h.shape.num_layers for h in hops] == [4, 3, 1]
    assert hops[1].shape == ModelShape(3, 256, 2, 4)
    assert isinstance(hops[1].student, FreshStudent)
    assert [h.teacher for h in hops] == ["job", "previous", "previous"]
    assert {h.method for h in hops} == {VanillaKDConfig(alpha=0.9, temperature=5.0)}
    check(config, small)


def test_takd_without_room_for_a_default_assistant_names_the_field() -> None:
    with pytest.raises(SpecError) as info:
        check(takd(), ModelShape(5, 384, 2, 12))
    assert info.value.field == "method.assistants"
    assert "6 layers" in info.value.reason and "5" in info.value.reason


@pytest.mark.parametrize(
    ("assistants", "student", "field", "words"),
    [
        ([{"num_layers": 6}], STUDENT, "method.assistants.0.num_layers", "fewer than the teacher"),
        ([{"num_layers": 7}], STUDENT, "method.assistants.0.num_layers", "more than the teacher"),
        ([{"layers": [0, 6]}], STUDENT, "method.assistants.0.layers", "out of range"),
        ([{"num_layers": 4}, {"num_layers": 4}], STUDENT, "method.assistants.1.num_layers",
         "fewer than the assistant 1"),
        ([{"num_layers": 2}], STUDENT, "student.num_layers", "fewer than the assistant 1"),
        (
            [{"type": "fresh", "num_layers": 3, "hidden_size": 512, "num_heads": 8,
              "intermediate_size": 1024}],
            STUDENT,
            "method.assistants.0.hidden_size",
            "wider than the teacher",
        ),
        (
            [{"type": "fresh", "num_layers": 3, "hidden_size": 128, "num_heads": 2,
              "intermediate_size": 256}],
            STUDENT,
            "student.hidden_size",
            "wider than the assistant 1",
        ),
    ],
    ids=["as-deep", "deeper", "layer-index", "not-decreasing", "student-as-deep", "wider",
         "student-wider"],
)  # fmt: skip
def test_takd_rejects_assistants_that_do_not_shrink(
    assistants: list[dict[str, Any]], student: ModelShape, field: str, words: str
) -> None:
    with pytest.raises(SpecError) as info:
        check(takd(assistants=assistants), student)
    assert info.value.field == field
    assert words in info.value.reason


def test_takd_assistants_are_transformers_built_from_the_teacher_or_fresh() -> None:
    for bad in ({"type": "bilstm"}, {"type": "pretrained", "model": "builtin:minilm-l3"}):
        with pytest.raises(ValidationError):
            takd(assistants=[bad])
    with pytest.raises(ValidationError):
        takd(assistants=[])
    # A BiLSTM student is not compared in layers with the assistants.
    check(takd(assistants=[{"num_layers": 2}]), BILSTM)


def test_born_again_generations_of_the_teachers_shape() -> None:
    config = BornAgainConfig(generations=3, alpha=0.9, temperature=20.0)
    hops = plan_hops(config, TEACHER, TEACHER)
    assert [h.name for h in hops] == ["generation_1", "generation_2", "generation_3"]
    assert [h.teacher for h in hops] == ["job", "previous", "previous"]
    assert all(h.student is None and h.shape == TEACHER for h in hops)
    assert {h.method for h in hops} == {VanillaKDConfig(alpha=0.9, temperature=20.0)}
    assert [h.reinit_seed for h in hops] == [0, 1, 2]  # init random: the teacher's shape
    # Whatever the job's student: each generation is the teacher's architecture.
    assert [h.shape for h in plan_hops(config, TEACHER, STUDENT)] == [TEACHER] * 3
    defaults = BornAgainConfig()
    assert (defaults.generations, defaults.alpha, defaults.temperature) == (3, 1.0, 1.0)
    assert defaults.init == "random"
    built = plan_hops(BornAgainConfig(init="student"), TEACHER, TEACHER)
    assert [h.reinit_seed for h in built] == [None] * 3
    with pytest.raises(ValidationError):
        BornAgainConfig(generations=0)


@pytest.mark.parametrize(
    "student", [STUDENT, ModelShape(6, 256, 2, 4), ModelShape(6, 384, 2, 6), BILSTM]
)
def test_born_again_rejects_a_student_of_another_shape(student: ModelShape) -> None:
    with pytest.raises(SpecError) as info:
        check(BornAgainConfig(init="student"), student)
    assert info.value.field == "student"
    assert "teacher's shape" in info.value.reason


def test_teacher_free_self_plan() -> None:
    config = TeacherFreeSelfConfig()
    assert (config.alpha, config.temperature) == (0.95, 20.0)
    hops = plan_hops(config, TEACHER, STUDENT)
    assert [(h.name, h.teacher) for h in hops] == [
        ("self_teacher", "none"),
        ("student", "previous"),
    ]
    assert hops[0].method == FinetuneConfig()
    assert hops[1].method == VanillaKDConfig(alpha=0.95, temperature=20.0)
    assert all(h.shape == STUDENT and h.student is None for h in hops)
    assert not registry.get("teacher_free_self").method_cls.needs.teacher
    check(config, BILSTM)  # output-level hops accept any student


def test_a_single_model_method_is_one_hop() -> None:
    (hop,) = plan_hops(VanillaKDConfig(), TEACHER, STUDENT)
    assert (hop.name, hop.student, hop.shape, hop.teacher) == ("student", None, STUDENT, "job")
    (hop,) = plan_hops(FinetuneConfig(), TEACHER, STUDENT)
    assert hop.teacher == "none"


def test_a_built_chain_holds_each_hops_method_and_has_no_loss_of_its_own() -> None:
    chain = registry.build(takd(), TEACHER, STUDENT, TrainingSpec())
    assert isinstance(chain, ChainMethod)
    assert [type(m).__name__ for m in chain.hop_methods] == ["VanillaKD", "VanillaKD"]
    assert chain.hop_methods[1].teacher_shape == ModelShape(4, 384, 2, 12)
    with pytest.raises(TypeError, match="hop"):
        chain.loss(None, None, None, None)  # type: ignore[arg-type]


def test_job_spec_accepts_chain_methods() -> None:
    spec = JobSpec.model_validate(
        {
            "teacher": "job:t",
            "student": {"num_layers": 1},
            "method": {"name": "takd", "assistants": [{"num_layers": 3}]},
            "dataset": {"source": "builtin:rotten_tomatoes"},
        }
    )
    assert isinstance(spec.method, TAKDConfig)
    assert spec.method.assistants == [FromTeacherStudent(num_layers=3)]
