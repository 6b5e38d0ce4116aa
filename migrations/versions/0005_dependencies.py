"""job_dependencies: a waiting job and the jobs it waits for

Revision ID: 0005_dependencies
Revises: 0004_events
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0005_dependencies"
down_revision = "0004_events"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_dependencies",
        sa.Column(
            "job_id",
            sa.String(36),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("depends_on", sa.String(36), primary_key=True),
    )
    op.create_index("ix_job_dependencies_depends_on", "job_dependencies", ["depends_on"])


def downgrade() -> None:
    op.drop_index("ix_job_dependencies_depends_on", table_name="job_dependencies")
    op.drop_table("job_dependencies")
