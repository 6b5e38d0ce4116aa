"""split.json: its rows select exactly the examples a job uses, its splits are disjoint and
cover them; re-reading the file with the standard library gives the same texts."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from kd_engine.data import load_eval_sets, load_transfer_set
from kd_engine.data.builtins import BUILTIN_DATASETS
from kd_engine.data.split_artifact import SPLIT_FILE, split_manifest, write_split_file
from kd_engine.references import local_path_under
from kd_engine.spec import DatasetSpec


def plain_csv_rows(path: Path) -> list[dict[str, str]]:
    """The file's data rows as a user would read them: csv.DictReader, BOM stripped, rows of
    empty cells skipped."""
    with path.open(encoding="utf-8-sig", newline="") as f:
        return [r for r in csv.DictReader(f) if any(v.strip() for v in r.values())]


def write_reviews(path: Path, n: int) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        f.write("\ufeff")
        w = csv.writer(f)
        w.writerow(["review", "stars"])
        for i in range(n):
            w.writerow([f"review number {i}, quoted", ["one", "two", "three"][i % 3]])
            if i % 10 == 0:
                f.write("\n")  # blank lines are not rows


def test_test_rows_select_exactly_the_evaluated_examples(tmp_path: Path) -> None:
    write_reviews(tmp_path / "reviews.csv", 120)
    (tmp_path / "ood.jsonl").write_text(
        "".join(json.dumps({"review": f"ood {i}", "stars": "two"}) + "\n" for i in range(9)),
        encoding="utf-8",
    )
    spec = DatasetSpec(
        source="file://reviews.csv",
        text_column="review",
        label_column="stars",
        split_seed=3,
        max_train_examples=60,
        max_eval_examples=7,
        eval_sets=[{"name": "ood", "source": "file://ood.jsonl"}],  # type: ignore[list-item]
    )

    def resolve(ref: str) -> Path:
        return local_path_under(ref, tmp_path)

    data = load_transfer_set(spec, resolve)
    eval_sets = load_eval_sets(spec, resolve, data.label_names, data.regression)
    path = write_split_file(tmp_path, spec, data, eval_sets)
    assert path.name == SPLIT_FILE
    manifest = json.loads(path.read_text(encoding="utf-8"))
    assert manifest["format"] == 1 and manifest["split_seed"] == 3
    splits = manifest["splits"]
    rows = plain_csv_rows(tmp_path / "reviews.csv")
    assert len(rows) == 120
    for name, examples in (("train", data.train), ("dev", data.dev), ("test", data.test)):
        assert splits[name]["source"] == "file://reviews.csv"
        assert splits[name]["rows"] == sorted(splits[name]["rows"])
        chosen = [rows[r] for r in splits[name]["rows"]]
        # Exactly the examples used (texts and labels), no more, no fewer.
        assert sorted(r["review"] for r in chosen) == sorted(e.text for e in examples)
        assert sorted(r["stars"] for r in chosen) == sorted(
            data.label_names[int(e.label)] for e in examples
        )
    used = [set(splits[name]["rows"]) for name in ("train", "dev", "test")]
    assert not used[0] & used[1] and not used[0] & used[2] and not used[1] & used[2]
    assert sum(map(len, used)) == sum(data.sizes().values()) == 60 + 7 + 7
    ood = manifest["eval_sets"]["ood"]
    assert ood["source"] == "file://ood.jsonl" and len(ood["rows"]) == 7
    assert sorted(f"ood {r}" for r in ood["rows"]) == sorted(e.text for e in eval_sets["ood"])


def test_separate_dev_and_test_files_and_builtins(tmp_path: Path) -> None:
    write_reviews(tmp_path / "train.csv", 40)
    write_reviews(tmp_path / "test.csv", 12)
    spec = DatasetSpec(
        source="file://train.csv",
        test_source="file://test.csv",
        text_column="review",
        label_column="stars",
    )
    data = load_transfer_set(spec, lambda ref: local_path_under(ref, tmp_path))
    manifest = split_manifest(spec, data, {})
    test = manifest["splits"]["test"]
    assert test == {"source": "file://test.csv", "rows": list(range(12))}
    rows = plain_csv_rows(tmp_path / "test.csv")
    assert [rows[r]["review"] for r in test["rows"]] == sorted(
        (e.text for e in data.test), key=lambda t: int(t.split()[2].rstrip(","))
    )
    train, dev = manifest["splits"]["train"], manifest["splits"]["dev"]
    assert train["source"] == dev["source"] == "file://train.csv"
    assert sorted(train["rows"] + dev["rows"]) == list(range(40))

    builtin = DatasetSpec(source="builtin:trec6", max_eval_examples=20)
    data = load_transfer_set(builtin, lambda ref: tmp_path)
    manifest = split_manifest(builtin, data, {})
    examples, _ = BUILTIN_DATASETS["trec6"]()
    test = manifest["splits"]["test"]
    assert test["source"] == "builtin:trec6" and len(test["rows"]) == 20
    assert sorted(examples[r].text for r in test["rows"]) == sorted(e.text for e in data.test)
