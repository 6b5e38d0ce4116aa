"""Check that the lock files cover pyproject.toml: requirements/lock.txt pins every dependency of
the project and of its optional extras (dev included) at a version its range admits, and
requirements/server.txt (the production image's: no dev tools) pins the runtime dependencies and
the `mlflow` extra at the same versions as lock.txt.

The repository's own client distribution, distillery-sdk (distillery_sdk/pyproject.toml), is a
dependency of the server but on no index: it is installed from ./distillery_sdk, so the locks
must not pin it (an index could serve a stranger's package of that name); its version must
satisfy the server's range and its own dependencies must be locked like the server's.

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
LOCAL_PROJECTS = ("distillery_sdk",)
"""Folders of the repository's own distributions besides the server (installed from there)."""


def local_projects(root: Path) -> dict[str, Path]:
    """The pyproject.toml of each of the repository's own distributions (:data:`LOCAL_PROJECTS`),
    by canonical distribution name."""
    out: dict[str, Path] = {}
    for folder in LOCAL_PROJECTS:
        path = root / folder / "pyproject.toml"
        out[canonicalize_name(tomllib.loads(path.read_text())["project"]["name"])] = path
    return out


def locked_versions(lock: Path) -> dict[str, Version]:
    """Pinned versions of the lock file, by canonical package name."""
    pins: dict[str, Version] = {}
    for line in lock.read_text().splitlines():
        m = PIN.match(line)
        if m:
            pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


def problems(
    pyproject: Path,
    lock: Path,
    extras: list[str] | None = None,
    local: dict[str, Path] | None = None,
) -> list[str]:
    """One message per pyproject dependency the lock does not satisfy: the main ones and those
    of ``extras`` (every extra when None). A dependency on a ``local`` distribution (canonical
    name -> its pyproject.toml) is not looked up in the lock: its version must satisfy the range,
    the lock must not pin it, and its own dependencies are checked in its place."""
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = [(spec, pyproject) for spec in project.get("dependencies", [])]
    for name, extra in project.get("optional-dependencies", {}).items():
        if extras is None or name in extras:
            wanted.extend((spec, pyproject) for spec in extra)
    local = local or {}
    pins = locked_versions(lock)
    out: list[str] = []
    seen_local: set[str] = set()
    while wanted:
        spec, source = wanted.pop(0)
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        where = f"{source.parent.name}/{source.name}" if source != pyproject else source.name
        if name in local:
            path = local[name]
            sub = tomllib.loads(path.read_text())["project"]
            version = Version(sub["version"])
            if name in pins:
                out.append(
                    f"{req.name}: built from {path.parent.name}/, must not be pinned in "
                    f"{lock.name} (an index would serve it)"
                )
            if not req.specifier.contains(version, prereleases=True):
                out.append(
                    f"{req.name}: {path.parent.name}/ is {version}, {where} asks {req.specifier}"
                )
            if name not in seen_local:
                seen_local.add(name)
                wanted.extend((s, path) for s in sub.get("dependencies", []))
        elif name not in pins:
            out.append(f"{req.name}: in {where}, missing from {lock.name}")
        elif not req.specifier.contains(pins[name], prereleases=True):
            out.append(f"{req.name}: locked at {pins[name]}, {where} asks {req.specifier}")
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
    local = local_projects(ROOT)
    found = problems(pyproject, req / "lock.txt", local=local)
    found += problems(pyproject, req / "server.txt", extras=["mlflow"], local=local)
    found += disagreements(req / "lock.txt", req / "server.txt")
    for line in found:
        print(f"check_lock: {line}", file=sys.stderr)
    if found:
        print("check_lock: run `make lock` to refresh requirements/*.txt", file=sys.stderr)
        return 1
    print(
        "check_lock: requirements/lock.txt and server.txt cover pyproject.toml and "
        "distillery_sdk/pyproject.toml"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
