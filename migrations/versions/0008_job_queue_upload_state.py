"""jobs.queue (the queue a job is sent to) and files.updated_at / files.error (uploads in progress
and refused ones)

Revision ID: 0008_job_queue_upload_state
Revises: 0007_checkpoints
Create Date: 2026-12-07

Existing jobs get the queue the environment running the migration sends to
(``DISTILLERY_QUEUE``, or a ``.env`` file; ``cpu`` when unset): the one their messages went to. Existing files
(all ``ready``) get ``updated_at = created_at``. The downgrade drops the three columns and
deletes the rows of uploads that are not ``ready`` (in progress or refused: an older version
would take them for usable files).
"""

import sqlalchemy as sa
from alembic import op

from core.settings import Settings

revision = "0008_job_queue_upload_state"
down_revision = "0007_checkpoints"
branch_labels = None
depends_on = None


def upgrade() -> None:
    queue = Settings().queue  # DISTILLERY_QUEUE (or .env), default cpu
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("queue", sa.String(64), nullable=False, server_default=queue))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("queue", server_default=None)
    with op.batch_alter_table("files") as batch:
        batch.add_column(sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("error", sa.Text(), nullable=True))
    op.execute("UPDATE files SET updated_at = created_at")
    with op.batch_alter_table("files") as batch:
        batch.alter_column("updated_at", existing_type=sa.DateTime(timezone=True), nullable=False)
    op.create_index("ix_files_status_updated", "files", ["status", "updated_at"])


def downgrade() -> None:
    op.drop_index("ix_files_status_updated", table_name="files")
    op.execute("DELETE FROM files WHERE status <> 'ready'")
    with op.batch_alter_table("files") as batch:
        batch.drop_column("error")
        batch.drop_column("updated_at")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("queue")
