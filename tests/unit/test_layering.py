"""The package layering (kd_engine <- core <- api, worker) and the one mapping of domain errors
to HTTP statuses."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from api.errors import http_headers, http_status
from core.errors import (
    Conflict,
    DomainError,
    NotFound,
    QuotaExceeded,
    Unauthorized,
    Unavailable,
)
from core.uploads.errors import InvalidUpload, UploadTooLarge

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (DomainError("x"), 400),
        (Unauthorized("x"), 401),
        (NotFound("x"), 404),
        (Conflict("x"), 409),
        (InvalidUpload("x"), 422),
        (UploadTooLarge("x", limit=1), 413),
        (QuotaExceeded("x"), 429),
        (Unavailable("x"), 503),
    ],
)
def test_each_domain_error_has_one_http_status(error: DomainError, status: int) -> None:
    assert http_status(error) == status
    assert not hasattr(error, "status")  # the domain knows no HTTP


def test_a_subclass_takes_its_base_status_and_only_401_has_headers() -> None:
    class StaleUpload(InvalidUpload):
        code = "stale"

    assert http_status(StaleUpload("x")) == 422
    assert http_headers(Unauthorized("x")) == {"WWW-Authenticate": "Bearer"}
    assert http_headers(NotFound("x")) is None


def test_the_import_contracts_are_kept() -> None:
    """``lint-imports`` (pyproject's [tool.importlinter]): api and worker independent, core
    imports neither, kd_engine none of them."""
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    out = subprocess.run(
        [exe, "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False, timeout=120
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "0 broken" in out.stdout
