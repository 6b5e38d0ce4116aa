"""jobs.name and jobs.metadata: a job's optional name and free-form string labels

Revision ID: 0009_job_name_metadata
Revises: 0008_job_queue_upload_state
Create Date: 2026-12-07
"""

import sqlalchemy as sa
from alembic import op

revision = "0009_job_name_metadata"
down_revision = "0008_job_queue_upload_state"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("name", sa.String(128), nullable=True))
    op.add_column("jobs", sa.Column("metadata", sa.JSON(), nullable=True))
    op.create_index("ix_jobs_tenant_name", "jobs", ["tenant_id", "name"])


def downgrade() -> None:
    op.drop_index("ix_jobs_tenant_name", table_name="jobs")
    op.drop_column("jobs", "metadata")
    op.drop_column("jobs", "name")
