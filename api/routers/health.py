"""/healthz: the database and the broker answer."""

from __future__ import annotations

import redis
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from api.deps import SessionDep, SettingsDep
from api.schemas import Health

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, responses={503: {"model": Health}})
def healthz(session: SessionDep, settings: SettingsDep) -> JSONResponse:
    """200 when the database and the broker answer, 503 (with which one failed) otherwise."""
    try:
        session.execute(text("SELECT 1"))
        database = "ok"
    except SQLAlchemyError as e:
        database = f"error: {type(e).__name__}"
    try:
        client = redis.Redis.from_url(
            settings.broker_url, socket_timeout=2, socket_connect_timeout=2
        )
        client.ping()
        broker = "ok"
    except redis.RedisError as e:
        broker = f"error: {type(e).__name__}"
    ok = database == "ok" and broker == "ok"
    body = Health(status="ok" if ok else "degraded", database=database, broker=broker)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)
