"""Writing the student as a transformers directory (safetensors) with its tokenizer."""

from __future__ import annotations

import json
import shutil
import tarfile
import tempfile
from pathlib import Path

from transformers import PreTrainedModel, PreTrainedTokenizerBase


def save_student(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path
) -> list[Path]:
    """Save ``config.json``, ``model.safetensors`` and tokenizer files into ``out_dir``.

    The result loads with ``AutoModelForSequenceClassification.from_pretrained(out_dir)`` (a
    BiLSTM or CNN student in a process that has imported ``kd_engine.models``, which registers
    their model types with transformers). Returns the files written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model.to("cpu")  # type: ignore[arg-type]
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return sorted(p for p in out_dir.iterdir() if p.is_file())


FILE_MODE = 0o644
DIR_MODE = 0o755


def readable_member(member: tarfile.TarInfo) -> tarfile.TarInfo:
    """A ``tarfile`` add filter: files 0644, folders 0755, owned by uid/gid 0 with no names,
    so that an archive extracts readable by everyone whatever mode its files were written
    with."""
    member.mode = DIR_MODE if member.isdir() else FILE_MODE
    member.uid = member.gid = 0
    member.uname = member.gname = ""
    return member


def save_archive(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, out_dir: Path, name: str
) -> Path:
    """Save a model as ONE file, ``out_dir/<name>.tar.gz``: a gzipped tar of the directory
    ``<name>/`` that :func:`save_student` writes (config.json, model.safetensors, tokenizer).

    One regular file per model, so it is a job artifact like any other (the worker records the
    files directly in the output directory). Unpacked, ``<name>/`` loads with
    ``AutoModelForSequenceClassification.from_pretrained``. Returns the archive's path.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    archive = out_dir / f"{name}.tar.gz"
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=f".{name}-") as tmp:
        model_dir = Path(tmp) / name
        save_student(model, tokenizer, model_dir)
        partial = Path(tmp) / archive.name
        with tarfile.open(partial, mode="w:gz") as tar:
            tar.add(model_dir, arcname=name, filter=readable_member)
        shutil.move(partial, archive)
    return archive


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as indented JSON (UTF-8)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
