"""Prometheus metrics (``GET /metrics``, prometheus-client's text format).

Two kinds:

- Read from the database and the broker at scrape time, so that every API replica reports the
  same figures whichever worker did the work (:class:`ServiceCollector`): jobs by status and
  method, queue depth, running jobs' heartbeat age, busy workers, and the durations of finished
  jobs and of their training stages as histograms. The histograms count the finished jobs the
  database still holds: when retention deletes jobs their counts fall, which Prometheus reads
  as a counter reset.
- Observed by this API process: HTTP request latency by method, route template and status
  (:func:`install`).

Nothing here is labelled by tenant; the figures are the operator's.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import redis
from fastapi import FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import ValidationError
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from core.db import Job, utcnow
from core.job_status import FINISHED, JOB_STATUSES, LIVE
from core.queue import broker_lists
from core.settings import Settings
from kd_engine.contracts import StageSummary, load_metrics

log = logging.getLogger("distillery.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

JOB_BUCKETS_S = (60.0, 300.0, 900.0, 1800.0, 3600.0, 7200.0, 14400.0, 28800.0, 86400.0)
"""Job duration buckets, seconds: one minute to a day."""
STAGE_BUCKETS_S = (10.0, 30.0, 60.0, 300.0, 900.0, 1800.0, 3600.0, 14400.0, 86400.0)
"""Training-stage duration buckets, seconds."""
HTTP_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
"""HTTP latency buckets, seconds."""


def _histogram(
    name: str,
    doc: str,
    buckets: Sequence[float],
    samples: dict[tuple[str, ...], list[float]],
    labels: Sequence[str],
) -> HistogramMetricFamily:
    """A histogram family with one series per label tuple of ``samples`` (values in seconds)."""
    family = HistogramMetricFamily(name, doc, labels=list(labels))
    for key, values in sorted(samples.items()):
        counts = [(str(b), float(sum(1 for v in values if v <= b))) for b in buckets]
        counts.append(("+Inf", float(len(values))))
        family.add_metric(list(key), counts, sum_value=float(sum(values)))
    return family


def queue_depth(broker: redis.Redis, queue: str) -> int:
    """Messages waiting in ``queue`` (every priority list of kombu's Redis transport)."""
    names = broker_lists(queue)
    return int(sum(int(broker.llen(n)) for n in names))


class ServiceCollector(Collector):
    """The service's state, read at scrape time from the database and the broker.

    A failing source is reported as ``distillery_scrape_error{source="database"|"broker"} 1``
    and its metrics are left out; the scrape itself never fails.
    """

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings, self.sessions = settings, sessions

    def describe(self) -> Iterable[Metric]:
        """Nothing: without it, registering would run :meth:`collect` (a database query and
        a broker connection at app creation, leaving a pooled connection open per app)."""
        return []

    def queues(self) -> list[str]:
        """The queues to report: the API's and every queue with a memory budget."""
        return sorted({self.settings.queue, *self.settings.queue_memory_bytes})

    def collect(self) -> Iterable[Metric]:
        errors = GaugeMetricFamily(
            "distillery_scrape_error",
            "1 when a source of these metrics could not be read during this scrape.",
            labels=["source"],
        )
        try:
            yield from self._database()
            errors.add_metric(["database"], 0.0)
        except Exception:  # a scrape must answer even when the database does not
            log.warning("metrics: the database could not be read", exc_info=True)
            errors.add_metric(["database"], 1.0)
        try:
            yield from self._broker()
            errors.add_metric(["broker"], 0.0)
        except redis.RedisError:
            log.warning("metrics: the broker could not be read", exc_info=True)
            errors.add_metric(["broker"], 1.0)
        yield errors

    def _broker(self) -> list[Metric]:
        client = redis.Redis.from_url(
            self.settings.broker_url, socket_timeout=2, socket_connect_timeout=2
        )
        try:
            depth = GaugeMetricFamily(
                "distillery_queue_depth",
                "Messages waiting in the broker's queue (sent, not yet taken by a worker).",
                labels=["queue"],
            )
            for queue in self.queues():
                depth.add_metric([queue], float(queue_depth(client, queue)))
            return [depth]
        finally:
            client.close()

    def _database(self) -> list[Metric]:
        now = utcnow()
        with self.sessions() as s:
            counts = s.execute(
                select(Job.status, Job.method, func.count()).group_by(Job.status, Job.method)
            ).all()
            running = s.execute(
                select(Job.id, Job.worker, Job.heartbeat_at).where(Job.status.in_(LIVE))
            ).all()
            finished = s.execute(
                select(Job.method, Job.status, Job.started_at, Job.finished_at, Job.metrics).where(
                    Job.status.in_(FINISHED), Job.started_at.is_not(None)
                )
            ).all()
        jobs = GaugeMetricFamily(
            "distillery_jobs", "Jobs by status and method.", labels=["status", "method"]
        )
        by_status: dict[str, int] = {status: 0 for status in JOB_STATUSES}
        for status, method, n in counts:
            jobs.add_metric([status, method], float(n))
            by_status[status] = by_status.get(status, 0) + int(n)
        totals = GaugeMetricFamily(
            "distillery_jobs_by_status", "Jobs by status, all methods.", labels=["status"]
        )
        for status, n in by_status.items():
            totals.add_metric([status], float(n))

        age = GaugeMetricFamily(
            "distillery_heartbeat_age_seconds",
            "Seconds since the last heartbeat of each running job's worker.",
            labels=["job_id", "worker"],
        )
        live: set[str] = set()
        timeout = self.settings.heartbeat_timeout_s
        for job_id, worker, beat in running:
            seconds = (now - beat).total_seconds() if beat is not None else float("inf")
            age.add_metric([job_id, worker or ""], seconds)
            if worker and seconds <= timeout:
                live.add(worker)
        busy = GaugeMetricFamily(
            "distillery_busy_workers",
            "Workers running a job whose heartbeat is within the heartbeat timeout.",
            value=float(len(live)),
        )

        job_seconds: dict[tuple[str, ...], list[float]] = {}
        stage_seconds: dict[tuple[str, ...], list[float]] = {}
        for method, status, started, ended, metrics in finished:
            if ended is not None:
                job_seconds.setdefault((method, status), []).append(
                    max(0.0, (ended - started).total_seconds())
                )
            for stage in _stages(metrics):
                stage_seconds.setdefault((method, stage.name or ""), []).append(
                    stage.seconds or 0.0
                )
        return [
            jobs,
            totals,
            age,
            busy,
            _histogram(
                "distillery_job_duration_seconds",
                "Wall-clock seconds from a finished job's last start to its end, by method and "
                "final status.",
                JOB_BUCKETS_S,
                job_seconds,
                ["method", "status"],
            ),
            _histogram(
                "distillery_stage_duration_seconds",
                "Seconds of each training stage of succeeded jobs, by method and stage name.",
                STAGE_BUCKETS_S,
                stage_seconds,
                ["method", "stage"],
            ),
        ]


def _stages(metrics: dict[str, Any] | None) -> list[StageSummary]:
    """The per-stage summaries (``metrics.stages``) with their seconds of a succeeded job's
    metrics; none for metrics that do not fit :class:`~kd_engine.contracts.JobMetrics` (the
    scrape never fails)."""
    try:
        stages = load_metrics(metrics).stages
    except ValidationError:
        return []
    return [s for s in stages if s.seconds is not None]


def install(app: FastAPI, settings: Settings, sessions: sessionmaker[Session]) -> None:
    """Give ``app`` its own registry (``app.state.metrics_registry``) with the service
    collector and an HTTP latency histogram fed by a middleware, and the ``GET /metrics``
    route. With ``settings.metrics_token`` set, ``/metrics`` wants ``Authorization: Bearer
    <token>`` (401 otherwise)."""
    registry = CollectorRegistry(auto_describe=True)
    registry.register(ServiceCollector(settings, sessions))
    latency = Histogram(
        "distillery_http_request_duration_seconds",
        "Seconds to answer an HTTP request, by method, route template and status code.",
        ["method", "route", "status"],
        buckets=HTTP_BUCKETS_S,
        registry=registry,
    )
    app.state.metrics_registry = registry

    @app.middleware("http")
    async def observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            latency.labels(request.method, template, str(status)).observe(
                time.perf_counter() - started
            )

    @app.get("/metrics", include_in_schema=False)
    def metrics(request: Request) -> Response:
        token = settings.metrics_token
        if token is not None:
            given = request.headers.get("authorization", "")
            if not _same(given, f"Bearer {token}"):
                return Response(
                    '{"error": {"code": "unauthorized", "message": "/metrics needs '
                    'Authorization: Bearer <DISTILLERY_METRICS_TOKEN>"}}',
                    status_code=401,
                    media_type="application/json",
                )
        return Response(generate_latest(registry), media_type=CONTENT_TYPE)


def _same(a: str, b: str) -> bool:
    """Constant-time string comparison."""
    return hmac.compare_digest(a.encode(), b.encode())
