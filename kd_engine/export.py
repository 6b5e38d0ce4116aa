"""Writing the student as a transformers directory (safetensors) with its tokenizer."""

from __future__ import annotations

import json
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


def write_json(path: Path, data: object) -> None:
    """Write ``data`` as indented JSON (UTF-8)."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
