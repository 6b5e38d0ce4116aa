"""The SDK is its own distribution (distillery_sdk/pyproject.toml): every module of
``distillery_sdk`` imports only the standard library, itself and the distribution's declared
dependencies (no torch, no server code), and the server depends on it without packaging it.

The install itself (a fresh venv, no torch, the CLI against a live stack) is
tests/e2e/test_sdk_cli.py::test_the_sdk_installs_alone_without_torch_and_its_cli_works.
"""

from __future__ import annotations

import ast
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path
from typing import Any

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
SDK = ROOT / "distillery_sdk"


def _project(path: Path) -> dict[str, Any]:
    project: dict[str, Any] = tomllib.loads(path.read_text())["project"]
    return project


def _imports(path: Path) -> set[str]:
    """Top-level names of the absolute imports in one module (a function's imports too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_sdk_imports_only_its_declared_dependencies() -> None:
    declared = {
        canonicalize_name(Requirement(spec).name)
        for spec in _project(SDK / "pyproject.toml")["dependencies"]
    }
    assert declared == {"httpx", "pydantic", "typer", "rich", "pyyaml"}
    owners = packages_distributions()  # import name -> distributions installed here
    modules = sorted(SDK.glob("*.py"))
    assert {m.name for m in modules} >= {"__init__.py", "cli.py", "client.py", "models.py"}
    for module in modules:
        for name in _imports(module):
            if name in sys.stdlib_module_names or name == "distillery_sdk":
                continue
            dists = {canonicalize_name(d) for d in owners.get(name, [])}
            assert dists & declared, f"{module.name} imports {name}, not a declared dependency"


def test_the_server_depends_on_the_sdk_without_packaging_it() -> None:
    server = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = [Requirement(s) for s in server["project"]["dependencies"]]
    sdk = next(r for r in deps if canonicalize_name(r.name) == "distillery-sdk")
    assert sdk.specifier.contains(_project(SDK / "pyproject.toml")["version"])
    assert not any(
        p.startswith("distillery_sdk")
        for p in server["tool"]["setuptools"]["packages"]["find"]["include"]
    )
    # one `distillery` script, the SDK's; the server's is distillery-server
    assert "distillery" not in server["project"]["scripts"]
    assert server["project"]["scripts"]["distillery-server"] == "devstack.cli:main"
    sdk_scripts = _project(SDK / "pyproject.toml")["scripts"]
    assert sdk_scripts == {"distillery": "distillery_sdk.cli:main"}
