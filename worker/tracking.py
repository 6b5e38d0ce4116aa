"""MLflow tracking of the worker's jobs (optional: ``DISTILLERY_MLFLOW_TRACKING_URI``).

When the setting is set, each attempt of a job becomes an MLflow run of the experiment
``DISTILLERY_MLFLOW_EXPERIMENT`` (created if missing): run name = the job id; tags
``distillery.job_id``, ``distillery.tenant``, ``distillery.method``, ``distillery.attempt``;
params = the job spec flattened (``training.batch_size``, ``method.name``, ...); metrics = each
dev evaluation's train loss(es) and dev metrics (``train_loss``, ``train_losses.<name>``,
``dev.<metric>``, at the global optimiser step), then the final test metrics (``test.<metric>``,
``teacher_test.<metric>``); artifacts = the student directory under ``student/``. The run ends
FINISHED, FAILED or KILLED (cancelled, paused, lost) with the job.

MLflow is imported only when tracking is on (``pip install 'distillery[mlflow]'``), through
:class:`mlflow.tracking.MlflowClient` (no process-global active run). Tracking never fails a
job: the first error (MLflow missing, the server unreachable, a refused value) is reported
through ``warn`` (a ``warning`` job event and a log line) and tracking stops for that job.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from core.job_status import JobStatus
from core.settings import Settings
from kd_engine.contracts import load_metrics

log = logging.getLogger("distillery.worker")

MAX_PARAM_CHARS = 500
"""Longest param value sent (longer ones, such as a list of eval sets, are cut with '...')."""
_BATCH = 100  # MLflow's log_batch takes at most 100 params per call


_NAME_CHARS = re.compile(r"[^A-Za-z0-9_\-. /]")


def flatten(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted key, leaf)`` pairs of nested mappings; lists are leaves. Characters MLflow
    refuses in a name (anything but letters, digits, ``_-. /``) become ``_``, and names are cut
    at 250 characters."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            name = _NAME_CHARS.sub("_", str(k))
            yield from flatten(v, f"{prefix}.{name}" if prefix else name)
    else:
        yield prefix[:250], value


def numeric_metrics(values: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The finite numbers (not bools) among the flattened ``values``, keyed ``<prefix>.<key>``."""
    out: dict[str, float] = {}
    for key, v in flatten(values, prefix):
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            out[key] = float(v)
    return out


def _param_value(v: Any) -> str:
    text = v if isinstance(v, str) else json.dumps(v, default=str)
    return text if len(text) <= MAX_PARAM_CHARS else text[: MAX_PARAM_CHARS - 3] + "..."


class JobTracker:
    """The MLflow run of one job attempt; every method is a no-op once tracking is off.

    Args:
        settings: ``mlflow_tracking_uri`` (None: tracking off) and ``mlflow_experiment``.
        job_id, tenant_id, attempt: the job and its attempt (tags).
        spec: the stored job spec (a JSON object), logged as params.
        warn: called once with a message when tracking fails (the job goes on).
    """

    def __init__(
        self,
        settings: Settings,
        job_id: str,
        tenant_id: str,
        attempt: int,
        spec: Mapping[str, Any],
        warn: Callable[[str], None],
    ) -> None:
        self.uri = settings.mlflow_tracking_uri
        self.experiment = settings.mlflow_experiment
        self.job_id = job_id
        self.tenant_id = tenant_id
        self.attempt = attempt
        self.spec = spec
        self.warn = warn
        self.client: Any = None
        self.run_id: str | None = None
        self.ended = False

    @property
    def active(self) -> bool:
        """Whether a run is open and tracking has not failed."""
        return self.client is not None and self.run_id is not None and not self.ended

    def _fail(self, what: str, e: BaseException) -> None:
        log.warning("job %s: MLflow %s failed: %s", self.job_id, what, e, exc_info=True)
        self.ended = True
        try:
            self.warn(
                f"MLflow tracking stopped ({what} failed: {type(e).__name__}: {e}); "
                "the job goes on untracked"
            )
        except Exception:
            log.exception("job %s: the MLflow warning could not be recorded", self.job_id)

    def start(self) -> None:
        """Open the run (with its tags and params). Does nothing when tracking is off."""
        if not self.uri:
            return
        try:
            from mlflow.entities import Param
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(tracking_uri=self.uri)
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = (
                exp.experiment_id
                if exp is not None
                else self.client.create_experiment(self.experiment)
            )
            method = self.spec.get("method")
            tags = {
                "distillery.job_id": self.job_id,
                "distillery.tenant": self.tenant_id,
                "distillery.method": str(method.get("name")) if isinstance(method, dict) else "",
                "distillery.attempt": str(self.attempt),
            }
            run = self.client.create_run(exp_id, run_name=self.job_id, tags=tags)
            self.run_id = run.info.run_id
            params = [Param(k, _param_value(v)) for k, v in flatten(self.spec) if k]
            for i in range(0, len(params), _BATCH):
                self.client.log_batch(self.run_id, params=params[i : i + _BATCH])
        except Exception as e:
            self._fail(f"starting the run at {self.uri!r}", e)

    def _metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = _now_ms()
        batch = [Metric(k, v, now, step) for k, v in values.items()]
        for i in range(0, len(batch), _BATCH):
            self.client.log_batch(self.run_id, metrics=batch[i : i + _BATCH])

    def on_log(self, record: Mapping[str, object]) -> None:
        """A training-log record: an ``epoch`` or ``evaluation`` record's losses and dev metrics
        are logged at its global ``step``; other records are ignored."""
        if not self.active or record.get("event") not in ("epoch", "evaluation"):
            return
        try:
            values = numeric_metrics(
                {
                    "train_loss": record.get("train_loss"),
                    "train_losses": record.get("train_losses") or {},
                    "dev": record.get("dev") or {},
                    "epoch": record.get("epoch"),
                },
                "",
            )
            step = record.get("step")
            self._metrics(values, int(step) if isinstance(step, int | float) else 0)
        except Exception as e:
            self._fail("logging metrics", e)

    def finished(self, metrics: Mapping[str, Any], student_dir: Path) -> None:
        """The job's final metrics (``test``, ``teacher_test``) at its last step, and the
        student directory's files as artifacts under ``student/``."""
        if not self.active:
            return
        try:
            typed = load_metrics(metrics)
            step = sum(st.steps or 0 for st in typed.stages)
            final: dict[str, float] = {}
            for part, scores in (("test", typed.test), ("teacher_test", typed.teacher_test)):
                if scores is not None:
                    final.update(numeric_metrics(scores, part))
            if final:
                self._metrics(final, step)
            self.client.log_artifacts(self.run_id, str(student_dir), artifact_path="student")
        except Exception as e:
            self._fail("logging the final metrics and the student", e)

    def end(self, status: str) -> None:
        """Close the run: ``status`` is the job's outcome (``succeeded`` -> FINISHED,
        ``failed`` -> FAILED, anything else -> KILLED). Idempotent."""
        if not self.active:
            return
        outcomes: dict[str, str] = {JobStatus.SUCCEEDED: "FINISHED", JobStatus.FAILED: "FAILED"}
        mlflow_status = outcomes.get(status, "KILLED")
        try:
            self.client.set_terminated(self.run_id, status=mlflow_status)
            self.ended = True
        except Exception as e:
            self._fail("ending the run", e)


def _now_ms() -> int:
    import time

    return int(time.time() * 1000)
