"""The web dashboard: server-rendered pages (Jinja2) with htmx, under ``/ui``.

:func:`install` adds its routes (:mod:`api.ui.routes`), its static files (``/ui/static``: the
vendored htmx and the stylesheet) and its templates to an app; nothing happens at import.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from api.ui import views

HERE = Path(__file__).resolve().parent
TEMPLATES_DIR = HERE / "templates"
STATIC_DIR = HERE / "static"
HTMX_VERSION = "2.0.11"
"""The vendored htmx (``static/htmx.min.js``, from the npm package ``htmx.org``)."""


def make_templates() -> Jinja2Templates:
    """The dashboard's Jinja2 templates (autoescaped) with its number and date filters."""
    t = Jinja2Templates(directory=str(TEMPLATES_DIR))
    t.env.filters["num"] = views.fmt_value
    t.env.filters["bytes"] = views.fmt_bytes
    t.env.filters["ms"] = views.fmt_ms
    t.env.filters["when"] = lambda d: d.strftime("%Y-%m-%d %H:%M:%S") if d else "—"
    t.env.globals["htmx_version"] = HTMX_VERSION
    return t


def install(app: FastAPI) -> None:
    """Add the dashboard to ``app``: ``/ui`` pages, ``/ui/static`` files, the templates
    (``app.state.ui_templates``)."""
    from api.ui.routes import router

    app.state.ui_templates = make_templates()
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=str(STATIC_DIR)), name="ui-static")
