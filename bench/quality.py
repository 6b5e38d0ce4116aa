"""Quality benchmark: every method x seeds x datasets x students, same teacher and budget.

    .venv/bin/python -m bench.quality run      # trains (resumable: finished runs are skipped)
    .venv/bin/python -m bench.quality report   # table + plot into docs/

Runs go through :func:`kd_engine.run.run_job` in this process (the engine is what is measured;
the API path is covered by the end-to-end tests). One teacher per dataset (a ``finetune`` of
all-MiniLM-L6-v2) is trained once and reused. Results are appended to ``results.jsonl`` in the
output directory, one JSON object per run.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Annotated, Any

import transformers
import typer

from kd_engine import registry
from kd_engine.references import builtin_model_path
from kd_engine.run import run_job
from kd_engine.spec import JobSpec

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "var" / "bench" / "quality"
STUDENTS: dict[str, dict[str, Any]] = {
    "layers2": {"type": "from_teacher", "num_layers": 2},
    "minilm-l3": {"type": "pretrained", "model": "builtin:minilm-l3"},
    # The papers' initialisation (PKD, ALP-KD, RAIL-KD): the first k layers of the pre-trained
    # (not fine-tuned) encoder the teacher was fine-tuned from, with a new head.
    "pt-l2": {"type": "pretrained", "model": "builtin:minilm-l6", "num_layers": 2},
    # born_again's generations have the teacher's architecture: the pre-trained encoder whole.
    "pt-full": {"type": "pretrained", "model": "builtin:minilm-l6"},
}
STUDENT_CHECKPOINTS = {"minilm-l3": "minilm-l3", "pt-l2": "minilm-l6", "pt-full": "minilm-l6"}
SAME_ARCHITECTURE_METHODS = {"born_again": "pt-full"}
MAX_SEQ_LENGTH = 64  # tokens, for every run and for the latency timings
app = typer.Typer(add_completion=False)


def _no_files(ref: str) -> Path:
    raise ValueError(f"the benchmark uses built-in datasets only, not {ref!r}")


def _dataset(
    name: str,
    train_examples: int | None,
    eval_sets: list[str] | None = None,
    eval_examples: int | None = None,
) -> dict[str, Any]:
    ds: dict[str, Any] = {"source": f"builtin:{name}"}
    if train_examples:
        ds["max_train_examples"] = train_examples
    if eval_examples:
        ds["max_eval_examples"] = eval_examples
    if eval_sets:
        ds["eval_sets"] = [{"name": e, "source": f"builtin:{e}"} for e in eval_sets]
    return ds


def _teacher(teachers: Path, dataset: str, epochs: int, examples: int | None = None) -> Path:
    """The dataset's teacher: all-MiniLM-L6-v2 fine-tuned on the full train split (or a
    seeded subset of ``examples``)."""
    path = teachers / dataset
    if (path / "model.safetensors").is_file():
        return path
    spec = JobSpec.model_validate(
        {
            "teacher": "builtin:minilm-l6",
            "method": {"name": "finetune"},
            "dataset": _dataset(dataset, examples),
            "training": {"epochs": epochs, "max_seq_length": MAX_SEQ_LENGTH, "seed": 0},
        }
    )
    run_job(spec, builtin_model_path("minilm-l6"), _no_files, path)
    return path


def _method(label: str) -> tuple[dict[str, Any], str]:
    """``name`` or ``name:{json settings}`` -> (the spec's method object, a file-safe slug).

    Raises:
        typer.BadParameter: the settings are not a JSON object.
    """
    name, _, settings = label.partition(":")
    extra = json.loads(settings) if settings else {}
    if not isinstance(extra, dict):
        raise typer.BadParameter(f"{label!r}: settings after ':' must be a JSON object")
    slug = name + "".join(f"_{k}={v}" for k, v in sorted(extra.items()))
    return {"name": name, **extra}, slug.replace("/", "_").replace(" ", "")


def _done(results: Path) -> set[tuple[str, str, str, int]]:
    if not results.is_file():
        return set()
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {(r["dataset"], r["student"], r["method"], r["seed"]) for r in rows}


@app.command()
def run(
    out: Annotated[Path, typer.Option(help="Results and teachers.")] = OUT,
    teachers: Annotated[
        Path | None, typer.Option(help="Teachers' directory (default: OUT/teachers).")
    ] = None,
    datasets: Annotated[list[str] | None, typer.Option()] = None,
    students: Annotated[list[str] | None, typer.Option()] = None,
    methods: Annotated[
        list[str] | None,
        typer.Option(help='A name, or name:{"setting": value} for non-default settings.'),
    ] = None,
    seeds: Annotated[list[int] | None, typer.Option()] = None,
    train_examples: Annotated[
        int | None, typer.Option(help="Students' train subset (all if unset).")
    ] = None,
    eval_examples: Annotated[
        int | None, typer.Option(help="Cap on dev, test and each eval set (all if unset).")
    ] = None,
    epochs: Annotated[int, typer.Option(help="Epochs of one-stage methods.")] = 2,
    learning_rate: Annotated[float, typer.Option(help="LR of one-stage methods.")] = 1e-4,
    eval_sets: Annotated[
        list[str] | None,
        typer.Option("--eval-set", help="Built-in labelled set evaluated at the end (OOD)."),
    ] = None,
    teacher_epochs: int = 2,
    teacher_examples: Annotated[
        int | None, typer.Option(help="Teacher's train subset (the full split if unset).")
    ] = None,
    training: Annotated[
        str | None,
        typer.Option(
            help="Extra training settings for every run, a JSON object (e.g. "
            '\'{"group_by_length": true}\'); the rows\' method label gets " training:<json>".'
        ),
    ] = None,
) -> None:
    """Train every (dataset, student, method, seed) not yet in results.jsonl.

    One-stage methods train ``epochs`` at ``learning_rate``; multi-stage methods (tinybert,
    universal_kd, annealing_kd, ...) run their own recipe's stages (lengths and LRs are their
    settings' defaults unless ``--methods name:{json}`` overrides them).
    """
    transformers.logging.set_verbosity_error()
    extra = json.loads(training) if training else {}
    if not isinstance(extra, dict):
        raise typer.BadParameter(f"{training!r}: --training must be a JSON object")
    suffix = f" training:{json.dumps(extra, sort_keys=True)}" if extra else ""
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = _done(results)
    cache = out / "cache"
    for dataset in datasets or ["rotten_tomatoes", "trec6"]:
        teacher = _teacher(teachers or out / "teachers", dataset, teacher_epochs, teacher_examples)
        for asked in students or ["layers2", "minilm-l3"]:
            for method in methods or registry.names():
                student = SAME_ARCHITECTURE_METHODS.get(_method(method)[0]["name"], asked)
                for seed in seeds or [0, 1, 2]:
                    if (dataset, student, method + suffix, seed) in done:
                        continue
                    spec = JobSpec.model_validate(
                        {
                            "teacher": "job:teacher",
                            "student": STUDENTS[student],
                            "method": _method(method)[0],
                            "dataset": _dataset(dataset, train_examples, eval_sets, eval_examples),
                            "training": {
                                "epochs": epochs,
                                "max_seq_length": MAX_SEQ_LENGTH,
                                "seed": seed,
                                "learning_rate": learning_rate,
                                "device": "cpu",
                                **extra,
                            },
                        }
                    )
                    checkpoint = STUDENT_CHECKPOINTS.get(student)
                    student_path = builtin_model_path(checkpoint, cache) if checkpoint else None
                    tag = "".join(f"-{k}={v}" for k, v in sorted(extra.items()))
                    run_dir = out / "runs" / f"{dataset}-{student}-{_method(method)[1]}{tag}-{seed}"
                    m = run_job(
                        spec, teacher, _no_files, run_dir, student_path=student_path
                    ).metrics
                    row = {
                        "dataset": dataset,
                        "student": student,
                        "method": method + suffix,
                        "seed": seed,
                        "accuracy": m["test"]["accuracy"],
                        "macro_f1": m["test"]["macro_f1"],
                        "train_seconds": m["train_seconds"],
                        "steps": sum(st["steps"] for st in m.get("stages", [])),
                        "eval_sets": {
                            name: {
                                "accuracy": e["student"]["accuracy"],
                                "teacher_accuracy": e.get("teacher", {}).get("accuracy"),
                            }
                            for name, e in m.get("eval_sets", {}).items()
                        },
                        "latency_s_batch1": m["student"]["latency_s_batch1"],
                        "teacher_accuracy": m["teacher_test"]["accuracy"]
                        if "teacher_test" in m
                        else None,
                        "train_examples": m["data"]["train"],
                        "epochs": epochs,
                        "learning_rate": learning_rate,
                    }
                    with results.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    typer.echo(json.dumps(row))


@app.command()
def latency(
    out: Annotated[Path, typer.Option()] = OUT,
    teachers: Annotated[
        Path | None, typer.Option(help="Teachers' directory (default: OUT/teachers).")
    ] = None,
    threads: Annotated[int, typer.Option(help="torch threads while timing.")] = 2,
) -> None:
    """Time the teachers and one student per (dataset, student) again, on an idle machine.

    The runs' own latencies were taken while other runs shared the CPU; these replace them in
    the plot (``latency.json``: seconds per example at batch 1, median of 20 batches).
    """
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kd_engine.data import load_transfer_set
    from kd_engine.data.batching import encode
    from kd_engine.evaluation import latency_per_example
    from kd_engine.spec import DatasetSpec

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(threads)
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
    timed: dict[str, float] = {}
    for dataset in sorted({r["dataset"] for r in rows}):
        data = load_transfer_set(DatasetSpec(source=f"builtin:{dataset}"), _no_files)
        models = {"teacher": (teachers or out / "teachers") / dataset}
        for student in sorted({r["student"] for r in rows if r["dataset"] == dataset}):
            models[student] = out / "runs" / f"{dataset}-{student}-vanilla_kd-0"
        for who, path in models.items():
            tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForSequenceClassification.from_pretrained(path)
            test = encode(data.test, tokenizer, MAX_SEQ_LENGTH)
            pad = int(tokenizer.pad_token_id or 0)
            timed[f"{dataset}/{who}"] = latency_per_example(
                model, test, 1, pad, torch.device("cpu")
            )
            typer.echo(f"{dataset}/{who}: {1000 * timed[f'{dataset}/{who}']:.2f} ms/example")
    (out / "latency.json").write_text(json.dumps(timed, indent=1) + "\n")


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _seconds(row: dict[str, Any]) -> float:
    """Training seconds of a run (older rows kept seconds per epoch)."""
    if "train_seconds" in row:
        return float(row["train_seconds"])
    return float(row["seconds_per_epoch"]) * int(row["epochs"])


def _table(rows: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["student"], r["method"])].append(r)
    base = {
        (d, s): statistics.mean(_seconds(r) for r in g)
        for (d, s, m), g in groups.items()
        if m == "vanilla_kd"
    }
    eval_names = sorted({e for r in rows for e in r.get("eval_sets", {})})
    head = "| dataset | student | method | seeds | accuracy | macro-F1 |"
    head += "".join(f" {e} acc. |" for e in eval_names) + " train time vs vanilla_kd |"
    lines = [head, "|" + "---|" * (7 + len(eval_names))]
    for (d, s, m), g in sorted(groups.items()):
        acc = [r["accuracy"] for r in g]
        f1 = [r["macro_f1"] for r in g]
        t = statistics.mean(_seconds(r) for r in g)
        rel = f"{t / base[(d, s)]:.2f}x" if (d, s) in base else "-"
        cells = ""
        for e in eval_names:
            vals = [r["eval_sets"][e]["accuracy"] for r in g if e in r.get("eval_sets", {})]
            cells += f" {statistics.mean(vals):.4f} ± {_sd(vals):.4f} |" if vals else " - |"
        lines.append(
            f"| {d} | {s} | {m} | {len(g)} | {statistics.mean(acc):.4f} ± {_sd(acc):.4f} "
            f"| {statistics.mean(f1):.4f} ± {_sd(f1):.4f} |{cells} {rel} |"
        )
    teachers = {
        (r["dataset"], e): r["eval_sets"][e]["teacher_accuracy"]
        for r in rows
        for e in r.get("eval_sets", {})
        if r["eval_sets"][e].get("teacher_accuracy") is not None
    }
    for (d, e), acc_t in sorted(teachers.items()):
        lines.append(f"\nTeacher on {e} ({d} teacher): accuracy {acc_t:.4f}.")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path, timed: dict[str, float]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = sorted({r["dataset"] for r in rows})
    fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets, strict=True):
        groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            if r["dataset"] == dataset:
                groups[(r["student"], r["method"])].append(r)
        for (student, method), g in sorted(groups.items()):
            seconds = timed.get(f"{dataset}/{student}")
            if seconds is None:
                seconds = statistics.mean(r["latency_s_batch1"] for r in g)
            x = 1000 * seconds
            y = statistics.mean(r["accuracy"] for r in g)
            ax.scatter(x, y, marker="o" if student == "layers2" else "^")
            label = method.split(":")[0] + ("*" if ":" in method else "")
            ax.annotate(f"{label} ({student})", (x, y), fontsize=7)
        teacher_acc = [r["teacher_accuracy"] for r in rows if r["dataset"] == dataset]
        known = [a for a in teacher_acc if a is not None]
        if f"{dataset}/teacher" in timed and known:
            x, y = 1000 * timed[f"{dataset}/teacher"], known[0]
            ax.scatter(x, y, marker="*", s=120, color="black")
            ax.annotate("teacher (MiniLM-L6)", (x, y), fontsize=7)
        ax.set_title(dataset)
        ax.set_xlabel("student CPU latency, ms/example at batch 1")
        ax.set_ylabel("test accuracy (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


@app.command()
def report(
    out: Annotated[Path, typer.Option()] = OUT,
    section: Annotated[
        str, typer.Option(help="Name of the marked block in docs/benchmarks.md.")
    ] = "quality-benchmark",
    plot: Annotated[str, typer.Option(help="PNG name under docs/.")] = "quality_vs_latency.png",
) -> None:
    """Write the table into docs/benchmarks.md (between markers) and the plot to docs/."""
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines() if x.strip()]
    timed_file = out / "latency.json"
    timed = json.loads(timed_file.read_text()) if timed_file.is_file() else {}
    _plot(rows, ROOT / "docs" / plot, timed)
    table = _table(rows)
    typer.echo(table)
    doc = ROOT / "docs" / "benchmarks.md"
    text = doc.read_text(encoding="utf-8")
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    block = f"{begin}\n{table}\n\n![accuracy vs latency]({plot})\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    app()
