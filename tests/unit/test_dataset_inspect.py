"""Inspecting dataset files: what a report holds, and each way a file is refused (the field,
the file and the line or column named)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from kd_engine.data.files import MAX_CELL_CHARS, read_rows
from kd_engine.data.inspect import DatasetFields, inspect_dataset
from kd_engine.errors import SpecError


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.write_bytes(text.encode(encoding))
    return path


def refused(path: Path, **kwargs: object) -> SpecError:
    with pytest.raises(SpecError) as info:
        inspect_dataset(path, **kwargs)  # type: ignore[arg-type]
    return info.value


def test_csv_with_a_bom_is_read_and_reported(tmp_path: Path) -> None:
    path = write(tmp_path / "tweets.csv", "\ufefftext,label\nhello there,pos\nbad,neg\nok,pos\n")
    report = inspect_dataset(path)
    assert report.encoding == "utf-8-sig"
    assert report.format == "csv"
    assert report.columns == ["text", "label"]  # no "\ufefftext"
    assert report.rows == 3
    assert report.task == "classification"
    assert report.labels == {"neg": 1, "pos": 2}
    assert report.label_stats is None
    assert report.text_length.model_dump() == {"min": 2, "p50": 3, "p95": 11, "max": 11}
    assert report.size_bytes == path.stat().st_size
    assert json.loads(report.model_dump_json())["labels"] == {"neg": 1, "pos": 2}
    # The training reader sees the same columns.
    assert list(read_rows(path)[0]) == ["text", "label"]


def test_plain_utf8_and_numeric_label_order(tmp_path: Path) -> None:
    rows = "".join(f"t{i},{i % 11}\n" for i in range(33))
    report = inspect_dataset(write(tmp_path / "n.csv", "text,label\n" + rows))
    assert report.encoding == "utf-8"
    assert list(report.labels or {}) == [str(i) for i in range(11)]  # 2 before 10


def test_jsonl_with_a_bom_and_blank_lines(tmp_path: Path) -> None:
    lines = ['{"text": "a b", "label": 1.5}', "", '{"text": "c", "label": -2}', "   "]
    report = inspect_dataset(write(tmp_path / "s.jsonl", "\ufeff" + "\n".join(lines) + "\n"))
    assert report.format == "jsonl" and report.encoding == "utf-8-sig"
    assert report.rows == 2
    assert report.task == "regression"  # auto: numbers, one not an integer
    assert report.labels is None
    assert report.label_stats is not None
    assert (report.label_stats.min, report.label_stats.max) == (-2.0, 1.5)
    assert report.label_stats.mean == pytest.approx(-0.25)


def test_parquet(tmp_path: Path) -> None:
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    table = pa.table({"sentence": ["x" * 5, "yy", "zzz"], "y": ["a", "b", "a"], "n": [1, 2, 3]})
    pq.write_table(table, tmp_path / "d.parquet")
    report = inspect_dataset(tmp_path / "d.parquet", "sentence", "y")
    assert report.format == "parquet"
    assert report.columns == ["sentence", "y", "n"]
    assert report.labels == {"a": 2, "b": 1}
    assert report.text_length.max == 5
    pq.write_table(pa.table({"sentence": ["ok", None], "y": ["a", "b"]}), tmp_path / "e.parquet")
    err = refused(tmp_path / "e.parquet", text_column="sentence", label_column="y")
    assert err.field == "dataset.source"
    assert "e.parquet: row 2 has no value in column 'sentence'" in err.reason
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    assert "not a readable Parquet file" in refused(tmp_path / "junk.parquet").reason


def test_a_1_mb_cell_is_accepted_and_a_cell_over_the_cap_names_its_line(tmp_path: Path) -> None:
    big = "word " * 200_000  # 1,000,000 characters
    path = tmp_path / "big.csv"
    with path.open("w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        w.writerows([["short", "a"], [big, "b"], ["also", "a"]])
    report = inspect_dataset(path)
    assert report.rows == 3
    assert report.text_length.max == len(big) == 1_000_000
    assert read_rows(path)[1]["text"] == big
    with path.open("a", encoding="utf-8", newline="") as f:
        csv.writer(f).writerow(["x" * (MAX_CELL_CHARS + 1), "b"])
    err = refused(path)
    assert err.field == "dataset.source"
    assert "big.csv: line 5 has a cell over 1,048,576 characters" in err.reason
    jsonl = tmp_path / "big.jsonl"
    jsonl.write_text(
        json.dumps({"text": "ok", "label": "a"})
        + "\n"
        + json.dumps({"text": "x" * (MAX_CELL_CHARS + 1), "label": "a"})
        + "\n",
        encoding="utf-8",
    )
    err = refused(jsonl)
    assert "line 2 has a cell over 1,048,576 characters (column 'text')" in err.reason


def test_broken_lines_are_named(tmp_path: Path) -> None:
    bad_json = write(tmp_path / "b.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", oops}\n')
    err = refused(bad_json)
    assert err.field == "dataset.source"
    assert err.reason.startswith("b.jsonl: line 3 is not valid JSON")
    not_object = write(tmp_path / "l.jsonl", '{"text": "a", "label": "x"}\n[1, 2]\n')
    assert "l.jsonl: line 2: expected a JSON object, got list" in refused(not_object).reason
    wide = write(tmp_path / "w.csv", "text,label\ngood,pos\nfine, really,pos\n")
    err = refused(wide)
    assert "w.csv: line 3 has 3 fields and the header has 2" in err.reason
    assert "quote cells that contain commas" in err.reason
    # A quoted cell across lines: the next record's line is still its own physical line.
    quoted = write(tmp_path / "q.csv", 'text,label\n"two\nlines",a\nshort\n')
    assert "q.csv: line 4 has 1 field and the header has 2" in refused(quoted).reason
    twice = write(tmp_path / "t.csv", "text,text\na,b\n")
    assert "names column 'text' twice" in refused(twice).reason


@pytest.mark.parametrize("depth", [100_000, 40])
def test_a_deeply_nested_jsonl_line_is_named(tmp_path: Path, depth: int) -> None:
    """100k levels raised RecursionError (a 500 in the API); 40 parses, but more than 32
    levels are refused too, so that nothing reading the row later can hit the limit."""
    nested = "[" * depth + "]" * depth
    path = write(
        tmp_path / "deep.jsonl",
        '{"text": "a", "label": "x"}\n{"text": "b", "label": "y"}\n'
        f'{{"text": "c", "label": "x", "extra": {nested}}}\n',
    )
    err = refused(path)
    assert err.field == "dataset.source"
    assert err.reason.startswith("deep.jsonl: line 3 nests JSON arrays or objects more than 32")
    ok = write(tmp_path / "ok.jsonl", '{"text": "a", "label": "x", "n": [[[1]]]}\n' * 2)
    assert len(read_rows(ok)) == 2


def test_non_utf8_names_the_line_the_byte_and_the_fix(tmp_path: Path) -> None:
    path = write(tmp_path / "latin.csv", "text,label\ncafé,pos\nnaïve,neg\n", encoding="latin-1")
    err = refused(path)
    assert err.field == "dataset.source"
    assert err.reason == (
        "latin.csv: line 2 is not UTF-8 (byte 0xe9 at column 4); save the file as UTF-8"
    )
    utf16 = write(tmp_path / "u16.csv", "text,label\na,b\n", encoding="utf-16")
    assert "u16.csv is UTF-16" in refused(utf16).reason
    with pytest.raises(ValueError, match="line 2 is not UTF-8"):
        read_rows(path)  # the training reader says the same


def test_missing_column_lists_the_columns_and_suggests_the_closest(tmp_path: Path) -> None:
    path = write(tmp_path / "news.csv", "text,category\nA story,sport\n")
    err = refused(path, label_column="categroy")
    assert err.field == "dataset.label_column"
    assert err.reason == (
        "news.csv has no column 'categroy' (did you mean 'category'?); "
        "its columns are 'text', 'category'"
    )
    path = write(tmp_path / "news.csv", "Text,category\nA story,sport\n")
    err = refused(path, label_column="category")
    assert err.field == "dataset.text_column"
    assert "(did you mean 'Text'?)" in err.reason
    fields = DatasetFields(source="file", text_column="text_column", label_column="label_column")
    err = refused(path, label_column="zzz", text_column="Text", fields=fields)
    assert err.field == "label_column"
    assert "did you mean" not in err.reason


def test_empty_files_and_empty_values(tmp_path: Path) -> None:
    assert refused(write(tmp_path / "e.csv", "")).reason == "e.csv is empty"
    assert refused(write(tmp_path / "h.csv", "\ufefftext,label\n\n")).reason == (
        "h.csv has a header but no rows"
    )
    assert refused(write(tmp_path / "e.jsonl", "\n\n")).reason == "e.jsonl is empty"
    err = refused(write(tmp_path / "v.csv", "text,label\na,x\nb, \nc,y\n"))
    assert err.field == "dataset.source"
    assert err.reason == "v.csv: line 3 has no value in column 'label'"
    err = refused(write(tmp_path / "r.csv", "text,label\na,1.5\nb,high\n"), task="regression")
    assert "r.csv: line 3 has label 'high', which is not a finite number" in err.reason
    (tmp_path / "x.txt").write_text("text\n")
    assert "unsupported file type '.txt'" in refused(tmp_path / "x.txt").reason
    assert "cannot be read" in refused(tmp_path / "missing.csv").reason


def test_unlabelled_corpus_pairs_and_a_prefix(tmp_path: Path) -> None:
    rows = "".join(f"q{i},answer {i},{i % 2}\n" for i in range(10))
    path = write(tmp_path / "p.csv", "question,answer,label\n" + rows)
    report = inspect_dataset(path, "question", None, text_pair_column="answer")
    assert report.task is None and report.labels is None and report.rows == 10
    assert report.text_pair_length is not None and report.text_pair_length.max == len("answer 0")
    part = inspect_dataset(path, "question", "label", max_rows=4)
    assert (part.rows, part.complete, part.labels) == (4, False, {"0": 2, "1": 2})
    assert inspect_dataset(path, "question", "label").complete
