"""The lock file (requirements/lock.txt) covers pyproject.toml, and the check that says so
catches a dependency that is missing or pinned outside its range."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def _check_lock() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_lock", ROOT / "scripts" / "check_lock.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_lock"] = module
    spec.loader.exec_module(module)
    return module


def test_the_locks_cover_pyproject_and_agree() -> None:
    check = _check_lock()
    req = ROOT / "requirements"
    local = check.local_projects(ROOT)
    assert local == {"distillery-sdk": ROOT / "distillery_sdk" / "pyproject.toml"}
    assert check.problems(ROOT / "pyproject.toml", req / "lock.txt", local=local) == []
    assert (
        check.problems(ROOT / "pyproject.toml", req / "server.txt", extras=["mlflow"], local=local)
        == []
    )
    # the SDK is on no index: the locks leave it out (installed from ./distillery_sdk)
    assert check.problems(ROOT / "pyproject.toml", req / "lock.txt") == [
        "distillery-sdk: in pyproject.toml, missing from lock.txt"
    ]
    assert check.disagreements(req / "lock.txt", req / "server.txt") == []
    # the server lock carries no dev tools
    assert "pytest" not in check.locked_versions(req / "server.txt")


def test_the_lock_pins_every_package_with_a_hash() -> None:
    text = (ROOT / "requirements" / "lock.txt").read_text()
    blocks = [b for b in text.split("\n") if b and not b.startswith((" ", "#"))]
    assert len(blocks) > 50
    for line in blocks:
        assert "==" in line and line.endswith("\\"), f"not pinned with a hash: {line}"
    # torch is the CPU build that lies on the dev/CI machines' disk
    assert "torch==2.13.0+cpu \\" in blocks


def test_missing_and_out_of_range_dependencies_are_reported(tmp_path: Path) -> None:
    check = _check_lock()
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\ndependencies = ["numpy>=2", "requests"]\n'
        '[project.optional-dependencies]\ndev = ["pytest>=8,<9"]\n'
    )
    lock = tmp_path / "lock.txt"
    lock.write_text(
        "numpy==1.26.4 \\\n    --hash=sha256:00\n"
        "pytest==8.3.0 \\\n    --hash=sha256:00\n    # via x\n"
    )
    found = check.problems(pyproject, lock)
    assert found == [
        "numpy: locked at 1.26.4, pyproject.toml asks >=2",
        "requests: in pyproject.toml, missing from lock.txt",
    ]
    assert check.problems(pyproject, lock, extras=[]) == found  # pytest 8.3 is in range
    other = tmp_path / "server.txt"
    other.write_text("numpy==2.0.0 \\\n    --hash=sha256:00\n")
    assert check.disagreements(lock, other) == [
        "numpy: server.txt pins 2.0.0, lock.txt pins 1.26.4"
    ]


def test_a_local_distribution_is_checked_in_place_of_a_pin(tmp_path: Path) -> None:
    """The server depends on the repository's own SDK: its version must be in range, the lock
    must not pin it, and its own dependencies must be locked."""
    check = _check_lock()
    (tmp_path / "sdk").mkdir()
    sdk = tmp_path / "sdk" / "pyproject.toml"
    sdk.write_text('[project]\nname = "My_SDK"\nversion = "0.1.0"\ndependencies = ["httpx>=1"]\n')
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["my-sdk==0.1.0", "numpy"]\n')
    lock = tmp_path / "lock.txt"
    lock.write_text("numpy==1.26.4 \\\n    --hash=sha256:00\nhttpx==0.27.0 \\\n")
    local = {"my-sdk": sdk}
    assert check.problems(pyproject, lock, local=local) == [
        "httpx: locked at 0.27.0, sdk/pyproject.toml asks >=1"
    ]
    lock.write_text("numpy==1.26.4 \\\nmy-sdk==0.1.0 \\\n")
    pyproject.write_text('[project]\nname = "x"\ndependencies = ["my-sdk>=0.2", "numpy"]\n')
    assert check.problems(pyproject, lock, local=local) == [
        "my-sdk: built from sdk/, must not be pinned in lock.txt (an index would serve it)",
        "my-sdk: sdk/ is 0.1.0, pyproject.toml asks >=0.2",
        "httpx: in sdk/pyproject.toml, missing from lock.txt",
    ]
