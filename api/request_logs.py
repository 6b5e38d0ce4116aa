"""The API's side of job-tagged logging: a request whose path names a job logs with its id
(see :mod:`core.logs`)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable

from fastapi import FastAPI, Request, Response

from core.logs import bound_job

_JOB_PATH = re.compile(r"^/v1/jobs/([^/]+)")


def install(app: FastAPI) -> None:
    """Bind the job id of requests whose path is ``/v1/jobs/<id>...`` while they are handled."""

    @app.middleware("http")
    async def bind(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        match = _JOB_PATH.match(request.url.path)
        if match is None:
            return await call_next(request)
        with bound_job(match.group(1)):
            return await call_next(request)
