"""ONNX export of the student, checked against PyTorch with onnxruntime; optional int8.

The exporter is ``torch.onnx.export(..., dynamo=False)``, torch's TorchScript-based exporter:
torch 2.13's default (``dynamo=True``) exporter needs the ``onnxscript`` package, which
Distillery does not install. The graph is written at opset :data:`OPSET` (17: ONNX's
``LayerNormalization`` op; onnxruntime 1.16 and later run it), with the inputs a collated batch
holds (``input_ids``, ``attention_mask`` and, when the tokenizer makes them,
``token_type_ids``; each (batch, sequence) int64, both axes dynamic) and one output, ``logits``
(batch, C) float32. The file is checked with ``onnx.checker``, then run by onnxruntime
(``CPUExecutionProvider``) on the test split next to the PyTorch model in fp32 on the CPU:
:func:`export_report` returns the largest absolute logit difference, the fraction of equal
argmax predictions and both runtimes' latency per example at batch 1 and 32 (the protocol of
:func:`kd_engine.evaluation.latency_per_example`, with few batches, both runtimes on the same
CPU threads). With ``int8`` the ONNX model is also quantised with onnxruntime's
``quantize_dynamic`` (int8 weights, activations quantised at run time) to ``model.int8.onnx``,
evaluated on the test split with :func:`kd_engine.evaluation.task_metrics`.

An export that fails never fails the job: :func:`export_report` returns ``{"error": ...}`` and
calls ``warn``; nothing partial is left in the output directory.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from transformers import PreTrainedModel

from kd_engine.data.batching import Encoded, batches, collate
from kd_engine.evaluation import (
    MODEL_INPUTS,
    agreement,
    latency_per_example,
    median_seconds_per_example,
    predict_logits,
    task_metrics,
)

if TYPE_CHECKING:
    import onnxruntime

    from kd_engine.spec import ExportSpec

OPSET = 17
"""ONNX opset of ``model.onnx`` (torch 2.13's TorchScript exporter supports 7..20)."""
ONNX_FILE = "model.onnx"
INT8_FILE = "model.int8.onnx"
OUTPUT_NAME = "logits"
CPU = torch.device("cpu")
LATENCY_PROTOCOL = {1: (10, 3), 32: (3, 1)}
"""Batch size -> (timed batches, untimed warm-up batches) of the latency measurements: few,
so that a tiny job spends well under a second on them."""
PARITY_WARNING = 1e-3
"""A max absolute logit difference above this between onnxruntime and PyTorch is a warning."""


class _Logits(torch.nn.Module):
    """``model``'s logits from positional inputs named ``names`` (what the exporter traces)."""

    def __init__(self, model: PreTrainedModel, names: list[str]) -> None:
        super().__init__()
        self.model = model
        self.names = names

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        out = self.model(**dict(zip(self.names, inputs, strict=True)))
        logits: torch.Tensor = out.logits if hasattr(out, "logits") else out[0]
        return logits


def sample_inputs(data: Encoded, pad_id: int) -> dict[str, torch.Tensor]:
    """The export's example batch: the first two rows of ``data`` (one when it has one),
    padded (:func:`~kd_engine.data.batching.collate`), only the model inputs.

    Raises:
        ValueError: ``data`` is empty.
    """
    if len(data) == 0:
        raise ValueError("no examples to trace the export with")
    batch = collate(data, list(range(min(2, len(data)))), pad_id)
    return {k: batch[k] for k in MODEL_INPUTS if k in batch}


def export_onnx(
    model: PreTrainedModel, sample: dict[str, torch.Tensor], path: Path, opset: int = OPSET
) -> list[str]:
    """Export ``model`` (on the CPU, put in eval mode) to ``path`` and check the file with
    ``onnx.checker``. Inputs: the keys of ``sample`` ((B, T) int64 each, in the order of
    :data:`~kd_engine.evaluation.MODEL_INPUTS`), with dynamic ``batch`` and ``sequence`` axes;
    output ``logits`` (batch, C). Returns the input names.

    Raises:
        Exception: whatever the exporter or the checker raises (a model it cannot trace, a
            file it cannot write, an invalid graph).
    """
    import onnx

    names = [k for k in MODEL_INPUTS if k in sample]
    axes: dict[str, dict[int, str]] = {n: {0: "batch", 1: "sequence"} for n in names}
    axes[OUTPUT_NAME] = {0: "batch"}
    model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter's deprecation notice and the tracer's warnings about Python
        # values in transformers' code: the parity check below is what tells a bad trace.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            _Logits(model, names),
            tuple(sample[n] for n in names),
            str(path),
            dynamo=False,
            input_names=names,
            output_names=[OUTPUT_NAME],
            dynamic_axes=axes,
            opset_version=opset,
            do_constant_folding=True,
        )
    onnx.checker.check_model(str(path))
    return names


def ort_session(path: Path, threads: int) -> onnxruntime.InferenceSession:
    """An onnxruntime session on the CPU (``CPUExecutionProvider``) with ``threads`` intra-op
    threads (as many as PyTorch uses, for a fair latency comparison)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only
    return onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )


def ort_feed(session: onnxruntime.InferenceSession, batch: dict[str, torch.Tensor]) -> Any:
    """The session's inputs from a collated batch (int64 numpy arrays, by input name)."""
    return {i.name: batch[i.name].numpy() for i in session.get_inputs()}


def ort_logits(
    session: onnxruntime.InferenceSession, data: Encoded, batch_size: int, pad_id: int
) -> torch.Tensor:
    """Logits (N, C) float32 of the ONNX model on every row of ``data``, in order (batches of
    ``batch_size`` padded to their longest row, as :func:`~kd_engine.evaluation.predict_logits`
    pads them)."""
    out = [
        torch.from_numpy(np.asarray(session.run([OUTPUT_NAME], ort_feed(session, b))[0]))
        for b in batches(data, batch_size, pad_id)
    ]
    return torch.cat(out).float()


def ort_latency(
    session: onnxruntime.InferenceSession,
    data: Encoded,
    batch_size: int,
    pad_id: int,
    n_batches: int,
    warmup: int,
) -> float:
    """Median seconds per example of the session at ``batch_size``
    (:func:`~kd_engine.evaluation.median_seconds_per_example`)."""
    return median_seconds_per_example(
        lambda feed: session.run([OUTPUT_NAME], feed),
        lambda batch: ort_feed(session, batch),
        data,
        batch_size,
        pad_id,
        n_batches,
        warmup,
    )


def quantize_int8(src: Path, dst: Path) -> None:
    """Write ``dst``: ``src`` with onnxruntime's dynamic quantisation (int8 weights of its
    MatMul/Gather/... nodes; activations quantised at run time, per tensor).

    Raises:
        Exception: what onnxruntime's quantiser raises.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(src, dst, weight_type=QuantType.QInt8)


@dataclass(frozen=True)
class _Fp32:
    """What the fp32 checks found, shared with the int8 report."""

    pytorch_logits: torch.Tensor
    threads: int


def _agreement_or_none(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """:func:`~kd_engine.evaluation.agreement`; None for one-output (regression) logits."""
    return None if a.shape[-1] == 1 else agreement(a, b)


def _latencies(
    session: onnxruntime.InferenceSession, data: Encoded, pad_id: int
) -> dict[int, float]:
    return {
        b: ort_latency(session, data, b, pad_id, n, warm)
        for b, (n, warm) in LATENCY_PROTOCOL.items()
    }


def _int8_report(
    fp32_path: Path, int8_path: Path, data: Encoded, pad_id: int, batch_size: int, fp32: _Fp32
) -> dict[str, Any]:
    quantize_int8(fp32_path, int8_path)
    session = ort_session(int8_path, fp32.threads)
    logits = ort_logits(session, data, batch_size, pad_id)
    latency = _latencies(session, data, pad_id)
    return {
        "file": INT8_FILE,
        "bytes": int8_path.stat().st_size,
        "test": task_metrics(logits, data.labels),
        "agreement_with_fp32": _agreement_or_none(fp32.pytorch_logits, logits),
        "latency_s_batch1": latency[1],
        "latency_s_batch32": latency[32],
    }


def _fp32_report(
    model: PreTrainedModel,
    path: Path,
    data: Encoded,
    pad_id: int,
    batch_size: int,
    threads: int,
) -> tuple[dict[str, Any], _Fp32]:
    export_onnx(model, sample_inputs(data, pad_id), path)
    session = ort_session(path, threads)
    pytorch = predict_logits(model, data, batch_size, pad_id, CPU)
    ort = ort_logits(session, data, batch_size, pad_id)
    ort_latency_s = _latencies(session, data, pad_id)
    torch_latency_s = {
        b: latency_per_example(model, data, b, pad_id, CPU, n, warm)
        for b, (n, warm) in LATENCY_PROTOCOL.items()
    }
    report = {
        "opset": OPSET,
        "file": ONNX_FILE,
        "bytes": path.stat().st_size,
        "max_abs_diff_logits": float((pytorch - ort).abs().max()),
        "prediction_agreement": _agreement_or_none(pytorch, ort),
        "latency_s_batch1": {"pytorch": torch_latency_s[1], "onnxruntime": ort_latency_s[1]},
        "latency_s_batch32": {"pytorch": torch_latency_s[32], "onnxruntime": ort_latency_s[32]},
        "int8": None,
    }
    return report, _Fp32(pytorch, threads)


def export_report(
    model: PreTrainedModel,
    data: Encoded,
    pad_id: int,
    out_dir: Path,
    settings: ExportSpec,
    batch_size: int = 64,
    warn: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Export ``model`` to ``out_dir/model.onnx`` (and ``model.int8.onnx`` with
    ``settings.int8``), check it on ``data`` (the test split) and return ``metrics.json``'s
    ``onnx`` block. Never raises for a failed export.

    ``model`` is moved to the CPU (and keeps the train/eval mode it came in). Returns:

    - ``{"skipped": reason}`` when ``settings.onnx`` is false;
    - ``{"error": "<type>: <message>"}`` when the export or its check failed (``warn`` is
      called with the reason; no file is left);
    - otherwise ``opset``, ``file`` (``model.onnx``), ``bytes``, ``max_abs_diff_logits``
      (max over the test split of |PyTorch fp32 logit - onnxruntime logit|),
      ``prediction_agreement`` (fraction of test rows whose argmax agrees; None for a
      one-output regression model), ``latency_s_batch1`` and ``latency_s_batch32``
      (``{"pytorch": s, "onnxruntime": s}``: median seconds per example on the CPU) and
      ``int8``: None, or ``file`` (``model.int8.onnx``), ``bytes``, ``test``
      (:func:`~kd_engine.evaluation.task_metrics` of its logits), ``agreement_with_fp32``
      (argmax agreement with the PyTorch fp32 student; None for regression),
      ``latency_s_batch1``, ``latency_s_batch32``; or ``{"error": ...}`` when only the
      quantisation failed (``warn`` is called; ``model.onnx`` is kept). A max difference
      above :data:`PARITY_WARNING` is also a warning.

    Args:
        model: the student (a transformers sequence classifier, or a BiLSTM/CNN student).
        data: the encoded test split (at least one row).
        pad_id: the tokenizer's padding id.
        out_dir: the job's output directory.
        settings: the job spec's ``export`` section.
        batch_size: batch size of the test-split passes (the job's ``eval_batch_size``).
        warn: called with each warning's message.
    """
    if not settings.onnx:
        return {"skipped": "export.onnx is false"}
    model.to(CPU)  # type: ignore[arg-type]
    was_training = model.training
    threads = torch.get_num_threads()
    out_dir.mkdir(parents=True, exist_ok=True)
    # Written in a hidden folder of out_dir and moved into place once checked: a failure
    # leaves nothing behind (the folder goes with the TemporaryDirectory).
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".onnx-") as tmp:
        fp32_tmp, int8_tmp = Path(tmp) / ONNX_FILE, Path(tmp) / INT8_FILE
        try:
            report, fp32 = _fp32_report(model, fp32_tmp, data, pad_id, batch_size, threads)
        except Exception as e:
            reason = f"{type(e).__name__}: {e}"
            warn(f"ONNX export failed, model.onnx not written: {reason}")
            return {"error": reason}
        finally:
            model.train(was_training)
        if report["max_abs_diff_logits"] > PARITY_WARNING:
            warn(
                f"model.onnx: its logits differ from PyTorch's by up to "
                f"{report['max_abs_diff_logits']:.3g} on the test split"
            )
        if settings.int8:
            try:
                report["int8"] = _int8_report(fp32_tmp, int8_tmp, data, pad_id, batch_size, fp32)
            except Exception as e:
                reason = f"{type(e).__name__}: {e}"
                warn(f"int8 quantisation failed, model.int8.onnx not written: {reason}")
                report["int8"] = {"error": reason}
        int8_ok = isinstance(report["int8"], dict) and "error" not in report["int8"]
        try:
            # os.replace, not shutil.move: a folder of that name is an error, not a target.
            os.replace(fp32_tmp, out_dir / ONNX_FILE)
            if int8_ok:
                os.replace(int8_tmp, out_dir / INT8_FILE)
        except OSError as e:
            for name in (ONNX_FILE, INT8_FILE):
                if (out_dir / name).is_file():
                    (out_dir / name).unlink()
            reason = f"{type(e).__name__}: {e}"
            warn(f"ONNX export failed, model.onnx not written: {reason}")
            return {"error": reason}
    return report
