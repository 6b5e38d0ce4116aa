"""training.precision on the CPU (bf16 autocast and a bf16 teacher given back in fp32) and,
with a GPU, auto precision against fp32; which methods get a half-precision teacher."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import PreTrainedModel

from kd_engine.data.batching import encode
from kd_engine.data.builtins import load_builtin
from kd_engine.methods.vanilla_kd import VanillaKD, VanillaKDConfig
from kd_engine.models.loading import load_classifier, load_tokenizer
from kd_engine.models.shapes import ModelShape
from kd_engine.models.student import student_from_teacher
from kd_engine.references import builtin_model_path
from kd_engine.spec import JobSpec, TrainingSpec
from kd_engine.trainer import precision_plan, train

SHAPE = ModelShape(num_layers=6, hidden_size=384, num_labels=2, num_heads=12)
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
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    return model


def test_precision_plan_on_the_cpu() -> None:
    cpu = torch.device("cpu")
    assert precision_plan("auto", cpu) == (None, None)
    assert precision_plan("fp32", cpu) == (None, None)
    assert precision_plan("bf16", cpu) == (torch.bfloat16, torch.bfloat16)
    assert TrainingSpec().precision == "auto"
    with pytest.raises(ValueError):
        TrainingSpec.model_validate({"precision": "fp8"})


def test_spec_json_round_trip() -> None:
    spec = JobSpec.model_validate(
        {
            "teacher": "builtin:minilm-l6",
            "method": {"name": "vanilla_kd"},
            "dataset": {"source": "builtin:rotten_tomatoes"},
        }
    )
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


def test_the_teacher_is_halved_only_when_the_loop_alone_uses_it() -> None:
    from kd_engine.methods.base import Needs
    from kd_engine.trainer import teacher_inference_only

    class Augmenting(VanillaKD):
        needs = Needs(augmented=True)

    class Adversarial(VanillaKD):
        needs = Needs(models=True, augmented=True, generator=True)

    assert teacher_inference_only(VanillaKD(VanillaKDConfig(), SHAPE, SHAPE))
    assert not teacher_inference_only(Augmenting(VanillaKDConfig(), SHAPE, SHAPE))
    assert not teacher_inference_only(Adversarial(VanillaKDConfig(), SHAPE, SHAPE))
