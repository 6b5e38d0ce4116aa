"""The Distillery HTTP client (``httpx``): jobs, events, checkpoints, files, artifacts, keys."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import httpx
from pydantic import BaseModel

from distillery_sdk.errors import (
    ChecksumMismatch,
    ConnectionFailed,
    DistilleryError,
    error_from_response,
)
from distillery_sdk.models import (
    FINAL_STATUSES,
    Artifact,
    ArtifactList,
    CheckpointList,
    Event,
    EventList,
    File,
    FileList,
    Job,
    JobList,
    Key,
    KeyCreated,
    KeyList,
    Metrics,
)

DEFAULT_URL = "http://127.0.0.1:8000"
"""Where the embedded stack (``make up``, ``distillery-server up``) serves the API."""

M = TypeVar("M", bound=BaseModel)
# Aliases: ``Client.list`` shadows the builtin inside the class body.
_Paths = list[Path]
_Files = list[File]
_Keys = list[Key]
_CHUNK = 1 << 20


class Client:
    """A client of one Distillery API.

    Args:
        url: the API's base URL (default ``$DISTILLERY_URL``, else ``http://127.0.0.1:8000``).
        api_key: sent as ``Authorization: Bearer <key>`` (default ``$DISTILLERY_API_KEY``).
        timeout: seconds for connecting and for each read (downloads stream, so this bounds the
            wait for each chunk, not the whole file).

    Every method raises a :class:`~distillery_sdk.errors.DistilleryError` subclass for an
    error answer (NotFound, Conflict, InvalidRequest, QuotaExceeded, Unavailable,
    Unauthorized) and :class:`~distillery_sdk.errors.ConnectionFailed` when the API cannot be
    reached. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self, url: str | None = None, api_key: str | None = None, timeout: float = 60.0
    ) -> None:
        self.url = (url or os.environ.get("DISTILLERY_URL") or DEFAULT_URL).rstrip("/")
        key = api_key if api_key is not None else os.environ.get("DISTILLERY_API_KEY")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.timeout = timeout
        self.http = httpx.Client(base_url=self.url, timeout=timeout, headers=headers)

    def close(self) -> None:
        """Close the connection pool."""
        self.http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- plumbing --------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        try:
            r = self.http.request(method, path, **kw)
        except httpx.TransportError as e:
            raise ConnectionFailed(
                f"cannot reach the API at {self.url}: {e}", code="connection_error"
            ) from e
        if r.status_code >= 400:
            raise error_from_response(r)
        return r

    def _get(self, model: type[M], path: str, **kw: Any) -> M:
        return model.model_validate(self._request("GET", path, **kw).json())

    def _post(self, model: type[M], path: str, **kw: Any) -> M:
        return model.model_validate(self._request("POST", path, **kw).json())

    # -- jobs ------------------------------------------------------------------------------

    def submit(
        self,
        spec: Mapping[str, Any] | BaseModel,
        idempotency_key: str | None = None,
        *,
        name: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Job:
        """Submit a job (``POST /v1/jobs``): ``spec`` is a dict as in docs/usage.md or a
        ``kd_engine.spec.JobSpec`` (its fields that were set are sent). With
        ``idempotency_key``, a retry with the same key and spec returns the first job instead
        of making another. ``name`` (at most 128 characters) and ``metadata`` (at most 16
        string keys and values) label the job; they override those in ``spec``.

        Returns: the job (``queued``, or ``waiting`` for a ``job:<id>`` it names).
        Raises: InvalidRequest (422; ``field`` names the bad field), QuotaExceeded (429),
            Unavailable (503, broker down).
        """
        # Only the fields that were set: the API fills in the defaults, and refuses some
        # defaults sent explicitly (a built-in dataset's text_column).
        if isinstance(spec, BaseModel):
            body = spec.model_dump(mode="json", exclude_unset=True)
        else:
            body = dict(spec)
        if name is not None:
            body["name"] = name
        if metadata is not None:
            body["metadata"] = dict(metadata)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self._post(Job, "/v1/jobs", json=body, headers=headers)

    def get(self, job_id: str) -> Job:
        """The job (status, progress, error). Raises NotFound."""
        return self._get(Job, f"/v1/jobs/{job_id}")

    def list_page(
        self,
        status: str | None = None,
        limit: int = 20,
        cursor: str | None = None,
        *,
        name: str | None = None,
        name_contains: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> JobList:
        """One page of jobs, newest first (``limit`` 1..200); ``status``, ``name`` (exact),
        ``name_contains`` (case-insensitive) and ``metadata`` (every key and value must
        match) filter them."""
        params: dict[str, Any] = {"limit": limit}
        for key, value in (
            ("status", status),
            ("cursor", cursor),
            ("name", name),
            ("name_contains", name_contains),
        ):
            if value:
                params[key] = value
        if metadata:
            params["metadata"] = [f"{k}={v}" for k, v in metadata.items()]
        return self._get(JobList, "/v1/jobs", params=params)

    def list(
        self,
        status: str | None = None,
        page_size: int = 50,
        *,
        name: str | None = None,
        name_contains: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> Iterator[Job]:
        """Every job (filtered as :meth:`list_page` does), newest first, fetching pages of
        ``page_size`` as the iteration goes (following ``next_cursor``).

        Raises: InvalidRequest for an unknown status or a bad filter.
        """
        cursor: str | None = None
        while True:
            page = self.list_page(
                status=status,
                limit=page_size,
                cursor=cursor,
                name=name,
                name_contains=name_contains,
                metadata=metadata,
            )
            yield from page.items
            cursor = page.next_cursor
            if not cursor:
                return

    def cancel(self, job_id: str) -> Job:
        """Cancel: a queued or waiting job at once, a running one within a few steps
        (``cancelling``). Raises Conflict when the job has finished."""
        return self._post(Job, f"/v1/jobs/{job_id}/cancel")

    def pause(self, job_id: str) -> Job:
        """Pause: a queued job at once (``paused``), a running one after its next checkpoint
        (``pausing``). Raises Conflict in any other status."""
        return self._post(Job, f"/v1/jobs/{job_id}/pause")

    def resume(self, job_id: str) -> Job:
        """Queue a paused job again (it continues from its newest checkpoint). Raises Conflict
        when it is not paused, Unavailable when the broker is down."""
        return self._post(Job, f"/v1/jobs/{job_id}/resume")

    def delete(self, job_id: str) -> None:
        """Delete a finished job and its artifacts. Raises Conflict while it runs."""
        self._request("DELETE", f"/v1/jobs/{job_id}")

    def metrics(self, job_id: str) -> Metrics:
        """Per-epoch metrics so far and, once succeeded, the final test metrics."""
        return self._get(Metrics, f"/v1/jobs/{job_id}/metrics")

    def checkpoints(self, job_id: str) -> CheckpointList:
        """The job's stored checkpoints, oldest first."""
        return self._get(CheckpointList, f"/v1/jobs/{job_id}/checkpoints")

    def wait(
        self,
        job_id: str,
        on_progress: Callable[[Job], None] | None = None,
        poll_s: float = 2.0,
        timeout_s: float | None = None,
    ) -> Job:
        """Poll the job every ``poll_s`` seconds until its status is final (succeeded, failed,
        cancelled) and return it; ``on_progress`` is called with every poll's job (the last
        one included).

        Raises: TimeoutError after ``timeout_s`` seconds (None: no limit); NotFound.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            job = self.get(job_id)
            if on_progress is not None:
                on_progress(job)
            if job.status in FINAL_STATUSES:
                return job
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout_s} s")
            time.sleep(poll_s)

    # -- events ----------------------------------------------------------------------------

    def events_page(
        self, job_id: str, after: int | None = None, limit: int = 100, type: str | None = None
    ) -> EventList:
        """One page of the job's events with ``id > after``, oldest first."""
        params: dict[str, Any] = {"limit": limit}
        if after is not None:
            params["after"] = after
        if type:
            params["type"] = type
        return self._get(EventList, f"/v1/jobs/{job_id}/events", params=params)

    def events(
        self, job_id: str, after: int | None = None, type: str | None = None, page_size: int = 100
    ) -> Iterator[Event]:
        """The job's events so far (after ``after``), oldest first, page after page; it ends
        at the newest one (use :meth:`stream_events` to keep following)."""
        while True:
            page = self.events_page(job_id, after=after, limit=page_size, type=type)
            yield from page.events
            if page.next_after is None:
                return
            after = page.next_after

    def stream_events(
        self, job_id: str, last_event_id: int | None = None, max_reconnects: int = 5
    ) -> Iterator[Event]:
        """Follow the job's events live over Server-Sent Events
        (``/v1/jobs/{id}/events/stream``), from after ``last_event_id`` (default: the first);
        the iterator ends after the final event (succeeded, failed, cancelled), or at once
        when the job had already finished and that event was sent before. A dropped
        connection is resumed from the last event seen (``Last-Event-ID``), up to
        ``max_reconnects`` times in a row.

        Raises: NotFound; ConnectionFailed when reconnecting fails.
        """
        last = last_event_id
        failures = 0
        read_timeout = max(self.timeout, 120.0)  # keep-alive comments every 15 s by default
        while True:
            headers = {"Accept": "text/event-stream"}
            if last is not None:
                headers["Last-Event-ID"] = str(last)
            got_any = False
            try:
                with self.http.stream(
                    "GET",
                    f"/v1/jobs/{job_id}/events/stream",
                    headers=headers,
                    timeout=httpx.Timeout(self.timeout, read=read_timeout),
                ) as r:
                    if r.status_code >= 400:
                        r.read()
                        raise error_from_response(r)
                    for message in _sse_messages(r.iter_lines()):
                        event = Event.model_validate(json.loads(message["data"]))
                        last, got_any, failures = event.id, True, 0
                        yield event
                        if event.type in FINAL_STATUSES:
                            return
            except httpx.TransportError as e:
                failures += 1
                if failures > max_reconnects:
                    raise ConnectionFailed(
                        f"event stream of job {job_id} lost: {e}", code="connection_error"
                    ) from e
                time.sleep(min(2.0 * failures, 10.0))
                continue
            if not got_any:
                return  # the server ended a stream with nothing new: the job has finished

    # -- artifacts -------------------------------------------------------------------------

    def artifacts(self, job_id: str) -> ArtifactList:
        """The job's files with size and sha256 (empty until it succeeds)."""
        return self._get(ArtifactList, f"/v1/jobs/{job_id}/artifacts")

    def download(
        self,
        job_id: str,
        dest_dir: str | Path,
        on_file: Callable[[Artifact, Path], None] | None = None,
    ) -> _Paths:
        """Download every file of the job into ``dest_dir`` (created if needed), streaming to
        disk and checking each file's sha256 against the listing; ``on_file`` is called after
        each verified file. A file is written as ``<name>.part`` and renamed once verified.

        Returns: the paths written, in listing order.
        Raises: Conflict/NotFound from the API; ChecksumMismatch (the partial file removed).
        """
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        root = dest.resolve()
        listing = self.artifacts(job_id)
        if not listing.items:
            job = self.get(job_id)
            raise DistilleryError(
                f"job {job_id} is {job.status}: it has no files to download (yet)",
                code="no_artifacts",
            )
        written: _Paths = []
        for a in listing.items:
            target = (root / a.name).resolve()
            if not target.is_relative_to(root):
                raise DistilleryError(f"refusing artifact name {a.name!r}", code="bad_name")
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(target.name + ".part")
            digest = hashlib.sha256()
            try:
                with self.http.stream("GET", a.url) as r:
                    if r.status_code >= 400:
                        r.read()
                        raise error_from_response(r)
                    with part.open("wb") as f:
                        for chunk in r.iter_bytes(_CHUNK):
                            digest.update(chunk)
                            f.write(chunk)
            except httpx.TransportError as e:
                part.unlink(missing_ok=True)
                raise ConnectionFailed(
                    f"download of {a.name} failed: {e}", code="connection_error"
                ) from e
            if digest.hexdigest() != a.sha256:
                part.unlink(missing_ok=True)
                raise ChecksumMismatch(
                    f"{a.name}: sha256 {digest.hexdigest()} differs from the listed {a.sha256}",
                    code="checksum_mismatch",
                    field=a.name,
                )
            part.replace(target)
            written.append(target)
            if on_file is not None:
                on_file(a, target)
        return written

    def download_report(self, job_id: str, dest: str | Path) -> Path:
        """Save the job's HTML report (``GET /v1/jobs/{id}/report``) as ``dest`` (a file path;
        a directory gets ``report.html`` inside). Returns the path written.

        Raises: NotFound until the job has succeeded, or when it has no report (the message
            says why).
        """
        r = self._request("GET", f"/v1/jobs/{job_id}/report")
        target = Path(dest)
        if target.is_dir():
            target = target / "report.html"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(r.content)
        return target

    def download_archive(self, job_id: str, dest_dir: str | Path) -> Path:
        """Download the job's ``.tar.gz`` and unpack it under ``dest_dir``; returns the model
        directory ``dest_dir/<job id>``. Raises Conflict until the job has succeeded."""
        r = self._request("GET", f"/v1/jobs/{job_id}/archive")
        dest = Path(dest_dir)
        dest.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=io.BytesIO(r.content), mode="r:gz") as tar:
            tar.extractall(dest, filter="data")
        return dest / job_id

    # -- files -----------------------------------------------------------------------------

    def upload_file(
        self,
        path: str | Path,
        kind: str,
        idempotency_key: str | None = None,
        **form: str,
    ) -> File:
        """Upload a ``dataset`` (CSV, JSONL, Parquet...) or a ``model`` archive (``kind``),
        streamed from disk; ``form`` adds ``text_column``, ``label_column``,
        ``text_pair_column``. The returned file's ``id`` is its reference in a job spec.

        Raises: InvalidRequest (413 too large, 422 a bad file: the message names the line or
            member), QuotaExceeded (stored bytes).
        """
        p = Path(path)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        with p.open("rb") as f:
            return self._post(
                File,
                "/v1/files",
                files={"file": (p.name, f)},
                data={"purpose": kind, **form},
                headers=headers,
            )

    def list_files(self, kind: str | None = None) -> _Files:
        """The tenant's uploads (of ``kind`` when given), newest first."""
        params = {"purpose": kind} if kind else None
        return self._get(FileList, "/v1/files", params=params).items

    def get_file(self, file_id: str) -> File:
        """One upload. Raises NotFound."""
        return self._get(File, f"/v1/files/{file_id}")

    def delete_file(self, file_id: str) -> None:
        """Delete an upload. Raises NotFound, Conflict (an unfinished job names it)."""
        self._request("DELETE", f"/v1/files/{file_id}")

    # -- keys ------------------------------------------------------------------------------

    def create_key(self, name: str = "") -> KeyCreated:
        """A new API key of the caller's tenant; its secret ``key`` is only in this answer."""
        return self._post(KeyCreated, "/v1/keys", json={"name": name})

    def list_keys(self) -> _Keys:
        """The tenant's keys (revoked ones included; never a secret)."""
        return self._get(KeyList, "/v1/keys").items

    def revoke_key(self, key_id: str) -> Key:
        """Revoke a key (it answers 401 from now on). Raises NotFound."""
        return Key.model_validate(self._request("DELETE", f"/v1/keys/{key_id}").json())


def _sse_messages(lines: Iterator[str]) -> Iterator[dict[str, str]]:
    """Messages of a ``text/event-stream`` (one dict per message with ``id``, ``event``,
    ``data``); comments and ``retry:`` lines are skipped; ``data`` lines are joined by
    newlines as the spec says."""
    fields: dict[str, str] = {}
    data: list[str] = []
    for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                yield {**fields, "data": "\n".join(data)}
            fields, data = {}, []
            continue
        if line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name in ("id", "event"):
            fields[name] = value
    if data:
        yield {**fields, "data": "\n".join(data)}
