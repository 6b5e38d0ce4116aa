"""Training throughput of every method against its floor, side by side in one run (issue 11).

    .venv/bin/python -m bench.throughput                       # every method, CPU (+ CUDA)
    .venv/bin/python -m bench.throughput --methods vanilla_kd --steps 20 --devices cpu

Run by hand, never in CI. For each method the job is prepared exactly as a real one
(:func:`kd_engine.run.run_job`: Rotten Tomatoes, all-MiniLM-L6-v2 as the teacher, its layers 0
and 3 as the student, batch 32, max length 64), and when the trainer is about to start (the
first hop of a chain) three things are measured on the method's last stage:

- floor: the teacher forward alone (inference mode, with the hidden states / attentions the
  method asks for) and the student step alone (forward, the method's loss on the pre-computed
  teacher outputs, backward, clipping, AdamW step), timed apart over the same batches;
  samples/s = batch / (teacher + student seconds per batch). An augmenting method's x' is
  made beforehand (timed apart: ``augment_s``, not in the floor), and both models' passes on x'
  are in the floor. It leaves out what else a method does per step: making x', generator
  steps, memory-bank updates, hooks.
- loop: :func:`kd_engine.trainer.train` itself, timed between its progress reports (after
  ``--warmup`` steps, over ``--steps`` steps: no evaluation, no preparation inside), with
  ``training.group_by_length`` off and, for ``vanilla_kd``, on.
- for ``vanilla_kd`` also a plain PyTorch KD loop (the same loss, AdamW, clipping) and
  TextBrewer 0.2.1's ``GeneralDistiller`` (optional: ``pip install textbrewer==0.2.1 --no-deps``;
  its ``torch.utils.tensorboard`` import is stubbed, TensorBoard is not needed).

Every warm-up step is excluded. ``--profile`` prints a cProfile of the loop instead. On a shared
machine run it as ``nice -n -15 ... --threads 1`` (see :mod:`bench.kd_job`).
"""

from __future__ import annotations

import cProfile
import json
import platform
import pstats
import sys
import tempfile
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import torch
import typer

import kd_engine.hops
from kd_engine import registry
from kd_engine.data.batching import Encoded, batch_rows, collate
from kd_engine.evaluation import model_inputs
from kd_engine.losses import ce_loss, kd_loss
from kd_engine.methods.base import Method, StepOutputs
from kd_engine.models.attention_scores import record_attentions
from kd_engine.models.loading import load_classifier, load_tokenizer
from kd_engine.references import builtin_model_path
from kd_engine.run import run_job
from kd_engine.spec import JobSpec, TrainingSpec
from kd_engine.stages import STUDENT, ParamGroup
from kd_engine.tasks import CLASSIFICATION
from kd_engine.trainer import Progress, TrainHooks, train

BATCH = 32
MAX_LEN = 64
# Settings that keep a method's preparation short (the corpus Minimax-kNN embeds).
OVERRIDES: dict[str, dict[str, Any]] = {"minimax_knn": {"max_corpus_examples": 2000}}
# born_again's generations have the teacher's architecture (a full copy).
STUDENTS: dict[str, dict[str, Any]] = {"born_again": {"type": "from_teacher"}}
app = typer.Typer(add_completion=False)


class _Measured(Exception):
    """Raised from the patched trainer once a method is measured (ends its job)."""

    def __init__(self, row: dict[str, Any]) -> None:
        super().__init__("measured")
        self.row = row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fwd(model: Any, batch: dict[str, torch.Tensor], method: Method, device: torch.device) -> Any:
    return CLASSIFICATION.forward(model, batch, method.needs, device)


def _autocast(device: torch.device) -> Any:
    bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def _optimizer(groups: list[ParamGroup], cfg: TrainingSpec) -> torch.optim.Optimizer:
    params = [p for g in groups for p in g.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


def _floor(
    student: Any,
    teacher: Any,
    method: Method,
    data: list[dict[str, torch.Tensor]],
    cfg: TrainingSpec,
    device: torch.device,
    warmup: int,
) -> dict[str, float]:
    """Seconds per batch of the teacher forward alone and of the student step alone."""
    stage = method.stages(cfg)[-1]
    method.begin_stage(stage)
    groups = [ParamGroup(STUDENT, [student], weight_decay=cfg.weight_decay), *method.param_groups()]
    trains = set(stage.trains) if stage.trains is not None else {g.name for g in groups}
    active = [g for g in groups if g.name in trains]
    for g in groups:
        for m in g.modules:
            m.to(device)
    student.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    optimizer = _optimizer(active, cfg)
    params = [p for g in active for p in g.parameters()]
    # An augmenting method's batches x' are made beforehand (untimed): the floor holds the
    # passes of both models on x and x', not the making of x'.
    augmented = []
    a_sec = 0.0
    for i, batch in enumerate(data):
        method.start_step(1, i)
        method.start_batch(batch)
        _sync(device)
        t0 = time.perf_counter()
        augmented.append(method.augment(batch))
        _sync(device)
        if i >= warmup:
            a_sec += time.perf_counter() - t0
    t_outs: list[StepOutputs | None] = []
    t_sec = 0.0
    for i, (batch, aug) in enumerate(zip(data, augmented, strict=True)):
        if teacher is None or not method.needs.teacher:
            t_outs.append(None)
            continue
        _sync(device)
        t0 = time.perf_counter()
        with torch.inference_mode(), _autocast(device):
            out = _fwd(teacher, batch, method, device)
            if aug is not None:
                out.augmented = _fwd(teacher, aug, method, device)
        _sync(device)
        if i >= warmup:
            t_sec += time.perf_counter() - t0
        t_outs.append(out)
    s_sec = 0.0
    for i, (batch, aug, t_out) in enumerate(zip(data, augmented, t_outs, strict=True)):
        method.start_step(1, i)  # the method's per-step hooks, untimed
        method.start_batch(batch)
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(device):
            s_out = _fwd(student, batch, method, device)
            if aug is not None:
                s_out.augmented = _fwd(student, aug, method, device)
            res = method.loss(
                s_out, t_out, batch["labels"].to(device), batch["attention_mask"].to(device)
            )
        res.total.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(device)
        if i >= warmup:
            s_sec += time.perf_counter() - t0
    n = len(data) - warmup
    return {"teacher_s": t_sec / n, "student_s": s_sec / n, "augment_s": a_sec / n}


def _plain_kd(
    student: Any,
    teacher: Any,
    data: list[dict[str, torch.Tensor]],
    cfg: TrainingSpec,
    device: torch.device,
    warmup: int,
) -> float:
    """Seconds per batch of a plain PyTorch KD loop (vanilla_kd's loss, alpha 0.5, T 2)."""
    student.to(device).train()
    teacher.to(device).eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.learning_rate)
    start = 0.0
    for i, batch in enumerate(data):
        if i == warmup:
            _sync(device)
            start = time.perf_counter()
        inputs = model_inputs(batch, device)
        labels = batch["labels"].to(device)
        with _autocast(device):
            with torch.inference_mode():
                t_logits = teacher(**inputs).logits
            s_logits = student(**inputs).logits
            loss = 0.5 * ce_loss(s_logits, labels) + 0.5 * kd_loss(s_logits, t_logits.clone(), 2.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    _sync(device)
    return (time.perf_counter() - start) / (len(data) - warmup)


def _textbrewer(
    student: Any,
    teacher: Any,
    data: list[dict[str, torch.Tensor]],
    cfg: TrainingSpec,
    device: torch.device,
    warmup: int,
) -> tuple[float | None, str]:
    """Seconds per batch of TextBrewer's GeneralDistiller (hard-label + soft-label loss, T 2),
    or None and the reason it could not run."""
    if "torch.utils.tensorboard" not in sys.modules:
        stub = types.ModuleType("torch.utils.tensorboard")

        class SummaryWriter:
            def __init__(self, *a: object, **k: object) -> None: ...
            def add_scalar(self, *a: object, **k: object) -> None: ...

        stub.SummaryWriter = SummaryWriter  # type: ignore[attr-defined]
        sys.modules["torch.utils.tensorboard"] = stub
    try:
        from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
    except Exception as exc:
        return None, f"textbrewer does not import: {exc}"

    def adaptor(batch: Any, outputs: Any) -> dict[str, Any]:
        return {"logits": outputs.logits, "hard_label": batch["labels"]}

    student.to(device).train()
    teacher.to(device).eval()
    times: list[float] = []

    def stream() -> Iterator[dict[str, torch.Tensor]]:
        for batch in data:
            _sync(device)
            times.append(time.perf_counter())
            yield {k: v.to(device) for k, v in batch.items() if k != "example_ids"}

    out = tempfile.mkdtemp(prefix="tb-")
    try:
        distiller = GeneralDistiller(
            train_config=TrainingConfig(
                device=device, output_dir=out, log_dir=out, ckpt_frequency=1, ckpt_steps=10**9
            ),
            distill_config=DistillationConfig(
                temperature=2.0, hard_label_weight=0.5, kd_loss_weight=0.5, kd_loss_type="ce"
            ),
            model_T=teacher,
            model_S=student,
            adaptor_T=adaptor,
            adaptor_S=adaptor,
        )
        optimizer = torch.optim.AdamW(student.parameters(), lr=cfg.learning_rate)
        distiller.train(
            optimizer,
            stream(),
            num_steps=len(data),
            max_grad_norm=cfg.max_grad_norm,
        )
    except Exception as exc:
        return None, f"GeneralDistiller failed: {type(exc).__name__}: {exc}"
    # times[i] is when batch i was requested, i.e. when step i-1 had finished.
    if len(times) <= warmup + 1:
        return None, "GeneralDistiller consumed too few batches"
    last = len(times) - 1
    return (times[last] - times[warmup]) / (last - warmup), ""


def _loop(
    student: Any,
    teacher: Any,
    method: Method,
    train_data: Encoded,
    dev_data: Encoded,
    cfg: TrainingSpec,
    pad_id: int,
    device: torch.device,
    warmup: int,
    steps: int,
    group_by_length: bool,
    profile: bool,
) -> dict[str, Any]:
    """Seconds per step of :func:`train` on the method's last stage, timed from its progress
    report after ``warmup`` steps to the one after ``warmup + steps``; and the padding share."""
    every = warmup
    cfg = cfg.model_copy(update={"max_steps": warmup + steps, "group_by_length": group_by_length})
    marks: dict[int, float] = {}

    def on_progress(p: Progress) -> None:
        if p.stage_index == p.num_stages and p.stage != "evaluate":
            _sync(device)
            marks[p.stage_step] = time.perf_counter()

    hooks = TrainHooks(on_progress=on_progress, every=every)
    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    train(student, teacher, method, train_data, dev_data, cfg, pad_id, device, hooks)
    if prof:
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(35)
    g = torch.Generator().manual_seed(cfg.seed)
    real = padded = 0
    for rows in batch_rows(train_data, cfg.batch_size, g, group_by_length)[: warmup + steps]:
        lens = [len(train_data.input_ids[r]) for r in rows]
        real, padded = real + sum(lens), padded + max(lens) * len(lens)
    return {
        "step_s": (marks[warmup + steps] - marks[warmup]) / steps,
        "padding": 1 - real / padded,
    }


def _measure(
    name: str, device: torch.device, steps: int, warmup: int, profile: bool
) -> dict[str, Any]:
    """Prepare ``name``'s job as run_job does and measure it when training is about to start."""
    n_train = BATCH * (warmup + steps) * 2  # the last stage never reaches an epoch's end
    spec = JobSpec.model_validate(
        {
            "teacher": "builtin:minilm-l6",
            "student": STUDENTS.get(name, {"type": "from_teacher", "layers": [0, 3]}),
            "method": {"name": name, **OVERRIDES.get(name, {})},
            "dataset": {
                "source": "builtin:rotten_tomatoes",
                "max_train_examples": n_train,
                "max_eval_examples": 64,
            },
            "training": {
                "batch_size": BATCH,
                "max_seq_length": MAX_LEN,
                "learning_rate": 1e-4,
                "seed": 0,
                "device": device.type,
            },
        }
    )
    original = kd_engine.hops.train

    def measure(
        student: Any,
        teacher: Any,
        method: Method,
        train_data: Encoded,
        dev_data: Encoded,
        cfg: TrainingSpec,
        pad_id: int,
        dev: torch.device,
        *args: object,
        **kwargs: object,
    ) -> Any:
        row: dict[str, Any] = {"method": name, "device": dev.type}
        g = torch.Generator().manual_seed(1)
        data = [
            collate(train_data, rows, pad_id)
            for rows in batch_rows(train_data, cfg.batch_size, g)[: warmup + steps]
        ]
        t0 = time.perf_counter()
        for rows in batch_rows(train_data, cfg.batch_size, g)[: warmup + steps]:
            collate(train_data, rows, pad_id)
        row["collate_ms"] = 1000 * (time.perf_counter() - t0) / (warmup + steps)
        student_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
        restore = (
            record_attentions([student, teacher], scores=method.needs.attention_scores)
            if method.needs.attentions
            else (lambda: None)
        )
        try:
            method.prepare(train_data)
            floor = _floor(student, teacher, method, data, cfg, dev, warmup)
        finally:
            restore()
        row.update(floor)
        row["floor_sps"] = cfg.batch_size / (floor["teacher_s"] + floor["student_s"])
        row["batch"] = cfg.batch_size
        student.load_state_dict(student_state)
        variants = [False, True] if name == "vanilla_kd" and not profile else [False]
        for grouped in variants:
            loop = _loop(
                student, teacher, method, train_data, dev_data, cfg, pad_id, dev,
                warmup, steps, grouped, profile,
            )  # fmt: skip
            key = "loop_grouped" if grouped else "loop"
            row[f"{key}_sps"] = cfg.batch_size / loop["step_s"]
            row[f"{key}_padding"] = loop["padding"]
            student.load_state_dict(student_state)
        if name == "vanilla_kd" and teacher is not None and not profile:
            row["plain_sps"] = cfg.batch_size / _plain_kd(student, teacher, data, cfg, dev, warmup)
            student.load_state_dict(student_state)
            tb, why = _textbrewer(student, teacher, data, cfg, dev, warmup)
            row["textbrewer_sps"] = cfg.batch_size / tb if tb else None
            row["textbrewer_note"] = why
        raise _Measured(row)

    kd_engine.hops.train = measure  # type: ignore[assignment]
    try:
        with tempfile.TemporaryDirectory() as out:
            run_job(spec, _teacher(Path(out)), _no_files, Path(out) / "job")
    except _Measured as done:
        return done.row
    finally:
        kd_engine.hops.train = original
    raise RuntimeError(f"{name}: training never started")


def _teacher(cache: Path) -> Path:
    """all-MiniLM-L6-v2 with a new (untrained) two-class head, saved as a classifier: the
    teacher's weights do not change its speed, so no fine-tuning is spent on it."""
    path = cache / "teacher"
    if not (path / "config.json").exists():
        model = load_classifier(builtin_model_path("minilm-l6"), ["rotten", "fresh"])
        model.save_pretrained(path)
        load_tokenizer(builtin_model_path("minilm-l6")).save_pretrained(path)
    return path


def _no_files(ref: str) -> Path:
    raise ValueError(f"the benchmark uses built-in datasets only, not {ref!r}")


def _fmt(v: float | None, spec: str = ".1f") -> str:
    return "–" if v is None else format(v, spec)


def table(rows: list[dict[str, Any]]) -> str:
    """The Markdown table of the measured rows."""
    lines = [
        "| device | method | teacher fwd ms | student step ms | floor samples/s | "
        "`train` samples/s | ratio to floor | making x' ms | ratio to floor + x' | "
        "grouped samples/s | padding plain → grouped | plain loop | TextBrewer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['device']} | {r['method']} | error: {r['error']} |" + " |" * 10)
            continue
        grouped = r.get("loop_grouped_sps")
        pad = (
            f"{r['loop_padding']:.0%} → {r['loop_grouped_padding']:.0%}"
            if grouped is not None
            else f"{r['loop_padding']:.0%}"
        )
        a_s = r.get("augment_s") or 0.0
        aug = f"{1000 * a_s:.0f}" if a_s else "–"
        step_s = r["teacher_s"] + r["student_s"] + a_s
        with_aug = f"{r['loop_sps'] * step_s / r['batch']:.2f}" if a_s else "–"
        lines.append(
            f"| {r['device']} | {r['method']} | {1000 * r['teacher_s']:.0f} | "
            f"{1000 * r['student_s']:.0f} | {r['floor_sps']:.1f} | {r['loop_sps']:.1f} | "
            f"{r['loop_sps'] / r['floor_sps']:.2f} | {aug} | {with_aug} | "
            f"{_fmt(grouped)} | {pad} | {_fmt(r.get('plain_sps'))} | "
            f"{_fmt(r.get('textbrewer_sps'))} |"
        )
    return "\n".join(lines)


@app.command()
def main(
    methods: Annotated[list[str] | None, typer.Option(help="Methods (default: all).")] = None,
    steps: Annotated[int, typer.Option(help="Measured steps per method.")] = 20,
    warmup: Annotated[int, typer.Option(help="Warm-up steps (excluded).")] = 5,
    devices: Annotated[
        list[str] | None, typer.Option(help="cpu and/or cuda (default: cpu, and cuda if any).")
    ] = None,
    profile: Annotated[bool, typer.Option(help="cProfile the loop of each method.")] = False,
    out: Annotated[Path | None, typer.Option(help="Write the rows as JSON lines here.")] = None,
    threads: Annotated[
        int, typer.Option(help="torch intra-op threads (0: torch's default, the cores).")
    ] = 0,
) -> None:
    """Measure and print the table (Markdown)."""
    if threads:
        torch.set_num_threads(threads)
    if steps % warmup:
        raise typer.BadParameter("--steps must be a multiple of --warmup (progress cadence)")
    names = methods or registry.names()
    devs = devices or (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    cpu = platform.processor() or platform.machine()
    print(f"# {when}, {cpu}, torch {torch.__version__}, {torch.get_num_threads()} threads, {gpu}")
    rows: list[dict[str, Any]] = []
    for dev in devs:
        for name in names:
            t0 = time.perf_counter()
            try:
                row = _measure(name, torch.device(dev), steps, warmup, profile)
            except Exception as exc:
                row = {"method": name, "device": dev, "error": f"{type(exc).__name__}: {exc}"}
            row["wall_s"] = time.perf_counter() - t0
            rows.append(row)
            print(json.dumps(row), flush=True)
            if out is not None:
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
    print(table(rows))


if __name__ == "__main__":
    app()
