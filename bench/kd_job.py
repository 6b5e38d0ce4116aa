"""A whole 3-epoch ``vanilla_kd`` job against TextBrewer 0.2.1, side by side in one run (issue 11).

    .venv/bin/python -m bench.kd_job                     # defaults: 640 examples, 3 epochs
    .venv/bin/python -m bench.kd_job --repeats 3

Run by hand, never in CI. The setting is the issue's: all-MiniLM-L6-v2 with a new, seeded
two-class head as the teacher (its speed does not depend on its accuracy), its layers 0 and 5
as the student, batch 32, max length 64, the first 640 Rotten Tomatoes training reviews, 3
epochs, AdamW (lr 1e-4), gradient clipping at 1.0, hard-label and soft-label loss with weight
0.5 each at T = 2. Every run starts from the same student weights. Rows:

- ``textbrewer``: TextBrewer's ``GeneralDistiller`` (teacher run at every step), fed the same
  dynamically padded batches, pre-collated (its data loading is free here); at each epoch end
  it saves the student (its default) and a callback evaluates the 64 dev examples, as ours does;
- ``TextBrewer BasicDistiller, is_caching_logits``: TextBrewer's own logit cache. Only its
  ``BasicDistiller`` has one (``GeneralDistiller.__init__`` sets ``is_caching_logits`` back to
  False): one teacher pass over the batches first, then every epoch reads the stored logits;
- ``train, teacher live``: :func:`kd_engine.trainer.train` with ``teacher_cache`` off;
- ``train, cached``: the teacher-output cache built in the job (its time included), then
  ``train`` reading it;
- ``train, cached + group_by_length``: the same with length-grouped batches;
- ``train, cache reused, grouped``: a second job with the same teacher and data: the cache is
  loaded from disk (its load is in the time), nothing is computed by the teacher.

Each row's time is the wall time of the whole job from the first step to the trained student
(evaluations included). With ``--repeats`` > 1 the rows run interleaved and the median counts.
On a shared machine run it as ``nice -n -15 ... --threads 1``: two intra-op threads stall
whenever another process takes one of two cores (a run's time then varies 2-3x), one thread at
a high priority keeps a core to itself.
"""

from __future__ import annotations

import copy
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch
import transformers
import typer

from kd_engine.data.batching import Encoded, batch_rows, collate, encode
from kd_engine.data.builtins import load_builtin
from kd_engine.evaluation import model_inputs
from kd_engine.methods.vanilla_kd import VanillaKD, VanillaKDConfig
from kd_engine.models.loading import load_classifier, load_tokenizer
from kd_engine.models.shapes import shape_from_config
from kd_engine.models.student import student_from_teacher
from kd_engine.references import builtin_model_path
from kd_engine.spec import TrainingSpec
from kd_engine.teacher_cache import build, load, save
from kd_engine.trainer import pick_device, train

app = typer.Typer(add_completion=False)


def _import_textbrewer() -> Any:
    """TextBrewer 0.2.1 (``pip install textbrewer==0.2.1 --no-deps``) with its
    ``torch.utils.tensorboard`` import stubbed when TensorBoard is absent."""
    try:
        import torch.utils.tensorboard  # noqa: F401
    except Exception:
        stub = types.ModuleType("torch.utils.tensorboard")

        class SummaryWriter:
            def __init__(self, *a: object, **k: object) -> None: ...
            def add_scalar(self, *a: object, **k: object) -> None: ...

        stub.SummaryWriter = SummaryWriter  # type: ignore[attr-defined]
        sys.modules["torch.utils.tensorboard"] = stub
    import textbrewer

    return textbrewer


def _textbrewer_job(
    student: Any,
    teacher: Any,
    batches: list[dict[str, torch.Tensor]],
    dev: list[dict[str, torch.Tensor]],
    cfg: TrainingSpec,
    caching: bool,
) -> None:
    """TextBrewer's GeneralDistiller (or, with ``caching``, its BasicDistiller with
    ``is_caching_logits``) over ``cfg.epochs`` epochs of ``batches`` (CPU)."""
    tb = _import_textbrewer()

    def adaptor(batch: Any, outputs: Any) -> dict[str, Any]:
        return {"logits": outputs.logits, "hard_label": batch["labels"]}

    def evaluate(model: Any, step: int) -> None:
        model.eval()
        with torch.inference_mode():
            for b in dev:
                model(**model_inputs(b, torch.device("cpu")))

    out = tempfile.mkdtemp(prefix="tb-")
    distiller_cls = tb.BasicDistiller if caching else tb.GeneralDistiller
    distiller = distiller_cls(
        train_config=tb.TrainingConfig(device="cpu", output_dir=out, log_dir=out),
        distill_config=tb.DistillationConfig(
            temperature=2.0,
            hard_label_weight=0.5,
            kd_loss_weight=0.5,
            kd_loss_type="ce",
            is_caching_logits=caching,
        ),
        model_T=teacher,
        model_S=student,
        adaptor_T=adaptor,
        adaptor_S=adaptor,
    )
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
    )
    distiller.train(
        optimizer,
        batches,
        num_epochs=cfg.epochs,
        max_grad_norm=cfg.max_grad_norm,
        callback=evaluate,
    )


@app.command()
def main(
    examples: Annotated[int, typer.Option(help="Training examples.")] = 640,
    epochs: int = 3,
    batch_size: int = 32,
    max_length: int = 64,
    repeats: Annotated[int, typer.Option(help="Interleaved repeats; the median counts.")] = 1,
    threads: Annotated[
        int, typer.Option(help="torch intra-op threads (0: torch's default, the cores).")
    ] = 0,
) -> None:
    """Run each row ``repeats`` times and print a Markdown table."""
    transformers.logging.set_verbosity_error()
    if threads:
        torch.set_num_threads(threads)
    device = pick_device("cpu")
    path = builtin_model_path("minilm-l6")
    tokenizer = load_tokenizer(path)
    data = load_builtin("rotten_tomatoes")
    names = data.label_names
    train_enc: Encoded = encode(data.train[:examples], tokenizer, max_length)
    dev_enc: Encoded = encode(data.dev[:64], tokenizer, max_length)
    pad = int(tokenizer.pad_token_id or 0)
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
        device="cpu",
        teacher_cache=False,
    )
    g = torch.Generator().manual_seed(42)
    batches = [collate(train_enc, rows, pad) for rows in batch_rows(train_enc, batch_size, g)]
    for b in batches:
        b.pop("example_ids", None)
    dev_batches = [
        collate(dev_enc, list(range(i, min(i + 64, len(dev_enc)))), pad)
        for i in range(0, len(dev_enc), 64)
    ]
    cache_dir = Path(tempfile.mkdtemp(prefix="kdjob-cache-"))
    prebuilt = build("bench", teacher, train_enc, 64, pad, device)
    save(prebuilt, cache_dir)

    def ours(cached: str, grouped: bool) -> Callable[[Any], None]:
        def run(student: Any) -> None:
            method = VanillaKD(VanillaKDConfig(alpha=0.5, temperature=2.0), shape, shape)
            cache = None
            if cached == "build":
                cache = build("bench", teacher, train_enc, 64, pad, device)
            elif cached == "reuse":
                cache = load(cache_dir, "bench", train_enc)
            run_cfg = cfg.model_copy(update={"group_by_length": grouped})
            train(student, teacher, method, train_enc, dev_enc, run_cfg, pad, device,
                  teacher_cache=cache)  # fmt: skip

        return run

    rows: dict[str, Callable[[Any], None]] = {
        "TextBrewer GeneralDistiller": lambda s: _textbrewer_job(
            s, teacher, batches, dev_batches, cfg, caching=False
        ),
        "TextBrewer BasicDistiller, is_caching_logits": lambda s: _textbrewer_job(
            s, teacher, batches, dev_batches, cfg, caching=True
        ),
        "`train`, teacher live": ours("off", False),
        "`train`, cache built in the job": ours("build", False),
        "`train`, cache built in the job, group_by_length": ours("build", True),
        "`train`, cache reused (2nd job), group_by_length": ours("reuse", True),
    }
    seconds: dict[str, list[float]] = {k: [] for k in rows}
    for r in range(repeats):
        for name, run in rows.items():
            student = copy.deepcopy(first).train()
            started = time.perf_counter()
            run(student)
            seconds[name].append(time.perf_counter() - started)
            print(f"# repeat {r + 1}: {name}: {seconds[name][-1]:.1f} s", flush=True)
    samples = epochs * len(train_enc)
    base = statistics.median(seconds["TextBrewer GeneralDistiller"])
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# {when}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{len(train_enc)} examples x {epochs} epochs, batch {batch_size}, length {max_length}")
    print("| job | seconds (median) | runs | samples/s | vs TextBrewer |")
    print("|---|---|---|---|---|")
    for name, secs in seconds.items():
        med = statistics.median(secs)
        runs = ", ".join(f"{s:.1f}" for s in secs)
        print(f"| {name} | {med:.1f} | {runs} | {samples / med:.1f} | {base / med:.2f} |")


if __name__ == "__main__":
    app()
