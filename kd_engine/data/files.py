"""Reading dataset files (CSV, JSONL, Parquet): the one reader behind training
(:func:`read_rows`) and inspection (:mod:`kd_engine.data.inspect`), so the two cannot disagree.

What the reader accepts:

- ``.csv``: a header row, then one row per record (quoted cells may span lines); ``.jsonl`` /
  ``.ndjson``: one JSON object per line; ``.parquet``: any Parquet file (needs ``pyarrow``).
- Text is UTF-8; a UTF-8 byte-order mark at the start is stripped (Excel writes one), so a CSV
  whose header starts with ``\\ufeff`` works. Anything else is refused naming the line and the
  byte: a UTF-16 file, a Latin-1 byte.
- A cell (CSV field, JSON or Parquet string value) holds at most :data:`MAX_CELL_CHARS`
  characters, a physical line at most :data:`MAX_LINE_BYTES` bytes, a file at most
  :data:`MAX_ROWS` rows. Blank lines are skipped.
- A CSV row must have as many fields as the header (a row with more usually has an unquoted
  comma in its text, which would silently cut the text).

Row numbers: the reader numbers data rows 0, 1, 2, ... in file order (header and blank lines
not counted, nor CSV rows whose cells are all empty); this is the ``id`` of a file's examples
and the row number of the split artifact.
Messages name the physical line (``line N``, 1-based, as an editor shows it; for Parquet
``row N``, 1-based).
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Literal

MAX_ROWS = 5_000_000
MAX_CELL_CHARS = 1 << 20
"""1,048,576 characters per cell (CSV field or string value); a 1 MB text fits."""
MAX_LINE_BYTES = 16 << 20
MAX_JSON_DEPTH = 32
"""Deepest nesting of arrays and objects in one JSONL row (the row's own object is level 1); a
deeper line is refused by name rather than risk a ``RecursionError`` in whatever reads it."""
"""16 MiB per physical line of a CSV or JSONL file (several cells at the cap still fit)."""
FORMATS: dict[str, Literal["csv", "jsonl", "parquet"]] = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".parquet": "parquet",
}
Format = Literal["csv", "jsonl", "parquet"]
Encoding = Literal["utf-8", "utf-8-sig"]
_BOM = b"\xef\xbb\xbf"
_PARQUET_BATCH_ROWS = 4096


def file_format(path: Path, name: str | None = None) -> Format:
    """The format of a dataset file from its suffix (case-insensitive).

    Raises:
        ValueError: an unsupported suffix (the message lists the supported ones).
    """
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{name or path.name}: unsupported file type {path.suffix.lower()!r} "
            "(use .csv, .jsonl or .parquet)"
        )
    return fmt


def _cell_error(name: str, where: str, column: object = None) -> ValueError:
    in_column = f" (column {column!r})" if column is not None else ""
    return ValueError(
        f"{name}: {where} has a cell over {MAX_CELL_CHARS:,} characters{in_column}; "
        f"a cell may hold at most {MAX_CELL_CHARS:,} characters (1 MiB)"
    )


def _nesting_over(value: object, limit: int) -> bool:
    """Whether ``value`` (parsed JSON) nests lists and dicts more than ``limit`` levels deep
    (iterative: no recursion on hostile input)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


_TOO_DEEP = object()


class RowStream:
    """The rows of one dataset file, read once from front to back (a file is never loaded
    whole: memory is one line, or one Parquet batch, at a time).

    Iterating yields ``(line, row)``: ``line`` is the 1-based physical line where the record
    starts (Parquet: the 1-based row number) and ``row`` maps column names to values (strings
    for CSV; JSON / Parquet values as they are). After the first row (or, for CSV, the header)
    has been read, ``columns`` holds the column names (JSONL: the first object's keys) and
    ``encoding`` whether a byte-order mark was stripped. ``where(line)`` words a location for
    messages (``line 7`` / ``row 7``).

    Raises (while iterating):
        ValueError: a file problem, the message starting with the file's name and naming the
            line: not UTF-8, UTF-16, malformed CSV or JSON (or JSON nested past Python's
            recursion limit), a row of the wrong width, a cell
            over :data:`MAX_CELL_CHARS`, a line over :data:`MAX_LINE_BYTES`, more than
            :data:`MAX_ROWS` rows, an unreadable Parquet file or a missing ``pyarrow``.
        OSError: the file cannot be opened.
    """

    def __init__(self, path: Path, name: str | None = None) -> None:
        self.path = path
        self.name = name or path.name
        self.format: Format = file_format(path, self.name)
        self.encoding: Encoding = "utf-8"
        self.columns: list[str] = []
        self.rows = 0

    def where(self, line: int) -> str:
        """``line N`` (``row N`` for Parquet)."""
        return f"{'row' if self.format == 'parquet' else 'line'} {line}"

    def __iter__(self) -> Iterator[tuple[int, dict[str, Any]]]:
        readers = {"csv": self._csv, "jsonl": self._jsonl, "parquet": self._parquet}
        for line, row in readers[self.format]():
            self.rows += 1
            if self.rows > MAX_ROWS:
                raise ValueError(f"{self.name}: more than {MAX_ROWS:,} rows")
            yield line, row

    def _lines(self, f: IO[bytes]) -> Iterator[str]:
        """Decoded physical lines (with their line ends), the BOM of line 1 stripped."""
        n = 0
        while True:
            raw = f.readline(MAX_LINE_BYTES + 1)
            if not raw:
                return
            n += 1
            if len(raw) > MAX_LINE_BYTES:
                raise ValueError(
                    f"{self.name}: line {n} is longer than {MAX_LINE_BYTES >> 20} MiB "
                    f"(a cell may hold at most {MAX_CELL_CHARS:,} characters)"
                )
            if n == 1:
                if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
                    raise ValueError(
                        f"{self.name} is UTF-16 (it starts with a UTF-16 byte-order mark); "
                        "save the file as UTF-8"
                    )
                if raw.startswith(_BOM):
                    raw = raw[len(_BOM) :]
                    self.encoding = "utf-8-sig"
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as e:
                column = len(raw[: e.start].decode("utf-8", errors="replace")) + 1
                raise ValueError(
                    f"{self.name}: line {n} is not UTF-8 (byte 0x{raw[e.start]:02x} at column "
                    f"{column}); save the file as UTF-8"
                ) from None

    def _csv(self) -> Iterator[tuple[int, dict[str, Any]]]:
        csv.field_size_limit(MAX_CELL_CHARS)
        with self.path.open("rb") as f:
            reader = csv.reader(self._lines(f))
            header: list[str] | None = None
            done = 0  # physical lines consumed before the current record
            while True:
                try:
                    record = next(reader)
                except StopIteration:
                    return
                except csv.Error as e:
                    line = reader.line_num
                    if "field limit" in str(e):
                        raise _cell_error(self.name, f"line {line}") from None
                    raise ValueError(f"{self.name}: line {line} is not valid CSV ({e})") from None
                start, done = done + 1, reader.line_num
                if not any(cell.strip() for cell in record):
                    continue  # a blank line (or one of empty cells only)
                if header is None:
                    header = record
                    seen: set[str] = set()
                    for col in header:
                        if col in seen:
                            raise ValueError(
                                f"{self.name}: the header (line {start}) names column {col!r} twice"
                            )
                        seen.add(col)
                    self.columns = list(header)
                    continue
                if len(record) != len(header):
                    hint = " (quote cells that contain commas)" if len(record) > len(header) else ""
                    fields = f"{len(record)} field{'s' if len(record) != 1 else ''}"
                    raise ValueError(
                        f"{self.name}: line {start} has {fields} and the header "
                        f"has {len(header)}{hint}"
                    )
                yield start, dict(zip(header, record, strict=True))

    def _checked(self, row: dict[str, Any], where: str) -> dict[str, Any]:
        for key, value in row.items():
            if isinstance(value, str) and len(value) > MAX_CELL_CHARS:
                raise _cell_error(self.name, where, key)
        return row

    def _jsonl(self) -> Iterator[tuple[int, dict[str, Any]]]:
        with self.path.open("rb") as f:
            for n, line in enumerate(self._lines(f), start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(
                        f"{self.name}: line {n} is not valid JSON ({e.msg} at column {e.colno})"
                    ) from None
                except RecursionError:
                    obj = _TOO_DEEP  # nested past Python's recursion limit
                if obj is _TOO_DEEP or _nesting_over(obj, MAX_JSON_DEPTH):
                    raise ValueError(
                        f"{self.name}: line {n} nests JSON arrays or objects more than "
                        f"{MAX_JSON_DEPTH} levels deep (a row is one JSON object of column values)"
                    )
                if not isinstance(obj, dict):
                    raise ValueError(
                        f"{self.name}: line {n}: expected a JSON object, got {type(obj).__name__}"
                    )
                if not self.columns:
                    self.columns = [str(k) for k in obj]
                yield n, self._checked(obj, f"line {n}")

    def _parquet(self) -> Iterator[tuple[int, dict[str, Any]]]:
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ValueError(
                f"{self.name}: reading Parquet needs the pyarrow package, which this server "
                "does not have; use a .csv or .jsonl file"
            ) from None
        try:
            pf = pq.ParquetFile(self.path)
            self.columns = list(pf.schema_arrow.names)
            n = 0
            for batch in pf.iter_batches(batch_size=_PARQUET_BATCH_ROWS):
                for row in batch.to_pylist():
                    n += 1
                    yield n, self._checked(row, f"row {n}")
        except (ValueError, OSError) as e:
            if str(e).startswith(f"{self.name}:"):
                raise
            raise ValueError(f"{self.name}: not a readable Parquet file ({e})") from None


def read_rows(path: Path, name: str | None = None) -> list[dict[str, Any]]:
    """All rows of a ``.csv``, ``.jsonl`` or ``.parquet`` file (see :class:`RowStream`); row i
    of the list is data row i of the file.

    Raises:
        ValueError: unknown extension or a file problem (with its line), or too many rows.
        OSError: the file cannot be opened.
    """
    return [row for _, row in RowStream(path, name)]


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
