"""The split artifact (``split.json``): which rows of which source a job trained, selected
and evaluated on, so that a user can evaluate the student on exactly the test rows.

Format (``format`` 1)::

    {"format": 1,
     "split_seed": 0,
     "splits": {"train": {"source": "file://reviews.csv", "rows": [0, 2, 3, ...]},
                "dev":   {"source": "file://reviews.csv", "rows": [5, ...]},
                "test":  {"source": "file://reviews.csv", "rows": [1, 4, ...]}},
     "eval_sets": {"imdb": {"source": "file://imdb_test.csv", "rows": [0, 1, ...]}}}

``rows`` are sorted data-row numbers of ``source``, from 0 (see
:mod:`kd_engine.data.files`: header and blank lines are not counted), after every split and
subset (``max_train_examples``, ``max_eval_examples``): exactly the examples used. For a
built-in, rows index the built-in's example list (``BUILTIN_DATASETS[name]()``; an eval set:
``load_builtin_eval(name, regression)``). ``split_seed`` is ``dataset.split_seed`` (built-ins
split with their fixed seed 0 first).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kd_engine.data.examples import Example, TransferSet
from kd_engine.data.loading import FILE_ID_BASE
from kd_engine.references import scheme_of
from kd_engine.spec import DatasetSpec

SPLIT_FILE = "split.json"
FORMAT = 1


def _rows(examples: list[Example], base: int) -> list[int]:
    return sorted(e.id - base for e in examples)


def split_manifest(
    spec: DatasetSpec, data: TransferSet, eval_sets: dict[str, list[Example]]
) -> dict[str, Any]:
    """The content of ``split.json`` for a job's loaded data (see the module docstring).

    ``data`` is the job's transfer set as :func:`kd_engine.data.load_transfer_set` returns it
    (relabelling keeps the ids), ``eval_sets`` the sets of
    :func:`kd_engine.data.load_eval_sets`, by name.
    """
    splits: dict[str, dict[str, Any]] = {}
    builtin = scheme_of(spec.source) == "builtin:"
    sources = {"train": spec.source, "dev": spec.dev_source, "test": spec.test_source}
    for split, examples in (("train", data.train), ("dev", data.dev), ("test", data.test)):
        if builtin:
            splits[split] = {"source": spec.source, "rows": _rows(examples, 0)}
            continue
        own = sources[split]
        # A split without its own file was split off the training source.
        source, base = (own, FILE_ID_BASE[split]) if own else (spec.source, 0)
        splits[split] = {"source": source, "rows": _rows(examples, base)}
    by_name = {es.name: es.source for es in spec.eval_sets}
    return {
        "format": FORMAT,
        "split_seed": spec.split_seed,
        "splits": splits,
        "eval_sets": {
            name: {"source": by_name[name], "rows": _rows(examples, 0)}
            for name, examples in eval_sets.items()
        },
    }


def write_split_file(
    out_dir: Path, spec: DatasetSpec, data: TransferSet, eval_sets: dict[str, list[Example]]
) -> Path:
    """Write :func:`split_manifest` to ``out_dir / split.json`` (compact JSON, UTF-8: a list of
    100,000 rows is about 0.7 MB) and return its path."""
    path = out_dir / SPLIT_FILE
    manifest = split_manifest(spec, data, eval_sets)
    path.write_text(json.dumps(manifest, separators=(",", ":")) + "\n", encoding="utf-8")
    return path
