"""check_dataset_files: a job's files against each other, the teacher's labels and the
splits the loader will make; each refusal names the field the loader would fail on."""

from __future__ import annotations

from pathlib import Path

import pytest

from kd_engine.data import load_transfer_set
from kd_engine.data.checks import check_corpus_file, check_dataset_files
from kd_engine.errors import SpecError
from kd_engine.references import local_path_under
from kd_engine.spec import DatasetSpec


def csv_file(path: Path, labels: list[str]) -> None:
    path.write_text(
        "text,label\n" + "".join(f"text {i},{lab}\n" for i, lab in enumerate(labels)),
        encoding="utf-8",
    )


def check(tmp_path: Path, teacher: list[str] | None = None, **spec: object) -> SpecError | None:
    try:
        check_dataset_files(
            DatasetSpec.model_validate(spec),
            lambda ref: local_path_under(ref, tmp_path),
            teacher,
            None,
        )
    except SpecError as e:
        return e
    return None


def test_a_good_job_passes_and_reports_each_file(tmp_path: Path) -> None:
    csv_file(tmp_path / "train.csv", ["a", "b"] * 10)
    csv_file(tmp_path / "ood.csv", ["b"] * 3)
    spec = DatasetSpec.model_validate(
        {"source": "file://train.csv", "eval_sets": [{"name": "o", "source": "file://ood.csv"}]}
    )
    result = check_dataset_files(
        spec, lambda ref: local_path_under(ref, tmp_path), ["b", "a"], None
    )
    assert sorted(result.reports) == ["dataset.eval_sets.0.source", "dataset.source"]
    assert result.regression is False and result.label_names == ["a", "b"]


def test_labels_against_the_teacher(tmp_path: Path) -> None:
    csv_file(tmp_path / "train.csv", ["pos", "neg", "neutral"] * 10)
    err = check(tmp_path, ["neg", "pos"], source="file://train.csv")
    assert err is not None and err.field == "dataset.source"
    assert "the dataset has labels the teacher lacks: ['neutral']" in err.reason
    err = check(tmp_path, ["neg", "pos", "neutral", "mixed"], source="file://train.csv")
    assert err is not None and "the teacher has labels the dataset lacks: ['mixed']" in err.reason
    assert check(tmp_path, ["neutral", "neg", "pos"], source="file://train.csv") is None


def test_dev_test_and_eval_set_labels(tmp_path: Path) -> None:
    csv_file(tmp_path / "train.csv", ["a", "b"] * 10)
    csv_file(tmp_path / "test.csv", ["a", "c"])
    err = check(tmp_path, source="file://train.csv", test_source="file://test.csv")
    assert err is not None and err.field == "dataset.test_source"
    assert "['c']" in err.reason
    err = check(
        tmp_path,
        source="file://train.csv",
        eval_sets=[{"name": "x", "source": "file://test.csv"}],
    )
    assert err is not None and err.field == "dataset.eval_sets.0.label_column"
    (tmp_path / "other.csv").write_text("sentence,label\nhi,a\n", encoding="utf-8")
    err = check(
        tmp_path,
        source="file://train.csv",
        eval_sets=[{"name": "x", "source": "file://other.csv"}],
    )
    assert err is not None and err.field == "dataset.eval_sets.0.text_column"


def test_split_sizes_and_single_label_match_the_loader(tmp_path: Path) -> None:
    """What the check refuses, the loader refuses too; what it passes, the loader loads."""
    resolve = lambda ref: local_path_under(ref, tmp_path)  # noqa: E731
    for n, ok in [(4, False), (5, False), (12, True)]:
        csv_file(tmp_path / "t.csv", ["a", "b"] * (n // 2))
        spec = DatasetSpec(source="file://t.csv")
        err = check(tmp_path, source="file://t.csv")
        assert (err is None) == ok, (n, err)
        if ok:
            load_transfer_set(spec, resolve)
        else:
            assert err is not None and err.field == "dataset.source" and "too few" in err.reason
            with pytest.raises(ValueError, match="too few examples"):
                load_transfer_set(spec, resolve)
    csv_file(tmp_path / "one.csv", ["a"] * 20)
    err = check(tmp_path, source="file://one.csv")
    assert err is not None and err.field == "dataset.label_column" and "one value" in err.reason


def test_a_regression_teacher_needs_numbers(tmp_path: Path) -> None:
    csv_file(tmp_path / "s.csv", ["1.5", "2", "oops", "3"] * 5)
    with pytest.raises(SpecError, match="line 4 has label 'oops'"):
        check_dataset_files(
            DatasetSpec(source="file://s.csv"),
            lambda ref: local_path_under(ref, tmp_path),
            None,
            True,
        )


def test_corpus_file(tmp_path: Path) -> None:
    (tmp_path / "c.csv").write_text("sentence\nA plot.\n", encoding="utf-8")
    assert check_corpus_file(tmp_path / "c.csv", "sentence", "c.csv").rows == 1
    with pytest.raises(SpecError) as info:
        check_corpus_file(tmp_path / "c.csv", "text", "c.csv")
    assert info.value.field == "method.corpus_text_column"
