"""The FastAPI application. Run with ``uvicorn api.main:app``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import transformers
from fastapi import FastAPI

from api import authgate, errors, limits, metrics, request_logs, ui
from api.routers import events as events_router
from api.routers import files, health, jobs, keys
from api.routers import webhooks as webhooks_router
from core import logs, webhooks
from core.db import make_engine, make_sessionmaker
from core.queue import make_celery
from core.settings import Settings, get_settings
from core.storage import check_storage


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the app for ``settings`` (default: from the environment)."""
    settings = settings or get_settings()
    logs.configure(settings.log_format)
    transformers.logging.set_verbosity_error()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        check_storage(settings)  # s3: the bucket and credentials, before serving anything
        # The webhook dispatcher thread (unless it runs as its own process).
        dispatcher = None
        if settings.webhook_dispatcher_in_api:
            dispatcher = webhooks.Dispatcher(settings, app.state.sessionmaker)
            dispatcher.start()
        try:
            yield
        finally:
            if dispatcher is not None:
                dispatcher.stop()
            app.state.engine.dispose()  # close the pool's connections with the app

    app = FastAPI(
        lifespan=lifespan,
        title="Distillery",
        version="1.0",
        description="Knowledge distillation as a service: submit a job, watch it, download the "
        "distilled student.",
    )
    app.state.settings = settings
    app.state.engine = make_engine(settings.database_url)
    app.state.sessionmaker = make_sessionmaker(app.state.engine)
    app.state.celery = make_celery(settings)
    errors.install(app)
    limits.install(app, settings.max_json_body_bytes, settings.max_upload_bytes)
    authgate.install(app)  # outside the body limit: a request without a key gets 401 first
    metrics.install(app, settings, app.state.sessionmaker)
    request_logs.install(app)
    app.include_router(jobs.router)
    app.include_router(files.router)
    app.include_router(keys.router)
    app.include_router(events_router.router)
    app.include_router(webhooks_router.router)
    app.include_router(health.router)
    ui.install(app)
    return app


app = create_app()
