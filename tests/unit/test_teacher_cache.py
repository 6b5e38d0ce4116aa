"""The teacher-output cache (kd_engine/teacher_cache.py) with the real MiniLM-L6 and real
rotten_tomatoes data on the CPU: its key, its exactness against live forwards, training with it
against training without it, the teacher forward it saves, and corrupt files rebuilt."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_engine import registry
from kd_engine.data import TransferSet
from kd_engine.data.batching import Encoded, collate, encode
from kd_engine.evaluation import model_inputs, predict_logits, task_metrics
from kd_engine.methods.vanilla_kd import VanillaKD, VanillaKDConfig
from kd_engine.models.shapes import shape_from_config
from kd_engine.models.student import student_from_teacher
from kd_engine.run import METRICS_FILE, run_job
from kd_engine.spec import JobSpec, TrainingSpec
from kd_engine.teacher_cache import (
    CACHE_FILE,
    TeacherCache,
    build,
    cache_key,
    eligible,
    load,
    load_or_build,
)
from kd_engine.trainer import train
from tests.checks import NO_EXTRAS

CPU = torch.device("cpu")
PAD = 0
MAX_LEN = 32


@pytest.fixture(scope="module")
def train_enc(rotten_tomatoes: TransferSet, tokenizer: PreTrainedTokenizerBase) -> Encoded:
    return encode(rotten_tomatoes.train[:48], tokenizer, MAX_LEN)


@pytest.fixture(scope="module")
def dev_enc(rotten_tomatoes: TransferSet, tokenizer: PreTrainedTokenizerBase) -> Encoded:
    return encode(rotten_tomatoes.dev[:32], tokenizer, MAX_LEN)


class ForwardCounter:
    """Counts a model's forward calls with a torch forward hook (observing, not replacing)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self.calls += 1

    def close(self) -> None:
        self.handle.remove()


def key(teacher: torch.nn.Module, data: Encoded, tok: PreTrainedTokenizerBase, n: int) -> str:
    return cache_key(teacher, data, tok, n, CPU)


def test_the_key_is_stable_and_changes_with_weights_data_tokenizer_and_length(
    minilm_classifier: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_enc: Encoded,
    rotten_tomatoes: TransferSet,
) -> None:
    base = key(minilm_classifier, train_enc, tokenizer, MAX_LEN)
    assert len(base) == 64
    # Stable: again, and for an equal copy of the teacher and of the data.
    assert key(minilm_classifier, train_enc, tokenizer, MAX_LEN) == base
    twin = copy.deepcopy(minilm_classifier)
    same_data = encode(rotten_tomatoes.train[:48], tokenizer, MAX_LEN)
    assert key(twin, same_data, tokenizer, MAX_LEN) == base
    # One weight of the teacher changed.
    with torch.no_grad():
        twin.get_parameter("classifier.weight")[0, 0] += 1e-3
    assert key(twin, train_enc, tokenizer, MAX_LEN) != base
    # The data: one example fewer, or one token changed.
    fewer = encode(rotten_tomatoes.train[:47], tokenizer, MAX_LEN)
    assert key(minilm_classifier, fewer, tokenizer, MAX_LEN) != base
    ids = [list(row) for row in train_enc.input_ids]
    ids[3][1] += 1
    changed = Encoded(ids, train_enc.token_type_ids, train_enc.labels, train_enc.ids)
    assert key(minilm_classifier, changed, tokenizer, MAX_LEN) != base
    # max_length (the same token ids) and the tokenizer's vocabulary.
    assert key(minilm_classifier, train_enc, tokenizer, MAX_LEN + 1) != base
    tok2 = copy.deepcopy(tokenizer)
    tok2.add_tokens(["zzqxcachetoken"])
    assert key(minilm_classifier, train_enc, tok2, MAX_LEN) != base


def test_cached_logits_equal_a_live_forward_of_each_example(
    minilm_classifier: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, train_enc: Encoded
) -> None:
    cache = build("k", minilm_classifier, train_enc, 16, PAD, CPU)
    assert cache.logits.shape == (48, 2) and cache.logits.dtype == torch.float32
    # Each example alone (no padding at all) against its cached row, served by id.
    with torch.inference_mode():
        live = torch.cat(
            [
                minilm_classifier(**model_inputs(collate(train_enc, [r], PAD), CPU)).logits
                for r in range(len(train_enc))
            ]
        )
    served = cache.logits_for(torch.tensor(train_enc.ids), CPU)
    assert (served - live).abs().max().item() <= 1e-5
    # A shuffled batch's ids get their own rows.
    perm = torch.randperm(len(train_enc), generator=torch.Generator().manual_seed(1))[:16]
    ids = torch.tensor(train_enc.ids)[perm]
    assert torch.equal(cache.logits_for(ids, CPU), served[perm])
    with pytest.raises(KeyError):
        cache.logits_for(torch.tensor([10**9]), CPU)


def test_only_logit_methods_are_eligible() -> None:
    use = {n for n in registry.names() if eligible(registry.get(n).method_cls)}
    assert {"vanilla_kd", "annealing_kd", "mate_kd", "minimax_knn", "combined_kd"} <= use
    assert not use & {"finetune", "teacher_free", "tinybert", "pkd", "crd", "alp_kd", "cilda"}


def _train(
    teacher: PreTrainedModel,
    train_enc: Encoded,
    dev_enc: Encoded,
    cache: TeacherCache | None,
) -> tuple[PreTrainedModel, int]:
    torch.manual_seed(0)
    student = student_from_teacher(teacher, [0, 5])
    shape = shape_from_config(teacher.config.to_dict(), 2)
    method = VanillaKD(VanillaKDConfig(alpha=0.5, temperature=2.0), shape, shape)
    cfg = TrainingSpec(epochs=2, batch_size=16, max_seq_length=MAX_LEN, seed=3, device="cpu")
    counter = ForwardCounter(teacher)
    try:
        train(student, teacher, method, train_enc, dev_enc, cfg, PAD, CPU, teacher_cache=cache)
    finally:
        counter.close()
    return student, counter.calls


def test_training_with_the_cache_equals_training_without_and_skips_the_teacher(
    minilm_classifier: PreTrainedModel, train_enc: Encoded, dev_enc: Encoded
) -> None:
    live, live_calls = _train(minilm_classifier, train_enc, dev_enc, None)
    cache = build("k", minilm_classifier, train_enc, 64, PAD, CPU)
    cached, cached_calls = _train(minilm_classifier, train_enc, dev_enc, cache)
    assert live_calls == 2 * 3  # two epochs of three batches
    assert cached_calls == 0  # the teacher never ran during training
    a, b = live.state_dict(), cached.state_dict()
    diff = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert diff <= 1e-4, diff
    metrics = [
        task_metrics(predict_logits(m, dev_enc, 64, PAD, CPU), dev_enc.labels)
        for m in (live, cached)
    ]
    assert metrics[0] == metrics[1]


def test_load_or_build_hits_and_rebuilds_a_corrupt_file(
    minilm_classifier: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    train_enc: Encoded,
    tmp_path: Path,
) -> None:
    k = key(minilm_classifier, train_enc, tokenizer, MAX_LEN)
    counter = ForwardCounter(minilm_classifier)
    try:
        first = load_or_build(tmp_path, k, minilm_classifier, train_enc, 16, PAD, CPU)
        assert (first.status, counter.calls) == ("built", 3)  # 48 examples, batches of 16
        assert first.build_seconds > 0
        second = load_or_build(tmp_path, k, minilm_classifier, train_enc, 16, PAD, CPU)
        assert (second.status, second.build_seconds, counter.calls) == ("hit", 0.0, 3)
        assert torch.equal(second.logits, first.logits)
        path = tmp_path / CACHE_FILE
        good = path.read_bytes()

        # Bytes of the logits flipped: the checksum catches it.
        bad = bytearray(good)
        bad[-8] ^= 0xFF
        path.write_bytes(bytes(bad))
        again = load_or_build(tmp_path, k, minilm_classifier, train_enc, 16, PAD, CPU)
        assert again.status == "rebuilt" and "checksum" in again.warning
        assert counter.calls == 6
        assert torch.equal(again.logits, first.logits)
        # The rebuilt file replaced the corrupt one.
        assert torch.equal(load(tmp_path, k, train_enc).logits, first.logits)
        # Truncated, then garbage.
        for broken in (good[: len(good) // 2], b"not a safetensors file"):
            path.write_bytes(broken)
            result = load_or_build(tmp_path, k, minilm_classifier, train_enc, 16, PAD, CPU)
            assert result.status == "rebuilt"
        # A valid file of another key is not trusted either.
        other = tmp_path / "other"
        other.mkdir()
        shutil.copy(path, other / CACHE_FILE)
        result = load_or_build(other, "0" * 64, minilm_classifier, train_enc, 16, PAD, CPU)
        assert result.status == "rebuilt" and "another key" in result.warning
    finally:
        counter.close()


class FolderStore:
    """A :class:`kd_engine.teacher_cache.CacheStore` in a local folder (one subfolder per key),
    recording what it was asked."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.stored: list[str] = []

    def fetch(self, key: str, directory: Path) -> bool:
        src = self.root / key / CACHE_FILE
        if not src.is_file():
            return False
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copy(src, directory / CACHE_FILE)
        return True

    def store(self, key: str, directory: Path) -> None:
        (self.root / key).mkdir(parents=True, exist_ok=True)
        shutil.copy(directory / CACHE_FILE, self.root / key / CACHE_FILE)
        self.stored.append(key)


def test_run_job_builds_then_hits_and_reports_it(tmp_path: Path, minilm_path: Path) -> None:
    def no_files(ref: str) -> Path:
        raise ValueError(ref)

    small: dict[str, Any] = {
        "dataset": {
            "source": "builtin:rotten_tomatoes",
            "max_train_examples": 24,
            "max_eval_examples": 32,
        },
        "training": {"epochs": 1, "batch_size": 8, "max_seq_length": 16, "device": "cpu"},
        "export": NO_EXTRAS,  # not about export (tests/unit/test_onnx_export.py is)
    }
    teacher_dir = tmp_path / "teacher"
    finetune = JobSpec.model_validate(
        {
            "teacher": "builtin:minilm-l6",
            "method": {"name": "finetune"},
            **small,
            "training": {**small["training"], "max_steps": 1},
        }
    )
    m = run_job(finetune, minilm_path, no_files, teacher_dir).metrics
    assert m["teacher_cache"]["status"] == "off"  # finetune has no teacher to cache

    body = {"teacher": "job:t", "student": {"num_layers": 1}, "method": {"name": "vanilla_kd"}}
    spec = JobSpec.model_validate({**body, **small})
    store = FolderStore(tmp_path / "store")
    first = run_job(spec, teacher_dir, no_files, tmp_path / "a", teacher_cache_store=store)
    second = run_job(spec, teacher_dir, no_files, tmp_path / "b", teacher_cache_store=store)
    built, hit = first.metrics["teacher_cache"], second.metrics["teacher_cache"]
    assert (built["status"], hit["status"]) == ("built", "hit")
    assert built["build_seconds"] > 0 and hit["build_seconds"] == 0.0
    assert built["key"] == hit["key"] and built["examples"] == 24
    assert store.stored == [built["key"]]  # built once, stored once
    assert first.metrics["test"] == second.metrics["test"]
    assert (tmp_path / "b" / METRICS_FILE).read_text().count('"hit"') == 1
    assert not list((tmp_path / "b").rglob(CACHE_FILE))  # never published with the student

    off = {**body, **small, "training": {**small["training"], "teacher_cache": False}}
    m = run_job(JobSpec.model_validate(off), teacher_dir, no_files, tmp_path / "c").metrics
    assert m["teacher_cache"]["status"] == "off"
    # Off, the teacher runs live: the same test metrics (logits equal up to float rounding).
    assert m["test"] == first.metrics["test"]
