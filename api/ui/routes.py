"""The dashboard's pages, htmx fragments and downloads under ``/ui``.

Every route but the login page takes :data:`api.ui.session.UiCallerDep` (the login cookie,
checked like a bearer key) and reads through the same service functions as the JSON API, with
the same tenant scoping. Errors are pages, not JSON: a missing or stale login redirects to
``/ui/login`` (htmx requests get an ``HX-Redirect``); a :class:`core.errors.DomainError`
(404 for another tenant's job, 409, ...) is an error page with its status and message.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Coroutine
from typing import Annotated, Any
from urllib.parse import urlencode

import yaml
from fastapi import APIRouter, Form, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse, StreamingResponse
from fastapi.routing import APIRoute
from pydantic import ValidationError
from sqlalchemy import select
from starlette.templating import Jinja2Templates

from api.auth import Caller
from api.deps import CeleryDep, SessionDep, SettingsDep
from api.errors import http_status, validation_details
from api.job_labels import JobSubmit
from api.params import ArtifactName, CheckpointName, Cursor, JobId, NameFilter, StatusFilter
from api.routers import jobs as jobs_api
from api.ui import views
from api.ui.session import (
    LoginRequired,
    UiCallerDep,
    authenticate_key,
    clear_login_cookie,
    login_url,
    set_login_cookie,
)
from core import idempotency, repository, service, tenants
from core.db import Job, Tenant
from core.errors import DomainError
from core.events import list_events
from core.job_status import FINISHED, JOB_STATUSES, JobStatus
from core.upload_names import filenames, label, name_uploads, name_uploads_in_error
from core.webhooks import event_dict
from kd_engine.errors import SpecError

PAGE_SIZE = 20
EVENTS_PAGE = 200
COMPARE_MAX_JOBS = 500
STATUSES = JOB_STATUSES  # the filter's choices: every job status, in lifecycle order
EXAMPLE_SPEC = """teacher: builtin:minilm-l6
method: {name: vanilla_kd}
dataset: {source: builtin:rotten_tomatoes}
training: {epochs: 2, batch_size: 32}
"""


def templates(request: Request) -> Jinja2Templates:
    """The dashboard's templates (made by :func:`api.ui.install`)."""
    t: Jinja2Templates = request.app.state.ui_templates
    return t


def page(
    request: Request, name: str, context: dict[str, Any], status_code: int = 200
) -> HTMLResponse:
    """Render template ``name`` with ``context`` (plus the request)."""
    return templates(request).TemplateResponse(request, name, context, status_code=status_code)


class UiRoute(APIRoute):
    """A dashboard route: login problems become a redirect to the login page, client errors
    an HTML error page with their status (never the API's JSON)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """The route's handler wrapped with those answers."""
        handler = super().get_route_handler()

        async def wrapped(request: Request) -> Response:
            try:
                return await handler(request)
            except LoginRequired as e:
                target = login_url(e.path if request.method == "GET" else "", e.reason)
                answer: Response
                if request.headers.get("hx-request"):
                    answer = Response(status_code=204, headers={"HX-Redirect": target})
                else:
                    answer = RedirectResponse(target, status_code=303)
                if e.reason:  # a cookie whose key no longer works: drop it
                    clear_login_cookie(answer)
                return answer
            except DomainError as e:
                return _error_page(request, http_status(e), e.message, e.field)
            except SpecError as e:
                return _error_page(request, 422, e.reason, e.field)
            except RequestValidationError as e:
                first = validation_details(e.errors(), None)[:1]
                field = first[0]["field"] if first else None
                reason = first[0]["reason"] if first else "invalid request"
                return _error_page(request, 422, f"{field}: {reason}" if field else reason, field)

        return wrapped


def _error_page(request: Request, status: int, message: str, field: str | None) -> HTMLResponse:
    return page(
        request,
        "error.html",
        {"status": status, "message": message, "field": field, "tenant": None, "nav": True},
        status_code=status,
    )


router = APIRouter(prefix="/ui", route_class=UiRoute, include_in_schema=False)


def _tenant_name(session: SessionDep, caller: Caller) -> str:
    return session.scalar(select(Tenant.name).where(Tenant.id == caller.tenant_id)) or "?"


@router.get("")
def home() -> RedirectResponse:
    """The dashboard's entry: the jobs list."""
    return RedirectResponse("/ui/jobs", status_code=303)


@router.get("/login")
def login_page(
    request: Request,
    next: Annotated[str, Query(max_length=2048)] = "",
    reason: Annotated[str, Query(max_length=500)] = "",
) -> HTMLResponse:
    """The login form (paste an API key)."""
    return page(request, "login.html", {"next": next, "error": reason, "tenant": None})


def _safe_next(target: str) -> str:
    """``target`` when it is a dashboard path (no open redirect), else the jobs list."""
    ok = target.startswith("/ui/") and not target.startswith("//") and "\\" not in target
    return target if ok and not target.startswith("/ui/login") else "/ui/jobs"


@router.post("/login")
def login(
    request: Request,
    session: SessionDep,
    key: Annotated[str, Form(max_length=512)] = "",
    next: Annotated[str, Form(max_length=2048)] = "",
) -> Response:
    """Check the pasted key like a bearer key; set the login cookie and go on (303), or the
    login page again with the reason (401)."""
    try:
        if not key.strip():
            raise tenants.AuthError("paste an API key (dk_...)")
        authenticate_key(session, key)
    except tenants.AuthError as e:
        return page(
            request,
            "login.html",
            {"next": next, "error": str(e), "tenant": None},
            status_code=401,
        )
    response = RedirectResponse(_safe_next(next), status_code=303)
    set_login_cookie(request, response, key)
    return response


@router.post("/logout")
def logout() -> RedirectResponse:
    """Clear the login cookie; back to the login page."""
    response = RedirectResponse("/ui/login", status_code=303)
    clear_login_cookie(response)
    return response


@router.get("/jobs")
def jobs_page(
    request: Request,
    session: SessionDep,
    caller: UiCallerDep,
    status: StatusFilter = None,
    cursor: Cursor = None,
    name: NameFilter = None,
) -> HTMLResponse:
    """The tenant's jobs, newest first, 20 a page, filtered by status and by a part of their
    name (case-insensitive); each with its name and dataset (an upload by its filename)."""
    try:
        rows, next_cursor = repository.list_jobs(
            session, status, PAGE_SIZE, cursor, tenant_id=caller.tenant_id, name_contains=name
        )
    except ValueError as e:
        raise SpecError("cursor", str(e)) from None
    names = filenames(session, (views.dataset_ref(j.spec) for j in rows), caller.tenant_id)
    return page(
        request,
        "jobs.html",
        {
            "tenant": _tenant_name(session, caller),
            "jobs": rows,
            "status": status or "",
            "name": name or "",
            "filters": _filter_query(status, name),
            "dataset_of": lambda job: label(views.dataset_ref(job.spec), names),
            "statuses": STATUSES,
            "next_cursor": next_cursor,
            "cursor": cursor,
            "main_metric": views.main_metric,
            "metrics_of": views.metrics_of,
        },
    )


def _spec_form(
    request: Request,
    session: SessionDep,
    caller: Caller,
    text: str,
    errors: list[dict[str, str]] | None = None,
    message: str = "",
    token: str | None = None,
    status_code: int = 200,
) -> HTMLResponse:
    return page(
        request,
        "submit.html",
        {
            "tenant": _tenant_name(session, caller),
            "text": text,
            "errors": errors or [],
            "message": message,
            "token": token or str(uuid.uuid4()),
        },
        status_code=status_code,
    )


@router.get("/jobs/new")
def submit_page(request: Request, session: SessionDep, caller: UiCallerDep) -> HTMLResponse:
    """The submit form, with an example spec."""
    return _spec_form(request, session, caller, EXAMPLE_SPEC)


def parse_spec_text(text: str) -> dict[str, Any]:
    """A pasted job spec (JSON, or YAML) as a mapping.

    Raises:
        SpecError: not JSON or YAML, or not a mapping (field ``spec``, 422).
    """
    try:
        data = json.loads(text)
    except RecursionError:
        raise SpecError("spec", "the spec nests arrays or objects too deeply to be read") from None
    except ValueError:
        try:
            data = yaml.safe_load(text)
        except RecursionError:
            raise SpecError(
                "spec", "the spec nests lists or mappings too deeply to be read"
            ) from None
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            reason = getattr(e, "problem", None) or str(e)
            raise SpecError("spec", f"neither JSON nor YAML{where}: {reason}") from None
    if not isinstance(data, dict):
        raise SpecError(
            "spec", "the spec must be a mapping (teacher, method, dataset, training, ...)"
        )
    return data


@router.post("/jobs/new")
def submit(
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    celery: CeleryDep,
    caller: UiCallerDep,
    spec: Annotated[str, Form(max_length=200_000)] = "",
    token: Annotated[str, Form(max_length=255)] = "",
) -> Response:
    """Validate the pasted spec as ``POST /v1/jobs`` does (the same JSON validation and
    :func:`core.service.submit`; ``token`` is its idempotency key, so a double submit makes one
    job) and go to the new job's page (303); the form again with each bad field and its
    reason (422), or the quota / broker error (429, 503)."""
    try:
        data = parse_spec_text(spec)
        job_spec = JobSubmit.model_validate_json(json.dumps(data, default=str))
    except SpecError as e:
        return _spec_form(
            request,
            session,
            caller,
            spec,
            [{"field": e.field or "spec", "reason": e.reason}],
            token=token,
            status_code=422,
        )
    except ValidationError as e:
        errors = validation_details(
            [{**err, "loc": ("body", *err.get("loc", ()))} for err in e.errors()], JobSubmit
        )
        return _spec_form(request, session, caller, spec, errors, token=token, status_code=422)
    try:
        job, _ = service.submit(
            session,
            celery,
            settings,
            job_spec.job_spec(),
            tenant_id=caller.tenant_id,
            idempotency_key=idempotency.check_key(token or None),
            name=job_spec.name,
            metadata=job_spec.metadata,
        )
    except SpecError as e:  # the spec cannot run: its field and reason, as the API answers
        name_uploads_in_error(session, e, caller.tenant_id)
        return _spec_form(
            request,
            session,
            caller,
            spec,
            [{"field": e.field, "reason": e.reason}],
            status_code=422,
        )
    except DomainError as e:
        name_uploads_in_error(session, e, caller.tenant_id)
        errors = [{"field": e.field, "reason": e.message}] if e.field else []
        return _spec_form(
            request,
            session,
            caller,
            spec,
            errors,
            message=e.message if not e.field else "",
            token=token if http_status(e) != 422 else None,
            status_code=http_status(e),
        )
    return RedirectResponse(f"/ui/jobs/{job.id}", status_code=303)


def _filter_query(status: str | None, name: str | None) -> str:
    """The list page's filters as a query string (``status=...&name=...&``, or empty)."""
    pairs = {k: v for k, v in (("status", status), ("name", name)) if v}
    return urlencode(pairs) + "&" if pairs else ""


def _job_context(session: SessionDep, caller: Caller, job: Job) -> dict[str, Any]:
    teacher = str(job.spec.get("teacher", ""))
    dataset = views.dataset_ref(job.spec)
    names = filenames(session, (teacher, dataset), caller.tenant_id)
    return {
        "job": job,
        "job_error": name_uploads(session, job.error, caller.tenant_id) if job.error else "",
        "teacher_label": label(teacher, names),
        "dataset_label": label(dataset, names),
        "finished": job.status in FINISHED,
        "artifacts": service.artifacts(session, job.id, tenant_id=caller.tenant_id),
        "checkpoints": service.job_checkpoints(session, job.id, tenant_id=caller.tenant_id),
        "metrics": views.metrics_of(job),
        "table": views.comparison_table(views.metrics_of(job))
        if job.status == JobStatus.SUCCEEDED
        else [],
        "spec_json": json.dumps(job.spec, indent=2),
    }


@router.get("/jobs/{job_id}")
def job_page(
    job_id: JobId, request: Request, session: SessionDep, caller: UiCallerDep
) -> HTMLResponse:
    """One job: live progress (polled while it runs), teacher vs student, artifacts and
    checkpoints to download, its events."""
    job = service.get(session, job_id, tenant_id=caller.tenant_id)
    events = list_events(session, job_id, limit=EVENTS_PAGE + 1)
    return page(
        request,
        "job.html",
        {
            "tenant": _tenant_name(session, caller),
            **_job_context(session, caller, job),
            "events": [event_dict(e) for e in events[:EVENTS_PAGE]],
            "events_more": events[EVENTS_PAGE - 1].id if len(events) > EVENTS_PAGE else None,
        },
    )


@router.get("/jobs/{job_id}/live")
def job_live(
    job_id: JobId,
    request: Request,
    session: SessionDep,
    caller: UiCallerDep,
    was: Annotated[str, Query(max_length=16)] = "",
) -> Response:
    """The progress fragment (htmx polls it every 2 s while the job is unfinished). When the
    job has finished since the page was drawn (``was`` its status then), the answer asks
    htmx to reload the page (``HX-Refresh``), which then shows the results."""
    job = service.get(session, job_id, tenant_id=caller.tenant_id)
    headers = {"HX-Refresh": "true"} if job.status in FINISHED and was not in FINISHED else {}
    return templates(request).TemplateResponse(
        request,
        "_live.html",
        {"job": job, "finished": job.status in FINISHED},
        headers=headers,
    )


@router.get("/jobs/{job_id}/events")
def job_events_fragment(
    job_id: JobId,
    request: Request,
    session: SessionDep,
    caller: UiCallerDep,
    after: Annotated[int, Query(ge=0, le=2**63 - 1)] = 0,
) -> HTMLResponse:
    """The next page of the event list (rows after event ``after``), for htmx."""
    service.get(session, job_id, tenant_id=caller.tenant_id)
    events = list_events(session, job_id, after=after, limit=EVENTS_PAGE + 1)
    return page(
        request,
        "_events.html",
        {
            "job_id": job_id,
            "events": [event_dict(e) for e in events[:EVENTS_PAGE]],
            "events_more": events[EVENTS_PAGE - 1].id if len(events) > EVENTS_PAGE else None,
        },
    )


@router.get("/jobs/{job_id}/curves")
def curves_page(
    job_id: JobId,
    request: Request,
    session: SessionDep,
    settings: SettingsDep,
    caller: UiCallerDep,
) -> HTMLResponse:
    """Learning curves: train loss and dev metrics against the step, per stage; the table of
    evaluations and of stages."""
    job = service.get(session, job_id, tenant_id=caller.tenant_id)
    names = [a.name for a in service.artifacts(session, job_id, tenant_id=caller.tenant_id)]
    log = views.read_train_log(settings, job_id, names) if job.status == JobStatus.SUCCEEDED else []
    return page(
        request,
        "curves.html",
        {
            "tenant": _tenant_name(session, caller),
            "job": job,
            "finished": job.status in FINISHED,
            "curves": views.curves(job, log),
        },
    )


@router.post("/jobs/{job_id}/cancel")
def cancel(
    job_id: JobId,
    session: SessionDep,
    settings: SettingsDep,
    celery: CeleryDep,
    caller: UiCallerDep,
) -> RedirectResponse:
    """Cancel the job (as ``POST /v1/jobs/{id}/cancel``); back to its page."""
    service.cancel(session, job_id, tenant_id=caller.tenant_id, settings=settings, celery=celery)
    return RedirectResponse(f"/ui/jobs/{job_id}", status_code=303)


@router.get("/jobs/{job_id}/archive")
def download_archive(
    job_id: JobId, session: SessionDep, settings: SettingsDep, caller: UiCallerDep
) -> FileResponse:
    """The student as ``<job id>.tar.gz`` (the API's ``/v1/jobs/{id}/archive``)."""
    return jobs_api.download_archive(job_id, session, settings, caller)


@router.get("/jobs/{job_id}/artifacts/{name}", response_model=None)
def download_artifact(
    job_id: JobId,
    name: ArtifactName,
    session: SessionDep,
    settings: SettingsDep,
    caller: UiCallerDep,
) -> FileResponse | StreamingResponse:
    """One file of the job (the API's ``/v1/jobs/{id}/artifacts/{name}``)."""
    return jobs_api.download_artifact(job_id, name, session, settings, caller)


@router.get("/jobs/{job_id}/checkpoints/{name}/archive")
def download_checkpoint(
    job_id: JobId,
    name: CheckpointName,
    session: SessionDep,
    settings: SettingsDep,
    caller: UiCallerDep,
) -> FileResponse:
    """One checkpoint's student as a tar.gz (the API's checkpoint archive)."""
    return jobs_api.download_checkpoint_archive(job_id, name, session, settings, caller)


@router.get("/compare")
def compare_page(request: Request, session: SessionDep, caller: UiCallerDep) -> HTMLResponse:
    """The students of the tenant's succeeded jobs (the newest 500): main test metric
    against latency at batch 1, per dataset, with the Pareto front; and a table."""
    rows = list(
        session.scalars(
            select(Job)
            .where(Job.tenant_id == caller.tenant_id, Job.status == JobStatus.SUCCEEDED)
            .order_by(Job.finished_at.desc(), Job.id.desc())
            .limit(COMPARE_MAX_JOBS)
        )
    )
    return page(
        request,
        "compare.html",
        {
            "tenant": _tenant_name(session, caller),
            "groups": views.compare_groups(
                rows,
                filenames(
                    session,
                    {
                        r
                        for j in rows
                        for r in (views.dataset_ref(j.spec), str(j.spec.get("teacher", "")))
                    },
                    caller.tenant_id,
                ),
            ),
            "limit": COMPARE_MAX_JOBS,
            "count": len(rows),
        },
    )
