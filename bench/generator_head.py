"""The MATE-KD generator's vocabulary logits at the masked positions: the MLM head over every
position (then the masked rows kept) against the head over the masked rows only
(:func:`kd_engine.augment.generator.masked_logits`), side by side, interleaved, in one process.

    .venv/bin/python -m bench.generator_head

Run by hand, never in CI. The generator is built from all-MiniLM-L6-v2 (its 6 layers, as
MATE-KD builds it by default), batches of 32 Rotten Tomatoes training reviews at max length 64,
30% of the real non-special tokens masked (MATE-KD's default p), one torch thread; 12 batches,
the first 2 untimed.
"""

from __future__ import annotations

import time

import torch

from kd_engine.augment.generator import generator_from_teacher, generator_logits, masked_logits
from kd_engine.augment.masking import choose_positions
from kd_engine.data.batching import collate, encode
from kd_engine.data.builtins import load_builtin
from kd_engine.models.loading import load_classifier, load_tokenizer
from kd_engine.references import builtin_model_path

BATCHES, WARMUP, BATCH, MAX_LEN = 12, 2, 32, 64


def main() -> None:
    """Print the padded and masked tokens per batch and both timings (ms per batch)."""
    torch.set_num_threads(1)
    path = builtin_model_path("minilm-l6")
    tokenizer = load_tokenizer(path)
    data = load_builtin("rotten_tomatoes")
    enc = encode(data.train[: BATCH * BATCHES], tokenizer, MAX_LEN)
    generator = generator_from_teacher(load_classifier(path, data.label_names)).eval()
    batches = [collate(enc, list(range(i * BATCH, (i + 1) * BATCH)), 0) for i in range(BATCHES)]
    specials = tokenizer.all_special_ids
    positions = [
        choose_positions(
            b["input_ids"], b["attention_mask"], specials, 0.3, torch.Generator().manual_seed(i)
        )
        for i, b in enumerate(batches)
    ]
    seconds = {"full": 0.0, "masked": 0.0}
    with torch.no_grad():
        for i, (b, p) in enumerate(zip(batches, positions, strict=True)):
            ids, mask, types = b["input_ids"], b["attention_mask"], b["token_type_ids"]
            for name in ("full", "masked") if i % 2 else ("masked", "full"):
                started = time.perf_counter()
                if name == "full":
                    generator_logits(generator, ids, mask, types)[p]
                else:
                    masked_logits(generator, ids, mask, p, types)
                if i >= WARMUP:
                    seconds[name] += time.perf_counter() - started
    n = BATCHES - WARMUP
    padded = sum(int(b["attention_mask"].numel()) for b in batches[WARMUP:]) / n
    masked = sum(int(p.sum()) for p in positions[WARMUP:]) / n
    full_ms, rows_ms = 1000 * seconds["full"] / n, 1000 * seconds["masked"] / n
    print(f"batch {BATCH}: {padded:.0f} padded tokens, {masked:.0f} masked, a batch")
    print(f"head over every position: {full_ms:.0f} ms a batch")
    print(f"head over the masked rows: {rows_ms:.0f} ms a batch ({full_ms / rows_ms:.2f}x)")


if __name__ == "__main__":
    main()
