"""A short schemathesis fuzz of every operation of the OpenAPI schema (bench/fuzz.py's stateless
phase), authenticated, against the real PostgreSQL and Redis: no case may be answered 5xx.
docs/reliability.md has the long run (stateless and stateful)."""

from __future__ import annotations

import json

import redis
import schemathesis

from api.main import create_app
from bench.fuzz import (
    KeyHolder,
    Recorder,
    Tally,
    operations_of,
    reference_pool,
    run_stateless,
)
from core.settings import Settings

PER_OPERATION = 12  # x 2 generation modes x every operation (+ POSTs): ~330 cases, ~30 s


def test_fuzz_every_operation_without_a_server_error(settings: Settings) -> None:
    app = create_app(settings)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = {op.label for op in operations_of(schema)}
    assert {"POST /v1/jobs", "GET /v1/jobs/{job_id}", "DELETE /v1/keys/{key_id}"} <= operations
    tally = Tally()
    recorder = Recorder(tally, KeyHolder(settings.database_url, "fuzz"), conformance=False)

    run_stateless(schema, recorder, PER_OPERATION, seed=None, references=reference_pool([]))

    assert tally.server_errors == [], json.dumps(tally.server_errors, indent=2)
    assert tally.generation_errors == [], tally.generation_errors
    assert tally.total() >= 200
    # every operation was exercised, authenticated (2xx/404/422 answers, not only 401s)
    for label in operations:
        codes = tally.statuses_by_operation[label]
        assert sum(codes.values()) > 0, label
        assert any(code != 401 for code in codes), (label, codes)
    assert tally.statuses[200] > 0 and tally.statuses[422] > 0
    redis.Redis.from_url(settings.broker_url).flushdb()
