"""Samples/s of a vanilla-KD training run with and without the teacher-output cache
(:mod:`kd_engine.teacher_cache`), side by side in one process. Run by hand, not in CI:

    .venv/bin/python -m bench.teacher_cache

The teacher is the built-in MiniLM-L6 (all-MiniLM-L6-v2) with a new, seeded 2-way head (the
cache's saving does not depend on how good the teacher is), the student its layers 0 and 5,
trained 3 epochs with ``vanilla_kd`` (batch 32, max length 64) on the first 640 Rotten Tomatoes
training reviews, dev 64. Both runs start from the same student and seed; the cached one's time
includes building the cache. Prints a markdown table (seconds, samples/s, ratio) and the largest
weight difference between the two students.
"""

from __future__ import annotations

import copy
import time
from typing import Annotated

import torch
import transformers
import typer

from kd_engine.data.batching import encode
from kd_engine.data.builtins import load_builtin
from kd_engine.methods.vanilla_kd import VanillaKD, VanillaKDConfig
from kd_engine.models.loading import load_classifier, load_tokenizer
from kd_engine.models.shapes import shape_from_config
from kd_engine.models.student import student_from_teacher
from kd_engine.references import builtin_model_path
from kd_engine.spec import TrainingSpec
from kd_engine.teacher_cache import build
from kd_engine.trainer import pick_device, train

app = typer.Typer(add_completion=False)


@app.command()
def main(
    examples: Annotated[int, typer.Option(help="Training examples.")] = 640,
    epochs: int = 3,
    batch_size: int = 32,
    max_length: int = 64,
    device: str = "cpu",
) -> None:
    """Train twice (teacher live, then cached) and print the throughput of each."""
    transformers.logging.set_verbosity_error()
    dev_ = pick_device(device)
    path = builtin_model_path("minilm-l6")
    tokenizer = load_tokenizer(path)
    data = load_builtin("rotten_tomatoes")
    names = data.label_names
    train_enc = encode(data.train[:examples], tokenizer, max_length)
    dev_enc = encode(data.dev[:64], tokenizer, max_length)
    torch.manual_seed(0)
    teacher = load_classifier(path, names).eval()
    shape = shape_from_config(teacher.config.to_dict(), len(names))
    first = student_from_teacher(teacher, [0, 5])
    cfg = TrainingSpec(
        epochs=epochs,
        batch_size=batch_size,
        eval_batch_size=64,
        max_seq_length=max_length,
        learning_rate=1e-4,
        seed=42,
        device=device,
    )
    pad = int(tokenizer.pad_token_id or 0)
    rows = []
    students = []
    for cached in (False, True):
        student = copy.deepcopy(first)
        method = VanillaKD(VanillaKDConfig(alpha=0.5, temperature=2.0), shape, shape)
        started = time.perf_counter()
        cache = build("bench", teacher, train_enc, 64, pad, dev_) if cached else None
        built = time.perf_counter() - started
        train(student, teacher, method, train_enc, dev_enc, cfg, pad, dev_, teacher_cache=cache)
        seconds = time.perf_counter() - started
        samples = epochs * len(train_enc)
        rows.append((cached, seconds, built, samples / seconds))
        students.append(student.state_dict())
    print(f"{len(train_enc)} examples x {epochs} epochs, batch {batch_size}, length {max_length}")
    print("| teacher | seconds (incl. cache build) | cache build s | samples/s |")
    print("|---|---|---|---|")
    for cached, seconds, built, rate in rows:
        label = "cached" if cached else "live"
        print(f"| {label} | {seconds:.1f} | {built:.1f} | {rate:.1f} |")
    print(f"ratio cached / live samples/s: {rows[1][3] / rows[0][3]:.2f}")
    a, b = students
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    print(f"max abs weight difference of the two students: {diff:.2e}")


if __name__ == "__main__":
    app()
