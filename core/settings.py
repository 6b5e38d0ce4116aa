"""Settings shared by the API and the worker, read from the environment (prefix ``DISTILLERY_``)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GIB = 1 << 30


class Settings(BaseSettings):
    """One settings object for api and worker.

    Every field can be set as an environment variable ``DISTILLERY_<FIELD>`` (for example
    ``DISTILLERY_DATABASE_URL``). Paths are local filesystem paths.
    """

    model_config = SettingsConfigDict(env_prefix="DISTILLERY_", env_file=".env", extra="ignore")

    database_url: str = Field(
        "sqlite:///var/distillery.db",
        description="SQLAlchemy URL: sqlite:///path or postgresql+psycopg://user@host/db.",
    )
    broker_url: str = Field("redis://127.0.0.1:6379/0", description="Celery broker (Redis).")
    queue: str = Field("cpu", description="Celery queue the API sends new jobs to (cpu or gpu).")
    artifacts_root: Path = Field(Path("var/artifacts"), description="Where job artifacts live.")
    models_root: Path = Field(Path("var/models"), description="Root for file:// model references.")
    data_root: Path = Field(Path("var/data"), description="Root for file:// dataset references.")
    uploads_root: Path = Field(
        Path("var/uploads"), description="Where uploaded models and datasets are stored."
    )
    storage_backend: Literal["local", "s3"] = Field(
        "local",
        description="Where artifacts, uploads, checkpoints and teacher caches are stored: local "
        "(artifacts_root / uploads_root, a folder or a shared filesystem) or s3 (an "
        "S3-compatible bucket: s3_bucket, s3_prefix, s3_endpoint_url, s3_region).",
    )
    s3_bucket: str | None = Field(
        None, description="The bucket of the s3 backend (required with storage_backend=s3)."
    )
    s3_prefix: str = Field(
        "",
        description="Key prefix inside the bucket; artifacts go under <prefix>/artifacts/ and "
        "uploads under <prefix>/uploads/.",
    )
    s3_endpoint_url: str | None = Field(
        None,
        description="Endpoint of an S3-compatible service (MinIO, Ceph, moto), such as "
        "http://minio:9000; unset for AWS S3.",
    )
    s3_region: str | None = Field(None, description="The bucket's region (unset: boto3's own).")
    s3_access_key_id: str | None = Field(
        None,
        description="Access key of the s3 backend; unset (or empty), boto3's credential chain "
        "is used (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_PROFILE, an instance or task "
        "role).",
    )
    s3_secret_access_key: SecretStr | None = Field(
        None, description="Secret key going with s3_access_key_id."
    )
    s3_multipart_threshold_bytes: int = Field(
        64 * 1024**2,
        ge=5 * 1024**2,
        description="Objects of at least this many bytes are uploaded in parts (multipart, "
        "parts of s3_multipart_chunk_bytes sent in parallel).",
    )
    s3_multipart_chunk_bytes: int = Field(
        16 * 1024**2, ge=5 * 1024**2, description="Part size of a multipart upload (bytes)."
    )
    storage_cache_dir: Path = Field(
        Path("var/storage-cache"),
        description="With the s3 backend: local copies of stored objects that a process needs "
        "as files (models, datasets, checkpoints to resume) and staged job output.",
    )
    max_upload_bytes: int = Field(
        4 * GIB, ge=1, description="Largest upload (bytes), a model archive or a dataset file."
    )
    upload_stale_s: float = Field(
        600,
        gt=0,
        description="An upload still `uploading` whose row has shown no sign of life (bytes "
        "arriving, or a heartbeat every min(10, upload_stale_s / 5) s while it is received "
        "and checked) for this long belongs to a dead API process: the reconciler deletes its "
        "row and its stored files.",
    )
    max_archive_members: int = Field(
        256, ge=1, description="Most entries (files and folders) in an uploaded model archive."
    )
    max_unpacked_bytes: int = Field(
        6 * GIB, ge=1, description="Largest total size (bytes) of a model archive once unpacked."
    )
    cache_dir: Path = Field(
        Path("var/cache"), description="Converted built-in models (e.g. minilm-l3) are kept here."
    )
    allow_hub: bool = Field(False, description="Allow hf:// references (needs network access).")
    visibility_timeout_s: int = Field(
        48 * 3600, description="Redis redelivery timeout (seconds); above the longest job."
    )
    heartbeat_timeout_s: float = Field(
        900,
        gt=0,
        description="A running (cancelling, pausing) job with no heartbeat for this long has "
        "lost its worker: the reconciler re-queues it (or fails it when out of attempts).",
    )
    heartbeat_interval_s: float = Field(
        30,
        gt=0,
        description="Seconds between the heartbeats a worker writes for its running job, from "
        "a timer thread independent of training progress; well below heartbeat_timeout_s.",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        description="Attempts a job gets when its worker is lost (killed, machine gone); the "
        "last lost attempt fails the job. A job failing for its own reason is never retried.",
    )
    reconcile_interval_s: float = Field(
        60,
        gt=0,
        description="Seconds between reconciler passes (run by every worker's main process, "
        "one pass at a time across workers under a Redis lock).",
    )
    requeue_grace_s: float = Field(
        60,
        gt=0,
        description="A queued job whose message the broker does not hold (in the queue or "
        "delivered and unacknowledged) for this long is sent again; above "
        "broker_publish_timeout_s.",
    )
    broker_publish_timeout_s: float = Field(
        10,
        gt=0,
        description="Longest wait (seconds) to publish a job to the broker (connect, send, "
        "answer); a broker that does not answer in time fails the submit with 503.",
    )
    db_retry_deadline_s: float = Field(
        300,
        ge=0,
        description="Longest time (seconds) a worker retries a database write or read through "
        "transient errors (a dropped or terminated connection, a restart, a failover), with "
        "exponential backoff, before it stops the job's attempt without a verdict: the job "
        "stays running, its heartbeat goes stale and the reconciler re-queues it to resume "
        "from its newest checkpoint. Capped at heartbeat_timeout_s.",
    )
    db_retry_after_s: int = Field(
        5,
        ge=1,
        description="Retry-After (seconds) of the API's 503 answers while the database is "
        "unavailable.",
    )
    progress_every_steps: int = Field(
        5, description="Training steps between progress writes and cancel checks."
    )
    checkpoint_every_steps: int | None = Field(
        None,
        ge=1,
        description="Optimizer steps between periodic checkpoints of a running job (None: "
        "by time only). A checkpoint is also written at the end of every stage and on pause.",
    )
    checkpoint_every_s: float | None = Field(
        600.0,
        gt=0,
        description="Seconds between periodic checkpoints of a running job (None: by steps "
        "only). A job lost with its worker resumes from its latest checkpoint, so this bounds "
        "the training time lost.",
    )
    checkpoints_keep: int = Field(
        2,
        ge=1,
        description="Checkpoints kept per job in the artifact store (the newest); older ones "
        "are deleted as new ones arrive. A corrupt newest one falls back to the one before.",
    )
    max_json_body_bytes: int = Field(
        1024**2,
        ge=1,
        description="Largest request body (bytes) of a JSON (any non-multipart) request; a "
        "larger one is answered 413. File uploads (multipart) have their own cap.",
    )
    queue_memory_bytes: dict[str, int] = Field(
        default_factory=lambda: {"cpu": 16 * 1024**3, "gpu": 80 * 1024**3},
        description="Memory budget (bytes) of one worker of each queue, set as JSON such as "
        '{"cpu": 17179869184, "gpu": 85899345920}: a job whose training memory estimate '
        "(kd_engine.memory) is over its queue's budget is refused at submit (422). A queue "
        "not listed is not checked.",
    )
    retention_days: float | None = Field(
        None,
        gt=0,
        description="Finished jobs (and their artifacts) older than this many days are deleted "
        "by `python -m core.retention`; None keeps them forever.",
    )
    dataset_check_rows: int = Field(
        250_000,
        ge=1,
        description=(
            "Rows of each file:// dataset read at submit (about 1 s per 100,000 rows); a longer "
            "file is checked on this prefix and read whole by the worker."
        ),
    )
    default_max_active_jobs: int | None = Field(
        None,
        ge=0,
        description="Queued + running + cancelling jobs a tenant may have (None: unlimited); "
        "a tenant's own max_active_jobs overrides it.",
    )
    default_max_stored_bytes: int | None = Field(
        None,
        ge=0,
        description="Bytes a tenant may store (job artifacts and uploaded files; None: "
        "unlimited) before a submit or an upload is refused; a tenant's own "
        "max_stored_bytes overrides it.",
    )
    idempotency_ttl_s: int = Field(
        24 * 3600,
        ge=1,
        description="Seconds an Idempotency-Key is remembered; after that it may be reused.",
    )

    webhook_allowed_hosts: list[str] = Field(
        default_factory=list,
        description='Webhook URL allow-list, as JSON such as ["hooks.example.com", '
        '"10.1.0.0/16"]: when set, an endpoint\'s host must be one of these names or resolve '
        "into one of these networks (and then may be private); when empty, any host resolving "
        "to public addresses only.",
    )
    webhook_allow_private: bool = Field(
        False,
        description="Allow webhook URLs resolving to private, loopback, link-local or other "
        "non-public addresses (only for a trusted, internal deployment).",
    )
    webhook_max_attempts: int = Field(
        8, ge=1, description="Attempts of a webhook delivery before it is marked failed."
    )
    webhook_retry_base_s: float = Field(
        10.0,
        gt=0,
        description="Delay (seconds) before a delivery's 2nd attempt; doubled for each further "
        "attempt, capped at webhook_retry_max_s.",
    )
    webhook_retry_max_s: float = Field(
        3600.0, gt=0, description="Longest delay (seconds) between two attempts of a delivery."
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, description="Timeout (seconds) of one webhook HTTP request."
    )
    webhook_poll_interval_s: float = Field(
        2.0, gt=0, description="Seconds between two passes of the webhook dispatcher."
    )
    webhook_dispatcher_in_api: bool = Field(
        True,
        description="Run the webhook dispatcher as a thread of each API process (set False "
        "when it runs as its own process: python -m core.webhooks_dispatch).",
    )
    events_stream_poll_s: float = Field(
        0.5, gt=0, description="Seconds between two database reads of an event stream (SSE)."
    )
    events_stream_auth_check_s: float = Field(
        5.0,
        gt=0,
        description="Seconds between two checks, by an open event stream (SSE), that the API "
        "key it was opened with is still valid (not revoked, its tenant still there); the "
        "stream ends at the first check that fails.",
    )
    events_stream_keepalive_s: float = Field(
        15.0, gt=0, description="Seconds between the keep-alive comments of an event stream."
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Logs of the API and the workers: text, or json (one object per line with "
        "time, level, logger, job_id, message) for a log shipper.",
    )
    mlflow_tracking_uri: str | None = Field(
        None,
        description="When set (http://mlflow:5000, file:///path, databricks, ...), every job "
        "attempt is logged as an MLflow run: params, per-evaluation and test metrics, the "
        "student as artifacts (worker/tracking.py; needs the mlflow extra). A failure to "
        "reach MLflow is a warning event, never a failed job.",
    )
    mlflow_experiment: str = Field(
        "distillery", min_length=1, description="The MLflow experiment the runs go to."
    )
    metrics_token: str | None = Field(
        None,
        description="When set, GET /metrics wants 'Authorization: Bearer <this token>' (the "
        "Prometheus scrape config's bearer_token); unset, /metrics is open: serve it on an "
        "internal network only.",
    )

    @model_validator(mode="after")
    def _check_storage(self) -> Settings:
        if self.storage_backend == "s3":
            if not self.s3_bucket:
                raise ValueError(
                    "DISTILLERY_S3_BUCKET is required when DISTILLERY_STORAGE_BACKEND=s3"
                )
            secret = self.s3_secret_access_key
            if (not self.s3_access_key_id) != (secret is None or not secret.get_secret_value()):
                raise ValueError(
                    "DISTILLERY_S3_ACCESS_KEY_ID and DISTILLERY_S3_SECRET_ACCESS_KEY go "
                    "together: set both, or neither (boto3's credential chain)"
                )
        prefix = self.s3_prefix.strip("/")
        if prefix and any(seg in ("", ".", "..") for seg in prefix.split("/")):
            raise ValueError(
                f"DISTILLERY_S3_PREFIX {self.s3_prefix!r}: '/'-separated names, without empty, "
                "'.' or '..' parts"
            )
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Return the process-wide settings (read once from the environment)."""
    return Settings()
