"""Built-in datasets, CSV/JSONL transfer sets, splits, subsets and relabelling."""

from __future__ import annotations

import csv
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kd_engine.data import Example, TransferSet, load_transfer_set, relabel
from kd_engine.data.builtins import BUILTIN_DATASETS, load_builtin
from kd_engine.data.files import label_order, read_rows
from kd_engine.data.splits import split_off, subset
from kd_engine.references import local_path_under
from kd_engine.spec import DatasetSpec

BUILTINS = sorted(BUILTIN_DATASETS)


def proportions(examples: list[Example], n_labels: int) -> list[float]:
    counts = Counter(e.label for e in examples)
    return [counts[i] / len(examples) for i in range(n_labels)]


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_splits_are_disjoint_and_cover_the_source(name: str) -> None:
    source, names = BUILTIN_DATASETS[name]()
    data = load_builtin(name)
    ids = {split: [e.id for e in getattr(data, split)] for split in ("train", "dev", "test")}
    for split_ids in ids.values():
        assert len(split_ids) == len(set(split_ids))
    assert not set(ids["train"]) & set(ids["dev"])
    assert not set(ids["train"]) & set(ids["test"])
    assert not set(ids["dev"]) & set(ids["test"])
    assert sum(data.sizes().values()) == len(source)
    assert set(ids["train"]) | set(ids["dev"]) | set(ids["test"]) == {e.id for e in source}
    assert data.label_names == names
    # 80/10/10
    assert abs(len(data.test) - 0.1 * len(source)) <= 1
    assert abs(len(data.dev) - len(data.test)) <= 1


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_split_is_deterministic(name: str) -> None:
    a, b = load_builtin(name), load_builtin(name)
    for split in ("train", "dev", "test"):
        assert [e.id for e in getattr(a, split)] == [e.id for e in getattr(b, split)]
    assert a == b


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_split_is_stratified(name: str) -> None:
    data = load_builtin(name)
    n = len(data.label_names)
    train, dev, test = (proportions(s, n) for s in (data.train, data.dev, data.test))
    for c in range(n):
        assert abs(train[c] - dev[c]) <= 0.02, (c, train, dev)
        assert abs(train[c] - test[c]) <= 0.02, (c, train, test)


def test_builtin_examples_are_usable() -> None:
    data = load_builtin("rotten_tomatoes")
    assert data.label_names == ["rotten", "fresh"]
    assert all(e.text.strip() and e.text_pair is None for e in data.train[:200])
    assert {e.label for e in data.train} == {0, 1}


def test_trec6_has_six_coarse_labels() -> None:
    data = load_builtin("trec6")
    assert data.label_names == ["ABBR", "DESC", "ENTY", "HUM", "LOC", "NUM"]
    assert {e.label for e in data.train} == set(range(6))
    assert sum(data.sizes().values()) == 5452
    assert not any(":" in e.text.split(" ", 1)[0] for e in data.train[:100])


def test_unknown_builtin_lists_the_builtins() -> None:
    with pytest.raises(ValueError) as info:
        load_builtin("imdb")
    for name in BUILTINS:
        assert name in str(info.value)


def test_builtin_transfer_set_with_subsets() -> None:
    spec = DatasetSpec(
        source="builtin:sms_spam", max_train_examples=100, max_eval_examples=40, split_seed=3
    )
    data = load_transfer_set(spec, _no_files)
    assert data.sizes() == {"train": 100, "dev": 40, "test": 40}
    full = load_builtin("sms_spam")
    assert {e.id for e in data.train} <= {e.id for e in full.train}
    assert {e.id for e in data.test} <= {e.id for e in full.test}
    # Stratified: 100 examples keep spam's share (about 13%) to within one example.
    share = sum(e.label for e in data.train) / 100
    full_share = sum(e.label for e in full.train) / len(full.train)
    assert abs(share - full_share) <= 0.011


def _no_files(ref: str) -> Path:
    raise AssertionError(f"no file should be resolved, got {ref!r}")


# ---------------------------------------------------------------- files


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


def pair_rows(n: int, labels: tuple[Any, ...] = ("pos", "neg"), prefix: str = "") -> list[dict]:
    return [
        {
            "text": f"{prefix}premise {i}",
            "hypothesis": f"{prefix}hypothesis {i}",
            "label": labels[i % len(labels)],
        }
        for i in range(n)
    ]


def resolver(root: Path) -> Callable[[str], Path]:
    return lambda ref: local_path_under(ref, root)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_file_transfer_set_auto_split(tmp_path: Path, fmt: str) -> None:
    rows = pair_rows(60)
    (write_csv if fmt == "csv" else write_jsonl)(tmp_path / f"train.{fmt}", rows)
    spec = DatasetSpec(source=f"file://train.{fmt}", text_pair_column="hypothesis")
    data = load_transfer_set(spec, resolver(tmp_path))
    assert data.label_names == ["neg", "pos"]
    assert data.sizes() == {"train": 48, "dev": 6, "test": 6}
    all_ids = [e.id for s in (data.train, data.dev, data.test) for e in s]
    assert sorted(all_ids) == list(range(60))
    for split in (data.train, data.dev, data.test):
        for e in split:
            assert e.text == f"premise {e.id}"
            assert e.text_pair == f"hypothesis {e.id}"
            assert data.label_names[e.label] == rows[e.id]["label"]
    # Stratified: each held-out split has 3 of each label.
    assert Counter(e.label for e in data.dev) == {0: 3, 1: 3}
    assert Counter(e.label for e in data.test) == {0: 3, 1: 3}


def test_file_split_depends_on_split_seed_only(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", pair_rows(60))
    ids = {}
    for seed in (0, 0, 1):
        data = load_transfer_set(
            DatasetSpec(source="file://train.csv", split_seed=seed), resolver(tmp_path)
        )
        ids.setdefault(seed, []).append(sorted(e.id for e in data.test))
    assert ids[0][0] == ids[0][1]
    assert ids[0][0] != ids[1][0]


def test_file_without_pair_column_has_no_pairs(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", pair_rows(30))
    data = load_transfer_set(DatasetSpec(source="file://train.csv"), resolver(tmp_path))
    assert all(e.text_pair is None for e in data.train + data.dev + data.test)


def test_file_explicit_dev_and_test_sources(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", pair_rows(20, labels=(0, 1, 2)))
    write_jsonl(tmp_path / "dev.jsonl", pair_rows(7, labels=(2, 1), prefix="dev "))
    write_csv(tmp_path / "test.csv", pair_rows(5, labels=(1,), prefix="test "))
    spec = DatasetSpec(
        source="file://train.jsonl",
        dev_source="file://dev.jsonl",
        test_source="file://test.csv",
        text_pair_column="hypothesis",
    )
    data = load_transfer_set(spec, resolver(tmp_path))
    assert data.sizes() == {"train": 20, "dev": 7, "test": 5}
    assert data.label_names == ["0", "1", "2"]
    assert [e.text for e in data.train] == [f"premise {i}" for i in range(20)]
    assert [e.text for e in data.dev] == [f"dev premise {i}" for i in range(7)]
    assert [e.label for e in data.dev] == [2, 1, 2, 1, 2, 1, 2]
    assert [e.label for e in data.test] == [1] * 5
    ids = [{e.id for e in s} for s in (data.train, data.dev, data.test)]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])


def test_file_explicit_test_source_splits_dev_from_train(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", pair_rows(40))
    write_csv(tmp_path / "test.csv", pair_rows(10, prefix="test "))
    spec = DatasetSpec(source="file://train.csv", test_source="file://test.csv")
    data = load_transfer_set(spec, resolver(tmp_path))
    assert len(data.test) == 10
    assert all(e.text.startswith("test ") for e in data.test)
    assert len(data.train) + len(data.dev) == 40
    assert not {e.id for e in data.train} & {e.id for e in data.dev}


def test_missing_column_names_the_column(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", pair_rows(20))
    spec = DatasetSpec(source="file://train.csv", label_column="sentiment")
    with pytest.raises(ValueError, match="'sentiment'") as info:
        load_transfer_set(spec, resolver(tmp_path))
    assert "dataset.source" in str(info.value)


def test_missing_column_in_dev_names_the_dev_source(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", pair_rows(20))
    write_jsonl(tmp_path / "dev.jsonl", [{"text": "a", "gold": "pos"}])
    spec = DatasetSpec(source="file://train.csv", dev_source="file://dev.jsonl")
    with pytest.raises(ValueError, match=r"dataset\.dev_source.*'label'"):
        load_transfer_set(spec, resolver(tmp_path))


def test_empty_value_names_the_row(tmp_path: Path) -> None:
    rows = pair_rows(20)
    rows[4]["text"] = "   "
    write_csv(tmp_path / "train.csv", rows)
    with pytest.raises(ValueError, match=r"row 5 .*'text'"):
        load_transfer_set(DatasetSpec(source="file://train.csv"), resolver(tmp_path))


def test_unknown_label_in_dev_is_an_error(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", pair_rows(20))
    write_csv(tmp_path / "dev.csv", pair_rows(4, labels=("pos", "neutral")))
    spec = DatasetSpec(source="file://train.csv", dev_source="file://dev.csv")
    with pytest.raises(ValueError, match=r"dataset\.dev: row 2 has label 'neutral'") as info:
        load_transfer_set(spec, resolver(tmp_path))
    assert "neg, pos" in str(info.value)


def test_single_label_train_is_an_error(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", pair_rows(20, labels=("pos",)))
    with pytest.raises(ValueError, match="fewer than 2"):
        load_transfer_set(DatasetSpec(source="file://train.csv"), resolver(tmp_path))


def test_max_train_examples_takes_a_stratified_subset(tmp_path: Path) -> None:
    write_csv(tmp_path / "train.csv", pair_rows(100))
    spec = DatasetSpec(source="file://train.csv", max_train_examples=20, max_eval_examples=4)
    data = load_transfer_set(spec, resolver(tmp_path))
    assert data.sizes() == {"train": 20, "dev": 4, "test": 4}
    assert Counter(e.label for e in data.train) == {0: 10, 1: 10}
    again = load_transfer_set(spec, resolver(tmp_path))
    assert [e.id for e in again.train] == [e.id for e in data.train]


def test_unsupported_extension_and_bad_json(tmp_path: Path) -> None:
    (tmp_path / "train.txt").write_text("text,label\n", encoding="utf-8")
    with pytest.raises(ValueError, match="unsupported file type"):
        read_rows(tmp_path / "train.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": 1}\n\n{oops\n', encoding="utf-8")
    with pytest.raises(ValueError, match="line 3"):
        read_rows(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(ValueError, match="line 1: expected a JSON object"):
        read_rows(tmp_path / "list.jsonl")


def test_file_outside_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    write_csv(tmp_path / "secret.csv", pair_rows(20))
    with pytest.raises(ValueError, match="outside"):
        load_transfer_set(DatasetSpec(source="file://../secret.csv"), resolver(root))


# ---------------------------------------------------------------- labels


def test_label_order_sorts_integers_numerically() -> None:
    assert label_order(["2", "10", "1", "2"]) == ["1", "2", "10"]
    assert label_order(["-1", "3", "0"]) == ["-1", "0", "3"]


def test_label_order_sorts_names_as_strings() -> None:
    assert label_order(["pos", "neg", "neutral", "neg"]) == ["neg", "neutral", "pos"]
    assert label_order(["b", "10", "a", "2"]) == ["10", "2", "a", "b"]


def small_set() -> TransferSet:
    def ex(i: int, label: int) -> Example:
        return Example(i, f"text {i}", None, label)

    return TransferSet(
        train=[ex(0, 0), ex(1, 1), ex(2, 2)],
        dev=[ex(3, 1)],
        test=[ex(4, 2), ex(5, 0)],
        label_names=["neg", "neutral", "pos"],
    )


def test_relabel_reorders_to_the_teacher_order() -> None:
    data = small_set()
    teacher_order = ["pos", "neg", "neutral"]
    out = relabel(data, teacher_order)
    assert out.label_names == teacher_order
    for split in ("train", "dev", "test"):
        before, after = getattr(data, split), getattr(out, split)
        assert [e.id for e in after] == [e.id for e in before]
        assert [e.text for e in after] == [e.text for e in before]
        assert [out.label_names[e.label] for e in after] == [
            data.label_names[e.label] for e in before
        ]
    assert [e.label for e in out.train] == [1, 2, 0]


def test_relabel_with_the_same_order_changes_nothing() -> None:
    data = small_set()
    assert relabel(data, list(data.label_names)) == data


def test_relabel_with_a_different_label_set_raises() -> None:
    with pytest.raises(ValueError) as info:
        relabel(small_set(), ["neg", "pos"])
    message = str(info.value)
    assert "['neg', 'pos']" in message
    assert "['neg', 'neutral', 'pos']" in message


# ---------------------------------------------------------------- splits


def test_split_off_sizes_and_errors() -> None:
    examples = [Example(i, str(i), None, i % 2) for i in range(10)]
    rest, held = split_off(examples, 0.3, seed=0)
    assert (len(rest), len(held)) == (7, 3)
    assert sorted(e.id for e in rest + held) == list(range(10))
    with pytest.raises(ValueError, match="too few"):
        split_off(examples[:3], 0.1, seed=0)


def test_split_off_falls_back_when_a_class_is_tiny() -> None:
    examples = [Example(i, str(i), None, 0) for i in range(9)] + [Example(9, "x", None, 1)]
    rest, held = split_off(examples, 0.2, seed=0)
    assert (len(rest), len(held)) == (8, 2)
    assert sorted(e.id for e in rest + held) == list(range(10))


def test_subset_is_all_when_limit_is_none_or_large() -> None:
    examples = [Example(i, str(i), None, i % 2) for i in range(10)]
    assert subset(examples, None, 0) is examples
    assert subset(examples, 10, 0) is examples
    assert len(subset(examples, 4, 0)) == 4
