"""Check that the lock files cover pyproject.toml: requirements/lock.txt pins every dependency of
the project and of its optional extras (dev included) at a version its range admits, and
requirements/server.txt (the production image's: no dev tools) pins the runtime dependencies and
the `mlflow` extra at the same versions as lock.txt.

Run by scripts/bootstrap.sh after installing from the lock, and by `make lint`. Exit status 1,
with one line per problem, when a dependency is missing or pinned outside its range (then run
`make lock`). Standard library + `packaging` only.
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def locked_versions(lock: Path) -> dict[str, Version]:
    """Pinned versions of the lock file, by canonical package name."""
    pins: dict[str, Version] = {}
    for line in lock.read_text().splitlines():
        m = PIN.match(line)
        if m:
            pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


def problems(pyproject: Path, lock: Path, extras: list[str] | None = None) -> list[str]:
    """One message per pyproject dependency the lock does not satisfy: the main ones and those
    of ``extras`` (every extra when None)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project.get("dependencies", []))
    for name, extra in project.get("optional-dependencies", {}).items():
        if extras is None or name in extras:
            wanted.extend(extra)
    pins = locked_versions(lock)
    out: list[str] = []
    for spec in wanted:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        if name not in pins:
            out.append(f"{req.name}: in pyproject.toml, missing from {lock.name}")
        elif not req.specifier.contains(pins[name], prereleases=True):
            out.append(f"{req.name}: locked at {pins[name]}, pyproject.toml asks {req.specifier}")
    return out


def disagreements(lock: Path, other: Path) -> list[str]:
    """One message per package that both files pin at different versions."""
    a, b = locked_versions(lock), locked_versions(other)
    return [
        f"{name}: {other.name} pins {b[name]}, {lock.name} pins {a[name]}"
        for name in sorted(a.keys() & b.keys())
        if a[name] != b[name]
    ]


def main() -> int:
    req = ROOT / "requirements"
    pyproject = ROOT / "pyproject.toml"
    found = problems(pyproject, req / "lock.txt")
    found += problems(pyproject, req / "server.txt", extras=["mlflow"])
    found += disagreements(req / "lock.txt", req / "server.txt")
    for line in found:
        print(f"check_lock: {line}", file=sys.stderr)
    if found:
        print("check_lock: run `make lock` to refresh requirements/*.txt", file=sys.stderr)
        return 1
    print("check_lock: requirements/lock.txt and server.txt cover pyproject.toml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
