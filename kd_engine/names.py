"""Names the engine writes and the API and worker read: a job's artifact files, the checkpoint
layout, the report's content security policy and the selectable metrics.

Plain constants with no imports, so that a process that only serves or lists artifacts (the
API) needs no torch-heavy engine module to name them. The engine's modules re-export them
where they were defined before (``kd_engine.run.LOG_FILE`` is :data:`LOG_FILE`).
"""

from __future__ import annotations

METRICS_FILE = "metrics.json"
"""A job's final metrics (JSON) among its artifacts."""

LOG_FILE = "train_log.jsonl"
"""A job's training log (one JSON object per line) among its artifacts."""

REPORT_FILE = "report.html"
"""The report's file name among a job's artifacts."""

CSP = "default-src 'none'; style-src 'unsafe-inline'"
"""The Content-Security-Policy the report is served with (inline styles and data: images only;
no script)."""

STUDENT_DIR = "student"
"""A checkpoint's transformers directory of the student (config, safetensors, tokenizer)."""

CACHE_FILE = "teacher_logits.safetensors"
"""A teacher-output cache's file inside its directory."""

CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "mcc")
"""The selectable metrics of a classification job."""

REGRESSION_METRICS = ("pearson", "spearman")
"""The selectable metrics of a regression job ("mse" is reported too; lower is better)."""
