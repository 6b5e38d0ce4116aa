"""Data-parallel training (kd_engine.distributed) on the CPU: two gloo ranks train the same job
as one process, with real tiny MiniLM models; and the precision setting's CPU paths.

Equivalence tolerance: identical step counts and schedule, final student weights within
``WEIGHT_ATOL`` (max absolute difference) and logged losses within ``LOSS_RTOL``. The two runs
differ only by floating-point summation order (two half-batch backward passes whose gradients
gloo sums and halves, against one full-batch pass; rows padded to their own shard's length),
so they agree to fp32 rounding, amplified a little by Adam over a few steps.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import PreTrainedModel

from kd_engine import distributed
from kd_engine.data.batching import encode
from kd_engine.data.builtins import load_builtin
from kd_engine.distributed import DistContext, check_supported, launch
from kd_engine.methods.vanilla_kd import VanillaKD, VanillaKDConfig
from kd_engine.models.loading import load_classifier, load_tokenizer
from kd_engine.models.shapes import ModelShape
from kd_engine.models.student import student_from_teacher
from kd_engine.references import builtin_model_path
from kd_engine.spec import JobSpec, TrainingSpec
from kd_engine.trainer import TrainHooks, precision_plan, train
from tests.checks import NO_EXTRAS

SHAPE = ModelShape(num_layers=6, hidden_size=384, num_labels=2, num_heads=12)
WEIGHT_ATOL = 2e-5  # observed: 7.2e-06 (largest update 2.5e-03)
LOSS_RTOL = 1e-5
# 21 rows in batches of 8: 8, 8, 5; the last splits 3 + 2 between two ranks (unequal shards).
N_TRAIN, BATCH = 21, 8
CFG = TrainingSpec(
    epochs=2,
    batch_size=BATCH,
    learning_rate=1e-3,
    warmup_ratio=0.0,
    max_seq_length=16,
    seed=11,
    device="cpu",
    eval_batch_size=16,
)


def _no_dropout(model: PreTrainedModel) -> PreTrainedModel:
    # Dropout masks are random per rank: one process drawing one mask for the whole batch
    # cannot be matched by two drawing theirs, so the equivalence is checked without dropout.
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def _train_once(rank: int, out: str, accumulation: int = 1) -> None:
    """Train the small job (in a rank of a launched group, or alone) and, on rank 0, save the
    student's weights and the logged losses into ``out``."""
    torch.set_num_threads(1)
    path = builtin_model_path("minilm-l6")
    tok = load_tokenizer(path)
    data = load_builtin("rotten_tomatoes")
    torch.manual_seed(0)
    teacher = _no_dropout(load_classifier(path, ["rotten", "fresh"]).eval())
    student = _no_dropout(student_from_teacher(teacher, [0, 3]))
    init = {k: v.clone() for k, v in student.state_dict().items()}
    losses: list[float] = []

    def log(record: dict[str, object]) -> None:
        if record.get("event") == "step":
            losses.append(float(record["loss"]))  # type: ignore[arg-type]

    result = train(
        student,
        teacher,
        VanillaKD(VanillaKDConfig(), SHAPE, SHAPE),
        encode(data.train[:N_TRAIN], tok, 16),
        encode(data.dev[:16], tok, 16),
        CFG.model_copy(update={"grad_accumulation_steps": accumulation}),
        0,
        torch.device("cpu"),
        TrainHooks(log=log, every=1),
    )
    torch.save(
        {
            "state": student.state_dict(),
            "init": init,
            "losses": losses,
            "steps": [s["steps"] for s in result.stages],
            "history": [(h["step"], h["dev"]) for h in result.history],
        },
        Path(out) / f"rank{rank}.pt",
    )


@pytest.mark.parametrize("accumulation", [1, 2])
def test_two_gloo_ranks_train_like_one_process(tmp_path: Path, accumulation: int) -> None:
    """With accumulation 2, the first micro-batch of each group backpropagates under DDP's
    no_sync (gradients all-reduced once per optimiser step)."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    _train_once(0, str(one), accumulation)
    launch(_train_once, 2, (str(two), accumulation))
    assert not (two / "rank1.pt").exists()  # rank 1 stops after training (RankFinished)
    a = torch.load(one / "rank0.pt")
    b = torch.load(two / "rank0.pt")
    per_epoch = 3 if accumulation == 1 else 2  # batches 8, 8, 5: groups (8, 8), (5)
    assert a["steps"] == b["steps"] == [2 * per_epoch]
    assert len(a["losses"]) == len(b["losses"]) == 2 * per_epoch
    assert b["losses"] == pytest.approx(a["losses"], rel=LOSS_RTOL)
    moved = max((a["state"][k] - a["init"][k]).abs().max().item() for k in a["state"])
    assert moved > 1e-3  # it trained: the tolerance is small against the updates
    assert [h[0] for h in a["history"]] == [h[0] for h in b["history"]]
    diff = max((a["state"][k] - b["state"][k]).abs().max().item() for k in a["state"])
    assert diff < WEIGHT_ATOL, f"max abs weight difference {diff}"
    print(f"max abs weight difference {diff:.2e}, largest update {moved:.2e}")


def test_shard_splits_rows_and_weights_partial_batches() -> None:
    batch = {
        "input_ids": torch.arange(15).reshape(5, 3),
        "attention_mask": torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 0], [1, 1, 0]]),
        "labels": torch.arange(5),
    }
    s0, w0 = DistContext(0, 2).shard(batch)
    s1, w1 = DistContext(1, 2).shard(batch)
    assert s0["labels"].tolist() == [0, 1, 2] and w0 == pytest.approx(1.2)
    assert s1["labels"].tolist() == [3, 4] and w1 == pytest.approx(0.8)
    assert s1["input_ids"].shape == (2, 2)  # padding beyond the shard's longest row is cut
    # Fewer rows than ranks: the empty rank runs one row with weight 0.
    one = {k: v[:1] for k, v in batch.items()}
    s, w = DistContext(1, 2).shard(one)
    assert s["labels"].tolist() == [0] and w == 0.0


def _spec(method: str, batch_size: int = 8) -> JobSpec:
    return JobSpec.model_validate(
        {
            "teacher": "builtin:minilm-l6",
            "method": {"name": method},
            "dataset": {"source": "builtin:rotten_tomatoes"},
            "training": {"batch_size": batch_size, "device": "cpu"},
        }
    )


def test_unsupported_multi_gpu_jobs_are_refused_naming_the_setting() -> None:
    check_supported(_spec("tinybert"), 1)  # one rank: anything goes
    check_supported(_spec("vanilla_kd"), 2)
    with pytest.raises(ValueError, match=r"method.name: 'tinybert'.*DISTILLERY_WORKER_GPUS"):
        check_supported(_spec("tinybert"), 2)
    with pytest.raises(ValueError, match=r"training\.batch_size"):
        check_supported(_spec("vanilla_kd", batch_size=2), 4)
    with pytest.raises(ValueError, match="checkpoints"):
        check_supported(_spec("vanilla_kd"), 2, checkpoints=object())


def test_worker_gpus_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(distributed.WORKER_GPUS_ENV, raising=False)
    assert distributed.worker_gpus() == 1
    monkeypatch.setenv(distributed.WORKER_GPUS_ENV, "4")
    assert distributed.worker_gpus() == 4
    monkeypatch.setenv(distributed.WORKER_GPUS_ENV, "zero")
    with pytest.raises(ValueError, match=distributed.WORKER_GPUS_ENV):
        distributed.worker_gpus()


def test_precision_plan_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert precision_plan("auto", cpu) == (None, None)
    assert precision_plan("fp32", cpu) == (None, None)
    assert precision_plan("bf16", cpu) == (torch.bfloat16, torch.bfloat16)
    assert TrainingSpec().precision == "auto"
    with pytest.raises(ValueError):
        TrainingSpec.model_validate({"precision": "fp8"})


def test_spec_json_round_trip() -> None:
    spec = _spec("vanilla_kd")
    assert json.loads(spec.model_dump_json())["training"]["precision"] == "auto"


def _kd_run(precision: str, device: torch.device) -> tuple[PreTrainedModel, PreTrainedModel, list]:
    """A few KD steps of the small job with ``training.precision`` on ``device``; returns the
    student, the teacher and the recorded teacher dtypes seen during training."""
    path = builtin_model_path("minilm-l6")
    tok = load_tokenizer(path)
    data = load_builtin("rotten_tomatoes")
    torch.manual_seed(0)
    teacher = _no_dropout(load_classifier(path, ["rotten", "fresh"]).eval())
    student = _no_dropout(student_from_teacher(teacher, [0, 3]))
    seen: list[torch.dtype] = []
    teacher.register_forward_hook(lambda m, a, o: seen.append(next(m.parameters()).dtype))
    cfg = CFG.model_copy(update={"precision": precision, "epochs": 1, "device": device.type})
    train(
        student,
        teacher,
        VanillaKD(VanillaKDConfig(), SHAPE, SHAPE),
        encode(data.train[:N_TRAIN], tok, 16),
        encode(data.dev[:16], tok, 16),
        cfg,
        0,
        device,
    )
    return student, teacher, seen


def test_bf16_on_the_cpu_runs_a_bf16_teacher_and_gives_it_back_in_fp32() -> None:
    student, teacher, seen = _kd_run("bf16", torch.device("cpu"))
    assert seen and set(seen) == {torch.bfloat16}
    assert {p.dtype for p in teacher.parameters()} == {torch.float32}
    assert {p.dtype for p in student.parameters()} == {torch.float32}


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_auto_precision_matches_fp32_and_halves_the_teacher() -> None:
    cuda = torch.device("cuda")
    _, teacher_dtype = precision_plan("auto", cuda)
    assert teacher_dtype in (torch.bfloat16, torch.float16)
    s_auto, t_auto, seen = _kd_run("auto", cuda)
    assert set(seen) == {teacher_dtype}  # the teacher ran in half precision
    assert {p.dtype for p in t_auto.parameters()} == {torch.float32}  # and is fp32 again
    s_fp32, _, seen32 = _kd_run("fp32", cuda)
    assert set(seen32) == {torch.float32}
    # bf16 autocast: 8 mantissa bits; after 3 AdamW steps at lr 1e-3 the weights agree to a
    # few update sizes at most.
    a, b = s_auto.state_dict(), s_fp32.state_dict()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff < 5e-3, diff
    data = load_builtin("rotten_tomatoes")
    enc = encode(data.dev[:16], load_tokenizer(builtin_model_path("minilm-l6")), 16)
    from kd_engine.evaluation import predict_logits

    la = predict_logits(s_auto, enc, 16, 0, cuda)
    lb = predict_logits(s_fp32, enc, 16, 0, cuda)
    assert torch.allclose(la.float(), lb.float(), atol=5e-2, rtol=5e-2)


def test_run_job_distributed_trains_and_exports_from_rank_0(tmp_path: Path) -> None:
    """A whole job (finetune of the MiniLM base encoder) on two gloo ranks: rank 0's progress
    and log records reach the caller's hooks, the student and metrics are written once."""
    from kd_engine.distributed import run_job_distributed
    from kd_engine.trainer import Progress

    spec = JobSpec.model_validate(
        {
            "teacher": "builtin:minilm-l6",
            "student": {"num_layers": 1},  # the ranks are under test, not the model
            "method": {"name": "finetune"},
            "dataset": {
                "source": "builtin:rotten_tomatoes",
                "max_train_examples": 24,
                "max_eval_examples": 16,
            },
            "training": {
                "batch_size": 8,
                "epochs": 1,
                "max_seq_length": 16,
                "device": "cpu",
                "eval_batch_size": 16,
            },
            "export": NO_EXTRAS,  # exported and checked in test_onnx_export
        }
    )
    progress: list[Progress] = []
    records: list[dict[str, object]] = []
    hooks = TrainHooks(on_progress=progress.append, log=records.append, every=1)
    out = tmp_path / "out"
    result = run_job_distributed(spec, builtin_model_path("minilm-l6"), Path, out, 2, hooks)
    assert (out / "model.safetensors").is_file()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"] == result.metrics["test"]
    assert "accuracy" in metrics["test"]
    steps = [p.step for p in progress if p.stage == "train"]
    assert steps == [1, 2, 3]  # 24 rows / batch 8, once each
    assert any(r.get("event") == "done" for r in records)


def test_the_teacher_is_halved_only_when_the_loop_alone_uses_it() -> None:
    from kd_engine.trainer import teacher_inference_only

    class Augmenting(VanillaKD):
        def augment(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
            return None

    assert teacher_inference_only(VanillaKD(VanillaKDConfig(), SHAPE, SHAPE))
    assert not teacher_inference_only(Augmenting(VanillaKDConfig(), SHAPE, SHAPE))
