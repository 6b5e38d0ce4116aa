"""Retention: delete finished jobs (and their artifacts) older than the operator's period.

``DISTILLERY_RETENTION_DAYS`` (default unset: keep everything) is the period; run
``python -m core.retention`` (from cron, a systemd timer or a Kubernetes CronJob) to apply it.
A job counts from when it finished; queued, running and cancelling jobs are never deleted, nor
a job whose model an unfinished job names as ``job:<id>`` (it is deleted by a later run).
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timedelta

from sqlalchemy.orm import Session

from core import repository, service
from core.db import make_engine, make_sessionmaker, utcnow
from core.settings import Settings, get_settings

log = logging.getLogger("distillery.retention")


def delete_expired(session: Session, settings: Settings, now: datetime | None = None) -> list[str]:
    """Delete the jobs that finished more than ``settings.retention_days`` days before ``now``
    (default: the current time), with their artifact rows and directories; commits each.

    Returns:
        The ids deleted, oldest first ([] when ``retention_days`` is None).
    """
    if settings.retention_days is None:
        return []
    before = (now or utcnow()) - timedelta(days=settings.retention_days)
    deleted: list[str] = []
    for job_id in repository.finished_before(session, before):
        users = repository.jobs_using_model(session, job_id)
        if users:
            log.info("job %s: kept, its model is used by %s", job_id, ", ".join(users))
            continue
        if repository.delete_finished(session, job_id):
            session.commit()
            service.remove_artifacts(settings, job_id)
            deleted.append(job_id)
        else:
            session.rollback()
    return deleted


def main() -> int:
    """Apply the retention period of the environment's settings; print each deleted id.
    Returns the exit status (0, also when retention is off)."""
    logging.basicConfig(level=logging.INFO)
    settings = get_settings()
    if settings.retention_days is None:
        print("retention is off (DISTILLERY_RETENTION_DAYS is not set); nothing deleted")
        return 0
    engine = make_engine(settings.database_url)
    try:
        with make_sessionmaker(engine)() as session:
            deleted = delete_expired(session, settings)
    finally:
        engine.dispose()
    for job_id in deleted:
        print(job_id)
    print(
        f"deleted {len(deleted)} job(s) finished more than {settings.retention_days:g} days ago",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
