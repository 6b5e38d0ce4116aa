"""Mapping the weights of a BERT encoder exported to ONNX back into a transformers BertModel.

Used once per machine to make the built-in ``minilm-l3`` (paraphrase-MiniLM-L3-v2, shipped only
as ONNX) a safetensors checkpoint. Named initialisers (embeddings, biases, LayerNorms) keep their
PyTorch names; the exporter renames the Linear weights (``onnx::MatMul_N``, stored transposed as
(in, out)), so each one is identified by the bias its MatMul's output is added to.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import torch
from onnx import numpy_helper
from safetensors.torch import save_file

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def onnx_bert_state_dict(onnx_path: Path, prefix: str) -> dict[str, torch.Tensor]:
    """Tensors of a BERT ONNX export, renamed to ``bert.*`` keys of BertForSequenceClassification.

    Args:
        onnx_path: the .onnx file.
        prefix: the exporter's name prefix before ``embeddings.``/``encoder.``
            (``model.0.auto_model.`` for sentence-transformers exports).

    Raises:
        ValueError: a MatMul weight whose bias cannot be found (not a BERT export).
    """
    graph = onnx.load(str(onnx_path)).graph
    arrays = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    out: dict[str, torch.Tensor] = {}
    for name, array in arrays.items():
        if name.startswith(prefix):
            out["bert." + name.removeprefix(prefix)] = torch.from_numpy(array.copy())
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays or node.input[1] in out:
            continue
        weight = node.input[1]
        if weight.startswith(prefix):
            continue
        biases = [
            i
            for n in consumers.get(node.output[0], [])
            if n.op_type == "Add"
            for i in n.input
            if i.startswith(prefix) and i.endswith(".bias")
        ]
        if len(biases) != 1:
            raise ValueError(f"{onnx_path.name}: cannot name MatMul weight {weight}")
        key = "bert." + biases[0].removeprefix(prefix).removesuffix(".bias") + ".weight"
        out[key] = torch.from_numpy(arrays[weight].T.copy())  # (in, out) -> Linear's (out, in)
    return out


def convert_onnx_bert(
    onnx_path: Path, prefix: str, base_dir: Path, num_layers: int, dest: Path
) -> Path:
    """Write a transformers BERT directory (config, safetensors, tokenizer) to ``dest``.

    The config and tokenizer come from ``base_dir`` (a checkpoint with the same vocabulary and
    widths), with ``num_hidden_layers = num_layers``. The pooler is not in a sentence-embedding
    export, so a classifier built from it starts with a new pooler and head. Written to a
    temporary directory and renamed, so a concurrent reader never sees half a checkpoint.

    Raises:
        ValueError: the export has different layers or widths than the config says.
    """
    state = onnx_bert_state_dict(onnx_path, prefix)
    config = json.loads((base_dir / "config.json").read_text(encoding="utf-8"))
    config.update({"num_hidden_layers": num_layers, "architectures": ["BertModel"]})
    config.pop("_name_or_path", None)
    expected = 5 + 16 * num_layers  # embeddings (3 + LayerNorm 2) + 16 tensors per layer
    if len(state) != expected:
        raise ValueError(f"{onnx_path.name}: {len(state)} tensors, expected {expected}")
    if state["bert.embeddings.word_embeddings.weight"].shape[1] != config["hidden_size"]:
        raise ValueError(f"{onnx_path.name}: hidden size differs from {base_dir}/config.json")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}-"))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        for name in TOKENIZER_FILES:
            if (base_dir / name).is_file():
                shutil.copy(base_dir / name, tmp / name)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished first
            if not (dest / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest
