"""Shared fixtures of the kd_engine unit tests: the built-in MiniLM checkpoint, its tokenizer,
and the built-in rotten_tomatoes transfer set (all real, all CPU)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_engine.data.builtins import load_builtin
from kd_engine.data.examples import TransferSet
from kd_engine.models.loading import load_classifier, load_tokenizer
from kd_engine.references import builtin_model_path

transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Directory of the built-in MiniLM-L6 base encoder (no classifier head)."""
    return builtin_model_path("minilm-l6")


@pytest.fixture(scope="session")
def tokenizer(minilm_path: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(minilm_path)


@pytest.fixture(scope="session")
def rotten_tomatoes() -> TransferSet:
    return load_builtin("rotten_tomatoes")


@pytest.fixture(scope="session")
def minilm_classifier(minilm_path: Path) -> PreTrainedModel:
    """MiniLM-L6 with a new (seeded, random) 2-way head for rotten/fresh. Tests must not train
    it in place: it is shared by the whole session."""
    torch.manual_seed(0)
    return load_classifier(minilm_path, ["rotten", "fresh"]).eval()
