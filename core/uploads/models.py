"""An uploaded model: a tar or zip of a transformers directory, checked before anything reads
it as a model, then unpacked into storage.

Order: the archive's members are listed and checked (:mod:`core.uploads.archives`: paths,
links, devices, member count, declared size); file names are checked (safetensors weights,
no pickles, no code); ``config.json`` is read from the archive and checked (a supported
encoder or sequence classifier, no remote code, labels that make sense); only then are the
files streamed into storage, counting bytes; last, the safetensors headers are read (never the
tensors) for the parameter count. Any refusal leaves nothing under the target prefix.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from safetensors import SafetensorError, safe_open

from core.settings import Settings
from core.storage import KEY_RULE, InvalidKey, Storage, join_key, validate_key
from core.uploads.archives import (
    ArchiveLimits,
    ArchiveRejected,
    ArchiveTooLarge,
    Listing,
    open_archive,
    strip_single_top_dir,
)
from core.uploads.errors import InvalidUpload, UploadTooLarge
from kd_engine.models.loading import (
    SUPPORTED_MODEL_TYPES,
    classifier_label_names,
    is_sequence_classifier,
    teacher_task,
)

CONFIG = "config.json"
MAX_CONFIG_BYTES = 1 << 20  # a config.json larger than 1 MiB is refused
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle", ".joblib")
CODE_SUFFIXES = (".py", ".pyc", ".so")
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "sentencepiece.bpe.model",
    "spiece.model",
    "tokenizer.model",
    "tokenizer_config.json",
)
CONVERT_HINT = (
    "pickle files are refused (loading one can run arbitrary code); save the weights as "
    "safetensors: load the model and call model.save_pretrained(dir, safe_serialization=True) "
    "(the default since transformers 4.35), or convert the checkpoint with the safetensors "
    "convert script (https://huggingface.co/spaces/safetensors/convert); leave other pickles "
    "such as training_args.bin out of the archive"
)
_DECODER_MARKS = ("CausalLM", "LMHeadModel", "ConditionalGeneration", "Seq2Seq")


class ModelFile(BaseModel):
    """One stored file of an uploaded model (``name`` relative to the model's folder)."""

    name: str
    size: int  # bytes
    sha256: str


class ModelReport(BaseModel):
    """What an accepted model upload holds, from its config.json and safetensors headers."""

    model_type: str
    architectures: list[str]
    kind: Literal["sequence_classifier", "masked_lm", "encoder"]
    task: Literal["classification", "regression"] | None  # None for an encoder without head
    num_labels: int | None
    label_names: list[str]
    num_layers: int | None
    hidden_size: int | None
    vocab_size: int | None
    parameters: int  # number of weights in the safetensors files
    weight_dtypes: list[str]  # safetensors dtypes, e.g. ["F32"]
    tokenizer_files: list[str]
    total_bytes: int  # of the stored files
    files: list[ModelFile]
    skipped: list[str]  # archive members left out: hidden files, .git, __MACOSX
    stripped_top_dir: str | None  # the single top folder the files were in, if any


def model_limits(settings: Settings) -> ArchiveLimits:
    """The archive caps for a model upload, from ``settings``."""
    return ArchiveLimits(
        max_members=settings.max_archive_members,
        max_unpacked_bytes=settings.max_unpacked_bytes,
    )


def _int_or_none(config: dict[str, Any], *names: str) -> int | None:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def check_model_config(config: object) -> dict[str, Any]:
    """Check a parsed ``config.json`` and return the report's config fields.

    Raises:
        InvalidUpload: not an object; ``trust_remote_code`` or ``auto_map`` (custom code);
            a model type outside :data:`SUPPORTED_MODEL_TYPES`; a decoder; a sequence
            classifier whose ``id2label`` is missing, not keyed 0..n-1, or repeats a label.
    """
    if not isinstance(config, dict):
        raise InvalidUpload(f"{CONFIG} must hold a JSON object", member=CONFIG)
    for key in ("trust_remote_code", "auto_map"):
        if key in config:
            raise InvalidUpload(
                f"{CONFIG} has {key!r}: checkpoints with custom model code are refused (code "
                "in a checkpoint is never run); use a standard transformers architecture "
                f"({', '.join(SUPPORTED_MODEL_TYPES)})",
                member=CONFIG,
            )
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise InvalidUpload(
            f"{CONFIG}: model_type {model_type!r} is not supported; supported: "
            f"{', '.join(SUPPORTED_MODEL_TYPES)}",
            member=CONFIG,
        )
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise InvalidUpload(f"{CONFIG}: architectures must be a list of names", member=CONFIG)
    if config.get("is_decoder") is True or any(m in a for a in archs for m in _DECODER_MARKS):
        raise InvalidUpload(
            f"{CONFIG}: {archs or 'is_decoder'} is a decoder; a teacher or student must be an "
            "encoder or a sequence classifier",
            member=CONFIG,
        )
    classifier = is_sequence_classifier(config)
    names: list[str] = []
    if classifier:
        id2label = config.get("id2label")
        if not isinstance(id2label, dict) or not id2label:
            raise InvalidUpload(
                f"{CONFIG}: a sequence classifier must name its labels in id2label",
                member=CONFIG,
            )
        expected = {str(i) for i in range(len(id2label))}
        if {str(k) for k in id2label} != expected:
            raise InvalidUpload(
                f"{CONFIG}: id2label keys must be the class ids 0..{len(id2label) - 1} "
                f"(got {sorted(map(str, id2label))[:10]})",
                member=CONFIG,
            )
        names = classifier_label_names(config)
        if len(set(names)) != len(names):
            raise InvalidUpload(f"{CONFIG}: id2label repeats a label: {names}", member=CONFIG)
    if classifier:
        kind: Literal["sequence_classifier", "masked_lm", "encoder"] = "sequence_classifier"
    elif any(a.endswith("ForMaskedLM") for a in archs):
        kind = "masked_lm"
    else:
        kind = "encoder"
    return {
        "model_type": str(model_type),
        "architectures": list(archs),
        "kind": kind,
        "task": teacher_task(config),
        "num_labels": len(names) if classifier else None,
        "label_names": names,
        "num_layers": _int_or_none(config, "num_hidden_layers", "n_layers"),
        "hidden_size": _int_or_none(config, "hidden_size", "dim"),
        "vocab_size": _int_or_none(config, "vocab_size"),
    }


def _check_files(listing: Listing) -> None:
    """Names (valid keys), weights format (safetensors at the top, no pickles, no code).

    Raises:
        InvalidUpload: naming the member.
    """
    for m in listing.files:
        try:
            validate_key(m.path)
        except InvalidKey:
            raise InvalidUpload(
                f"archive member {m.name!r}: the name must be {KEY_RULE}", member=m.name
            ) from None
        lower = m.path.lower()
        if lower.endswith(PICKLE_SUFFIXES):
            raise InvalidUpload(f"archive member {m.name!r}: {CONVERT_HINT}", member=m.name)
        if lower.endswith(CODE_SUFFIXES):
            raise InvalidUpload(
                f"archive member {m.name!r}: code files are refused (code in a checkpoint is "
                "never run); leave it out of the archive",
                member=m.name,
            )
    if listing.get(CONFIG) is None:
        raise InvalidUpload(
            f"the archive has no {CONFIG} at its top (or in a single top folder): not a "
            "transformers directory; archive the folder written by save_pretrained"
        )
    if not any("/" not in m.path and m.path.endswith(".safetensors") for m in listing.files):
        raise InvalidUpload(
            "the archive has no .safetensors weights next to config.json; save the model "
            "with model.save_pretrained(dir, safe_serialization=True)"
        )


def _safetensors_summary(store: Storage, prefix: str, names: list[str]) -> tuple[int, list[str]]:
    """Parameter count and dtypes from the headers of the stored safetensors files (no tensor
    is loaded).

    Raises:
        InvalidUpload: a file whose header cannot be read, or that holds no tensors.
    """
    parameters = 0
    dtypes: set[str] = set()
    for name in names:
        try:
            with safe_open(str(store.local_path(join_key(prefix, name))), framework="numpy") as f:
                keys = list(f.keys())
                for key in keys:
                    sl = f.get_slice(key)
                    parameters += math.prod(sl.get_shape())
                    dtypes.add(str(sl.get_dtype()))
        except (SafetensorError, OSError, ValueError) as e:
            raise InvalidUpload(
                f"archive member {name!r} is not a valid safetensors file ({e})", member=name
            ) from None
        if not keys:
            raise InvalidUpload(f"archive member {name!r} holds no tensors", member=name)
    return parameters, sorted(dtypes)


def unpack_model(archive: Path, store: Storage, prefix: str, limits: ArchiveLimits) -> ModelReport:
    """Check the model archive at ``archive`` (a tar, tar.gz/bz2/xz or zip of a transformers
    directory, possibly inside one top folder) and unpack it into ``store`` under ``prefix``
    (``prefix/config.json``, ``prefix/model.safetensors``...; files get mode 0644 on local
    storage). ``prefix`` should be new: on a refusal everything under it is deleted.

    Returns:
        The report of what was found.

    Raises:
        InvalidUpload (422): not a tar or zip; a member with an absolute path, ``..``, a link,
            a device or fifo, a bad name; pickle weights or code; no config.json or no
            safetensors; a config that is not a supported encoder or sequence classifier or
            asks for remote code; an unreadable safetensors header. The message names the
            member.
        UploadTooLarge (413): more members than ``limits.max_members``, or more than
            ``limits.max_unpacked_bytes`` unpacked (declared, or counted while extracting).
        InvalidKey: ``prefix`` is not a valid storage key (a programming error).
    """
    validate_key(prefix)
    try:
        with open_archive(archive, limits) as arc:
            listing = arc.check_members(limits)
            strip_single_top_dir(listing, CONFIG)
            _check_files(listing)
            config_member = listing.get(CONFIG)
            assert config_member is not None
            try:
                config = json.loads(arc.read_small(config_member, MAX_CONFIG_BYTES))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise InvalidUpload(
                    f"{CONFIG} is not valid JSON ({e})", member=config_member.name
                ) from None
            except RecursionError:
                raise InvalidUpload(
                    f"{CONFIG} nests JSON arrays or objects too deeply to be read",
                    member=config_member.name,
                ) from None
            fields = check_model_config(config)
            objects = arc.extract(listing, store, prefix, limits.max_unpacked_bytes)
    except ArchiveRejected as e:
        raise InvalidUpload(str(e), member=e.member) from None
    except ArchiveTooLarge as e:
        raise UploadTooLarge(str(e), e.limit, e.what) from None
    files = [
        ModelFile(name=o.key.removeprefix(prefix + "/"), size=o.size, sha256=o.sha256)
        for o in objects
    ]
    try:
        weights = [f.name for f in files if f.name.endswith(".safetensors")]
        parameters, dtypes = _safetensors_summary(store, prefix, weights)
    except BaseException:
        store.delete_prefix(prefix)
        raise
    return ModelReport(
        **fields,
        parameters=parameters,
        weight_dtypes=dtypes,
        tokenizer_files=sorted(f.name for f in files if f.name in TOKENIZER_FILES),
        total_bytes=sum(f.size for f in files),
        files=files,
        skipped=listing.skipped,
        stripped_top_dir=listing.stripped_top_dir,
    )
