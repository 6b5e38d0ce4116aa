"""Loading checkpoints (safetensors only, never remote code) and their tokenizers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

SUPPORTED_MODEL_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert")
REGRESSION = "regression"  # transformers' problem_type of a one-output (MSE) model
REGRESSION_OUTPUT = ["LABEL_0"]  # the output's name: transformers' default for num_labels 1


def read_config(path: str | Path) -> dict[str, object]:
    """The checkpoint's ``config.json`` as a dict (local directory or hub id).

    Raises:
        ValueError: no readable config.json.
    """
    local = Path(path)
    if local.is_dir():
        cfg_file = local / "config.json"
        if not cfg_file.is_file():
            raise ValueError(f"{local} holds no config.json: not a transformers checkpoint")
        try:
            data = json.loads(cfg_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{cfg_file}: invalid JSON ({e.msg})") from None
        except RecursionError:
            raise ValueError(f"{cfg_file}: JSON nested too deeply to be read") from None
        if not isinstance(data, dict):
            raise ValueError(f"{cfg_file}: expected a JSON object")
        return data
    return AutoConfig.from_pretrained(str(path), trust_remote_code=False).to_dict()


def is_sequence_classifier(config: dict[str, object]) -> bool:
    """True when the checkpoint was saved as a sequence classifier (it has a trained head)."""
    archs = config.get("architectures") or []
    return isinstance(archs, list) and any(
        str(a).endswith("ForSequenceClassification") for a in archs
    )


def classifier_label_names(config: dict[str, object]) -> list[str]:
    """Label names of a classifier checkpoint, ordered by class id."""
    id2label = config.get("id2label") or {}
    if not isinstance(id2label, dict):
        return []
    return [str(id2label[k]) for k in sorted(id2label, key=lambda k: int(k))]


def teacher_task(config: dict[str, object]) -> Literal["classification", "regression"] | None:
    """The task a checkpoint was fine-tuned for; None for a base encoder (no trained head).

    Regression is transformers' convention: ``problem_type`` ``regression``, or one output
    (``num_labels`` 1, i.e. one ``id2label`` entry) without a problem type, which
    ``*ForSequenceClassification`` trains with MSE.
    """
    if not is_sequence_classifier(config):
        return None
    problem = config.get("problem_type")
    if problem == "regression":
        return "regression"
    if problem is None and len(classifier_label_names(config)) == 1:
        return "regression"
    return "classification"


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer (fast when available).

    Raises:
        ValueError: the checkpoint has no tokenizer files.
    """
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot load a tokenizer from {path}: {e}") from None


def load_classifier(
    path: str | Path, label_names: list[str], dtype: torch.dtype = torch.float32
) -> PreTrainedModel:
    """Load a sequence classifier from safetensors weights, with ``len(label_names)`` outputs.

    A base encoder (no classifier head) gets a new, randomly initialised head; a classifier's
    own head is kept (its labels must already match, see :func:`kd_engine.data.relabel`).
    One label name means a regression model: one output, ``problem_type`` ``regression`` in
    its config (kept when it is saved).

    Raises:
        ValueError: unsupported architecture, or no safetensors weights.
    """
    config = read_config(path)
    model_type = str(config.get("model_type"))
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    local = Path(path)
    if local.is_dir() and not any(local.glob("*.safetensors")):
        raise ValueError(f"{path} has no .safetensors weights (pickle checkpoints are refused)")
    # Config overrides as one typed mapping: transformers 5.25 types from_pretrained's keyword
    # arguments, and a `**{...}` of str values no longer type-checks against them.
    overrides: dict[str, Any] = {
        "num_labels": len(label_names),
        "id2label": dict(enumerate(label_names)),
        "label2id": {n: i for i, n in enumerate(label_names)},
    }
    if len(label_names) == 1:
        overrides["problem_type"] = REGRESSION
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(path),
            **overrides,
            use_safetensors=True,
            trust_remote_code=False,
            dtype=dtype,
        )
    except OSError as e:
        raise ValueError(f"cannot load model weights from {path}: {e}") from None
    return model
