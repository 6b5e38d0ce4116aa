"""A real process publishing a job's output with LocalStorage.put_dir is SIGKILLed by strace at
one exact rename (no mocks): the job's checkpoints beside the output are never moved or
deleted, and publishing again completes the output."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from core.storage import LocalStorage

ROOT = Path(__file__).resolve().parents[2]
STRACE = shutil.which("strace")
RENAMES = "rename,renameat,renameat2"

pytestmark = pytest.mark.skipif(STRACE is None, reason="strace is not installed (make services)")


def publish_killed_at(store: LocalStorage, source: Path, *paths: Path) -> int:
    """Run ``store.put_dir(<job>, source, keep=("checkpoints",))`` in a new Python process,
    SIGKILLed by strace at its first rename whose source is one of ``paths``; its exit code."""
    code = (
        "import sys; from pathlib import Path; from core.storage import LocalStorage; "
        "LocalStorage(Path(sys.argv[1])).put_dir('job1', Path(sys.argv[2]), keep=('checkpoints',))"
    )
    traced = [f"--trace-path={p}" for p in paths]
    cmd = [str(STRACE), "-f", "-qq", "-o", os.devnull, *traced, f"--trace={RENAMES}"]
    cmd += [f"--inject={RENAMES}:signal=SIGKILL", sys.executable, "-c", code]
    proc = subprocess.run(
        [*cmd, str(store.root), str(source)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        timeout=120,
    )
    return proc.returncode


def stage(store: LocalStorage, files: dict[str, bytes]) -> Path:
    source = store.staging_root() / "job1-2"
    for name, data in files.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    return source


def test_a_publish_killed_part_way_never_touches_the_checkpoints(tmp_path: Path) -> None:
    store = LocalStorage(tmp_path / "store")
    store.put("job1/checkpoints/step-00000060/state.pt", [b"s" * 4096])
    store.put("job1/checkpoints/step-00000060/student/model.safetensors", [b"m" * 4096])
    store.put("job1/config.json", [b"from attempt 1"])
    store.put("job1/stale.txt", [b"attempt 1 only"])
    ckpt = store.root / "job1/checkpoints/step-00000060/state.pt"
    inode = ckpt.stat().st_ino
    output = {"config.json": b"{}", "model.safetensors": b"w" * 8192, "vocab.txt": b"v"}
    source = stage(store, output)

    # killed at the rename of model.safetensors (the one before it is already published), or,
    # for a put_dir that moved the whole staged folder, at that folder's rename
    rc = publish_killed_at(store, source, source, source / "model.safetensors")

    assert rc in (-9, 128 + 9), rc  # strace ends with its tracee's signal
    assert ckpt.stat().st_ino == inode and ckpt.read_bytes() == b"s" * 4096
    assert store.list_keys("job1/checkpoints") == [
        "job1/checkpoints/step-00000060/state.pt",
        "job1/checkpoints/step-00000060/student/model.safetensors",
    ]
    assert not list(store.root.glob(".tmp-*"))
    # part-way: config.json is the new one, model.safetensors still staged
    assert store.read_bytes("job1/config.json") == b"{}"
    assert not store.exists("job1/model.safetensors")
    assert (source / "model.safetensors").is_file()

    # the next attempt stages its output again and publishes it whole
    shutil.rmtree(source)
    objects = store.put_dir("job1", stage(store, output), keep=("checkpoints",))
    assert [o.key for o in objects] == [
        "job1/config.json",
        "job1/model.safetensors",
        "job1/vocab.txt",
    ]
    assert store.list_keys("job1") == [
        "job1/checkpoints/step-00000060/state.pt",
        "job1/checkpoints/step-00000060/student/model.safetensors",
        "job1/config.json",
        "job1/model.safetensors",
        "job1/vocab.txt",
    ]
    assert ckpt.stat().st_ino == inode
    assert not store.staging_root().joinpath("job1-2").exists()
