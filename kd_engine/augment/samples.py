"""The augmented-samples artifact: the method's (original, augmented) pairs decoded to text, so a
user can read what the student was trained on (MATE-KD's Table 6 shows such pairs)."""

from __future__ import annotations

import json
from collections import deque
from pathlib import Path

from transformers import PreTrainedTokenizerBase

SAMPLES_FILE = "augmented_samples.jsonl"
SAMPLES_KEPT = 32
"""Records an augmentation method keeps from the start, and from the end, of training."""


class SampleKeeper:
    """The first ``kept`` records offered and the last ``kept`` after them (so the artifact
    shows both the early and the final augmentations), in memory bounded by 2 * ``kept``."""

    def __init__(self, kept: int = SAMPLES_KEPT) -> None:
        self.kept = kept
        self._first: list[dict[str, object]] = []
        self._last: deque[dict[str, object]] = deque(maxlen=kept)

    def offer(self, record: dict[str, object]) -> None:
        """Keep ``record`` if it is among the first or (so far) the last ``kept``."""
        if len(self._first) < self.kept:
            self._first.append(record)
        else:
            self._last.append(record)

    def state(self) -> dict[str, object]:
        """The kept records (for a checkpoint)."""
        return {"first": list(self._first), "last": list(self._last)}

    def load_state(self, state: dict[str, object]) -> None:
        """Restore what :meth:`state` returned."""
        self._first = list(state["first"])  # type: ignore[call-overload]
        self._last = deque(state["last"], maxlen=self.kept)  # type: ignore[call-overload]

    def records(self) -> list[dict[str, object]]:
        """The kept records, first ones first."""
        return [*self._first, *self._last]


def decode_samples(
    records: list[dict[str, object]], tokenizer: PreTrainedTokenizerBase
) -> list[dict[str, object]]:
    """Each record with ``original`` and ``augmented`` decoded to text (special tokens dropped)
    and, when it lists ``replaced`` positions, ``changes``: the token at each such position
    before and after (``{"position", "from", "to"}``). Other keys are kept as they are."""
    out = []
    for r in records:
        original = [int(i) for i in r["original"]]  # type: ignore[attr-defined]
        augmented = [int(i) for i in r["augmented"]]  # type: ignore[attr-defined]
        decoded: dict[str, object] = {
            **{k: v for k, v in r.items() if k not in ("original", "augmented", "replaced")},
            "original": tokenizer.decode(original, skip_special_tokens=True),
            "augmented": tokenizer.decode(augmented, skip_special_tokens=True),
        }
        replaced = r.get("replaced")
        if isinstance(replaced, list):
            before = tokenizer.convert_ids_to_tokens([original[p] for p in replaced])
            after = tokenizer.convert_ids_to_tokens([augmented[p] for p in replaced])
            decoded["changes"] = [
                {"position": p, "from": b, "to": a}
                for p, b, a in zip(replaced, before, after, strict=True)
            ]
        out.append(decoded)
    return out


def write_samples(path: Path, samples: list[dict[str, object]]) -> Path:
    """Write ``samples`` as JSON lines (UTF-8) to ``path``; returns it."""
    with path.open("w", encoding="utf-8") as f:
        for s in samples:
            f.write(json.dumps(s, ensure_ascii=False) + "\n")
    return path
