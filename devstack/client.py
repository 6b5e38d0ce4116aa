"""A small HTTP client for the Distillery API (used by the demo and the end-to-end tests)."""

from __future__ import annotations

import io
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

FINAL = ("succeeded", "failed", "cancelled")


class ApiError(Exception):
    """A non-2xx answer, with the API's error body."""

    def __init__(self, status: int, body: Any) -> None:
        super().__init__(f"HTTP {status}: {body}")
        self.status = status
        self.body = body


class Client:
    """Submit, watch and download jobs over HTTP; ``api_key`` is sent as
    ``Authorization: Bearer <key>`` with every request."""

    def __init__(self, base_url: str, api_key: str | None = None, timeout_s: float = 60.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=base_url, timeout=timeout_s, headers=headers)

    def _json(self, r: httpx.Response) -> Any:
        if r.status_code >= 400:
            try:
                body = r.json()
            except ValueError:
                body = r.text
            raise ApiError(r.status_code, body)
        return r.json()

    def submit(self, spec: dict[str, Any], idempotency_key: str | None = None) -> dict[str, Any]:
        """POST /v1/jobs (with an ``Idempotency-Key`` header when given)."""
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return dict(self._json(self.http.post("/v1/jobs", json=spec, headers=headers)))

    def upload(
        self,
        path: Path,
        purpose: str,
        idempotency_key: str | None = None,
        **form: str,
    ) -> dict[str, Any]:
        """POST /v1/files: upload the file at ``path`` (streamed from disk) as a ``dataset`` or
        a ``model`` archive; ``form`` adds form fields (``text_column``, ``label_column``,
        ``text_pair_column``). Returns the file with its ``report``; its ``id`` is its
        reference in a job spec.

        Raises:
            ApiError: 413 too large, 422 a bad file (the message names the line or member),
                429 over the stored-bytes quota.
        """
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        with path.open("rb") as f:
            r = self.http.post(
                "/v1/files",
                files={"file": (path.name, f)},
                data={"purpose": purpose, **form},
                headers=headers,
            )
        return dict(self._json(r))

    def files(self, purpose: str | None = None) -> list[dict[str, Any]]:
        """GET /v1/files: the tenant's uploads, newest first."""
        params = {"purpose": purpose} if purpose else None
        return list(self._json(self.http.get("/v1/files", params=params))["items"])

    def delete_file(self, file_id: str) -> None:
        """DELETE /v1/files/{id}.

        Raises:
            ApiError: 404 no such file, 409 a job that has not finished names it.
        """
        r = self.http.delete(f"/v1/files/{file_id}")
        if r.status_code != 204:
            self._json(r)

    def job(self, job_id: str) -> dict[str, Any]:
        """GET /v1/jobs/{id}."""
        return dict(self._json(self.http.get(f"/v1/jobs/{job_id}")))

    def jobs(self, **params: Any) -> dict[str, Any]:
        """GET /v1/jobs."""
        return dict(self._json(self.http.get("/v1/jobs", params=params)))

    def cancel(self, job_id: str) -> dict[str, Any]:
        """POST /v1/jobs/{id}/cancel."""
        return dict(self._json(self.http.post(f"/v1/jobs/{job_id}/cancel")))

    def delete(self, job_id: str) -> None:
        """DELETE /v1/jobs/{id} (a finished job and its artifacts).

        Raises:
            ApiError: 404 no such job, 409 not finished or its model still in use.
        """
        r = self.http.delete(f"/v1/jobs/{job_id}")
        if r.status_code != 204:
            self._json(r)

    def metrics(self, job_id: str) -> dict[str, Any]:
        """GET /v1/jobs/{id}/metrics."""
        return dict(self._json(self.http.get(f"/v1/jobs/{job_id}/metrics")))

    def artifacts(self, job_id: str) -> dict[str, Any]:
        """GET /v1/jobs/{id}/artifacts."""
        return dict(self._json(self.http.get(f"/v1/jobs/{job_id}/artifacts")))

    def wait(
        self,
        job_id: str,
        timeout_s: float = 3600.0,
        poll_s: float = 0.25,
        on_update: Callable[[dict[str, Any]], None] | None = None,
    ) -> dict[str, Any]:
        """Poll every ``poll_s`` seconds until the job is finished (or ``timeout_s`` seconds
        pass: TimeoutError). The default is short: a test waits for tiny jobs (a GET of one
        job is a few milliseconds of the API's time)."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.job(job_id)
            if on_update:
                on_update(job)
            if job["status"] in FINAL:
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout_s} s")
            time.sleep(poll_s)

    def download_archive(self, job_id: str, dest: Path) -> Path:
        """Download the job's archive and unpack it under ``dest``; return the model dir."""
        r = self.http.get(f"/v1/jobs/{job_id}/archive")
        if r.status_code >= 400:
            raise ApiError(r.status_code, r.json())
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
            tar.extractall(dest, filter="data")
        return dest / job_id
