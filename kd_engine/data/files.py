"""Reading CSV and JSONL transfer sets from local files."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

MAX_ROWS = 5_000_000


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read a ``.csv`` (header row) or ``.jsonl`` (one object per line) file.

    Raises:
        ValueError: unknown extension, a malformed line (with its number), or too many rows.
    """
    suffix = path.suffix.lower()
    rows: list[dict[str, Any]] = []
    if suffix == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f))
    elif suffix in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8") as f:
            for n, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path.name} line {n}: not valid JSON ({e.msg})") from None
                if not isinstance(obj, dict):
                    raise ValueError(f"{path.name} line {n}: expected a JSON object")
                rows.append(obj)
    else:
        raise ValueError(f"{path.name}: unsupported file type {suffix!r} (use .csv or .jsonl)")
    if len(rows) > MAX_ROWS:
        raise ValueError(f"{path.name}: more than {MAX_ROWS} rows")
    return rows


def column(rows: list[dict[str, Any]], name: str, source: str) -> list[Any]:
    """Values of column ``name``.

    Raises:
        ValueError: the column is missing or holds an empty value (with the row number).
    """
    if not rows:
        raise ValueError(f"{source}: no rows")
    if name not in rows[0]:
        raise ValueError(
            f"{source}: no column {name!r}; columns are {', '.join(map(repr, rows[0]))}"
        )
    out = []
    for i, r in enumerate(rows):
        v = r.get(name)
        if v is None or (isinstance(v, str) and not v.strip()):
            raise ValueError(f"{source}: row {i + 1} has no value in column {name!r}")
        out.append(v)
    return out


def label_order(values: list[str]) -> list[str]:
    """Sorted distinct label names; numerically when every label is an integer."""
    distinct = set(values)
    try:
        return sorted(distinct, key=int)
    except ValueError:
        return sorted(distinct)
