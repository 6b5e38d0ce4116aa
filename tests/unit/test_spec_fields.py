"""The rules every job spec string obeys, and the unknown-field messages (kd_engine.spec_fields)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kd_engine.spec import JobSpec
from kd_engine.spec_fields import check_text, control_character, unknown_field_reason

BASE = {
    "teacher": "builtin:minilm-l6",
    "method": {"name": "finetune"},
    "dataset": {"source": "builtin:rotten_tomatoes"},
}


@pytest.mark.parametrize(
    ("value", "at"),
    [("ok", None), ("a\x00b", 1), ("\t", 0), ("x\n", 1), ("\x7f", 0), ("ab\x9f", 2),
     ("\ud800", 0), ("é ü 日本", None)],
)  # fmt: skip
def test_control_character_finds_cc_and_surrogates(value: str, at: int | None) -> None:
    assert control_character(value) == at


def test_check_text_names_the_character_and_the_cap() -> None:
    with pytest.raises(ValueError, match="U\\+0000 at character 3"):
        check_text("abc\x00")
    with pytest.raises(ValueError, match="at most 4"):
        check_text("abcde", max_chars=4)
    assert check_text("abcd", max_chars=4) == "abcd"


def test_a_nested_method_setting_string_is_checked_under_its_own_field() -> None:
    bad = {**BASE, "method": {"name": "minimax_knn", "corpus_text_column": "a\x00"}}
    with pytest.raises(ValidationError) as e:
        JobSpec.model_validate(bad)
    (err,) = e.value.errors()
    assert err["loc"] == ("method", "minimax_knn", "corpus_text_column")


@pytest.mark.parametrize(
    ("loc", "expected"),
    [
        (
            ("method", "vanilla_kd", "alpah"),
            "unknown setting 'alpah' for vanilla_kd; valid settings: alpha, temperature",
        ),
        (("training", "epoch"), "unknown field 'epoch' in training; valid fields: epochs,"),
        (
            ("student", "bilstm", "units"),
            "unknown field 'units' in student; valid fields: type, hidden_size,",
        ),
        (
            ("dataset", "eval_sets", 0, "path"),
            "unknown field 'path' in dataset.eval_sets; valid fields: name, source,",
        ),
        (
            ("teachr",),
            "unknown field 'teachr'; valid fields: teacher, student, method, dataset, training",
        ),
    ],
)
def test_unknown_field_reason_lists_the_valid_fields(
    loc: tuple[str | int, ...], expected: str
) -> None:
    reason = unknown_field_reason(JobSpec, loc)
    assert reason is not None
    assert reason.startswith(expected), reason


def test_unknown_field_reason_of_an_unknown_place_is_none() -> None:
    assert unknown_field_reason(JobSpec, ("nowhere", "x")) is None
