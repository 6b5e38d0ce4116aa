"""A reusable cache of the frozen teacher's logits on the transfer set.

The training loop runs the teacher (frozen, in eval mode: no dropout) on every batch of every
epoch. For a method that needs only the teacher's *logits* on the un-augmented batch (see
:func:`eligible`), those are the same every epoch: this module computes them once, in one pass
over the transfer set in length order (batches of ``training.eval_batch_size``, so that little
padding is computed), keeps them as a float32 (N, C) tensor in a safetensors file, and serves
them per batch by example id (:meth:`TeacherCache.logits_for`).

Exactness: with attention masks, a padded position changes a real token's output only through
floating-point summation order, so a cached logit differs from the one a live forward of a
differently padded batch gives by float rounding (max abs diff ~1e-6 in float32 on the CPU; the
tests check <= 1e-5). On CUDA with bf16 autocast the cache is computed under the same autocast
as training and the key records the precision.

The artifact is keyed by :func:`cache_key` (teacher weights, transfer set, tokenizer,
``max_length``, precision): a second job with the same teacher and data, a sweep, or a resumed
job reuses it through :func:`load_or_build` and a :class:`CacheStore` (the worker's keeps it in
the artifact store, tenant-scoped). A file that does not verify (unreadable, another key, a
checksum or shape mismatch, non-finite values) is rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kd_engine import names
from kd_engine.data.batching import Encoded, collate
from kd_engine.evaluation import model_inputs
from kd_engine.methods.base import Method

log = logging.getLogger("kd_engine.teacher_cache")

CACHE_FILE = names.CACHE_FILE
"""The cache's file inside its directory."""
FORMAT = "1"
"""Version of the file's layout; part of the key."""


def eligible(method: Method | type[Method]) -> bool:
    """True when the loop's teacher forward on the un-augmented batch gives ``method`` only the
    teacher's logits: it uses the teacher and needs neither hidden states nor attention maps.

    An augmentation method (MATE-KD, Minimax-kNN, ...) is eligible: its un-augmented batch's
    teacher logits come from the cache, while the teacher still runs live on the augmented
    inputs (and in the method's own generator steps)."""
    return bool(
        method.needs.teacher and not method.needs.hidden_states and not method.needs.attentions
    )


def precision(device: torch.device) -> str:
    """``bf16`` where the loop runs under bf16 autocast (CUDA with bf16), else ``fp32``."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 (hex) over the model's loaded weights: each state-dict entry's name, dtype, shape
    and bytes, in name order. It covers what the files give and what loading did to them (a new
    classifier head drawn with the job's seed, the label order applied)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def data_hash(data: Encoded) -> str:
    """sha256 (hex) over the transfer set's example ids and token ids (and token type ids)."""
    h = hashlib.sha256()
    h.update(json.dumps(data.ids).encode())
    h.update(json.dumps(data.input_ids, separators=(",", ":")).encode())
    if data.token_type_ids is not None:
        h.update(json.dumps(data.token_type_ids, separators=(",", ":")).encode())
    return h.hexdigest()


def tokenizer_hash(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 (hex) over the tokenizer's class name and vocabulary (token -> id)."""
    vocab = sorted(tokenizer.get_vocab().items())
    body = json.dumps([type(tokenizer).__name__, vocab], separators=(",", ":"))
    return hashlib.sha256(body.encode()).hexdigest()


def cache_key(
    teacher: torch.nn.Module,
    data: Encoded,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    device: torch.device,
) -> str:
    """The cache's key: sha256 (hex, 64 characters) over :func:`weights_hash` of the teacher,
    :func:`data_hash` of the transfer set, :func:`tokenizer_hash`, ``max_length``, the
    :func:`precision` of ``device`` and the file :data:`FORMAT`. Stable across processes and
    machines for the same inputs; any change of them gives another key."""
    parts = {
        "format": FORMAT,
        "teacher": weights_hash(teacher),
        "data": data_hash(data),
        "tokenizer": tokenizer_hash(tokenizer),
        "max_length": int(max_length),
        "precision": precision(device),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass
class TeacherCache:
    """The teacher's logits on every example of the transfer set.

    Attributes:
        key: the :func:`cache_key` it was built for.
        ids: (N,) int64 example ids, sorted ascending.
        logits: (N, C) float32 logits, row i for ``ids[i]``.
        status: ``hit`` (read from a stored file), ``built`` (computed now) or ``rebuilt``
            (a stored file was corrupt and was computed again).
        build_seconds: seconds spent computing it (0.0 on a hit).
        warning: why a stored file was not trusted (status ``rebuilt``), else ''.
    """

    key: str
    ids: torch.Tensor
    logits: torch.Tensor
    status: str = "built"
    build_seconds: float = 0.0
    warning: str = ""

    def __post_init__(self) -> None:
        self._device_logits: dict[torch.device, torch.Tensor] = {}

    def __len__(self) -> int:
        return int(self.ids.numel())

    def logits_for(self, example_ids: torch.Tensor, device: torch.device) -> torch.Tensor:
        """The cached logits (B, C) float32 of a batch's ``example_ids`` (B,), on ``device``.

        Raises:
            KeyError: an id is not in the cache (the cache is of another transfer set).
        """
        rows = torch.searchsorted(self.ids, example_ids.to("cpu"))
        rows = rows.clamp(max=len(self) - 1)
        if not torch.equal(self.ids[rows], example_ids.to("cpu")):
            raise KeyError("the teacher cache does not hold every example id of the batch")
        table = self._device_logits.get(device)
        if table is None:
            table = self._device_logits.setdefault(device, self.logits.to(device))
        return table.index_select(0, rows.to(device))

    def report(self) -> dict[str, object]:
        """What ``metrics.json`` records (``teacher_cache``)."""
        return {
            "status": self.status,
            "build_seconds": round(self.build_seconds, 3),
            "key": self.key,
            "examples": len(self),
        }


class CacheStore(Protocol):
    """Where built caches are kept between jobs (the worker's: the artifact store)."""

    def fetch(self, key: str, directory: Path) -> bool:
        """Copy the cache stored under ``key`` into ``directory`` (as :data:`CACHE_FILE`);
        False when none is stored."""
        ...

    def store(self, key: str, directory: Path) -> None:
        """Keep ``directory``'s cache file under ``key`` (replacing one stored there)."""
        ...


@torch.inference_mode()
def compute_logits(
    teacher: PreTrainedModel,
    data: Encoded,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    on_batch: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """The teacher's logits (N, C) float32 on the CPU, row i for example row i of ``data``,
    computed in eval mode in batches of ``batch_size`` taken in length order (little padding),
    under the autocast the training loop uses on ``device``. ``on_batch(done, total)`` is
    called after each batch (batches done, batches in all)."""
    was_training = teacher.training
    teacher.to(device).eval()  # type: ignore[arg-type]
    order = sorted(range(len(data)), key=lambda r: len(data.input_ids[r]))
    out: torch.Tensor | None = None
    use_bf16 = precision(device) == "bf16"
    num_batches = -(-len(order) // batch_size)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = collate(data, rows, pad_id)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            logits = teacher(**model_inputs(batch, device)).logits.float().cpu()
        if out is None:
            out = torch.empty((len(data), logits.shape[-1]), dtype=torch.float32)
        out[torch.tensor(rows)] = logits
        if on_batch is not None:
            on_batch(start // batch_size + 1, num_batches)
    teacher.train(was_training)
    assert out is not None, "an empty transfer set has no teacher logits"
    return out


def _checksum(ids: torch.Tensor, logits: torch.Tensor) -> str:
    h = hashlib.sha256(ids.contiguous().numpy().tobytes())
    h.update(logits.contiguous().numpy().tobytes())
    return h.hexdigest()


def save(cache: TeacherCache, directory: Path) -> Path:
    """Write ``cache`` to ``directory/CACHE_FILE`` (key, format and a sha256 of the tensors in
    the file's metadata); returns the file's path."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / CACHE_FILE
    tmp = directory / f".{CACHE_FILE}.tmp"
    meta = {"key": cache.key, "format": FORMAT, "sha256": _checksum(cache.ids, cache.logits)}
    save_file({"ids": cache.ids, "logits": cache.logits}, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


class CorruptCache(Exception):
    """A cache file that does not verify (the reason is the message)."""


def load(directory: Path, key: str, data: Encoded) -> TeacherCache:
    """Read and verify the cache in ``directory`` for ``key`` and the transfer set ``data``.

    Raises:
        FileNotFoundError: there is no cache file.
        CorruptCache: the file is unreadable, of another key or format, its tensors do not
            match their checksum, its ids are not ``data``'s, or it holds non-finite values.
    """
    path = directory / CACHE_FILE
    if not path.is_file():
        raise FileNotFoundError(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CorruptCache(f"unreadable: {e}") from e
    if meta.get("key") != key or meta.get("format") != FORMAT:
        raise CorruptCache("the file is of another key or format")
    ids, logits = tensors.get("ids"), tensors.get("logits")
    if ids is None or logits is None or logits.ndim != 2 or ids.shape != (logits.shape[0],):
        raise CorruptCache("missing or misshapen tensors")
    if ids.dtype != torch.int64 or logits.dtype != torch.float32:
        raise CorruptCache("unexpected dtypes")
    if meta.get("sha256") != _checksum(ids, logits):
        raise CorruptCache("checksum mismatch")
    if not torch.equal(ids, torch.tensor(sorted(data.ids), dtype=torch.int64)):
        raise CorruptCache("its example ids are not the transfer set's")
    if not bool(torch.isfinite(logits).all()):
        raise CorruptCache("non-finite logits")
    return TeacherCache(key, ids, logits, status="hit")


def build(
    key: str,
    teacher: PreTrainedModel,
    data: Encoded,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    on_batch: Callable[[int, int], None] | None = None,
) -> TeacherCache:
    """Compute the cache (:func:`compute_logits`, which calls ``on_batch``), ids sorted
    ascending.

    Raises:
        ValueError: ``data``'s example ids are not unique (they could not address rows).
    """
    started = time.perf_counter()
    ids = torch.tensor(data.ids, dtype=torch.int64)
    if ids.unique().numel() != ids.numel():
        raise ValueError("the transfer set's example ids are not unique")
    logits = compute_logits(teacher, data, batch_size, pad_id, device, on_batch)
    order = torch.argsort(ids)
    seconds = time.perf_counter() - started
    return TeacherCache(key, ids[order].contiguous(), logits[order].contiguous(), "built", seconds)


def load_or_build(
    directory: Path,
    key: str,
    teacher: PreTrainedModel,
    data: Encoded,
    batch_size: int,
    pad_id: int,
    device: torch.device,
    store: CacheStore | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> TeacherCache:
    """The cache for ``key``: read from ``directory`` (first fetched there from ``store`` when
    given) when a verified file is there (status ``hit``); else built and written to
    ``directory`` (and kept in ``store``): status ``built``, or ``rebuilt`` with a logged
    warning when a file was there but did not verify (it is never trusted). A build calls
    ``on_batch(done, total)`` after each batch of teacher forward passes.

    Raises:
        ValueError: the transfer set's example ids are not unique.
    """
    corrupt = ""
    fetched = store.fetch(key, directory) if store is not None else False
    if fetched or (directory / CACHE_FILE).is_file():
        try:
            return load(directory, key, data)
        except CorruptCache as e:
            corrupt = str(e)
            log.warning("teacher cache %s is corrupt (%s); rebuilding it", key[:12], e)
        except FileNotFoundError:
            pass
    cache = build(key, teacher, data, batch_size, pad_id, device, on_batch)
    if corrupt:
        cache.status = "rebuilt"
        cache.warning = f"the stored teacher cache was corrupt ({corrupt}); it was rebuilt"
    save(cache, directory)
    if store is not None:
        store.store(key, directory)
    return cache


def off_report(reason: str) -> dict[str, object]:
    """``metrics.json``'s ``teacher_cache`` for a job that did not use one."""
    return {"status": "off", "reason": reason, "build_seconds": 0.0}


__all__ = [
    "CACHE_FILE",
    "CacheStore",
    "CorruptCache",
    "TeacherCache",
    "build",
    "cache_key",
    "compute_logits",
    "data_hash",
    "eligible",
    "load",
    "load_or_build",
    "off_report",
    "precision",
    "save",
    "tokenizer_hash",
    "weights_hash",
]
