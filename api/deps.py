"""FastAPI dependencies: settings, a database session per request, the Celery client."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, Request
from sqlalchemy.orm import Session

from core.settings import Settings


def get_settings(request: Request) -> Settings:
    """The app's settings."""
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """A session for the request; rolled back if the handler did not commit."""
    with request.app.state.sessionmaker() as session:
        yield session


def get_celery(request: Request) -> Celery:
    """The Celery client used to send tasks."""
    celery: Celery = request.app.state.celery
    return celery


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
CeleryDep = Annotated[Celery, Depends(get_celery)]
