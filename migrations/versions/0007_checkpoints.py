"""job_checkpoints: the training checkpoints a job's worker saved (for resume and download)

Revision ID: 0007_checkpoints
Revises: 0006_webhooks
Create Date: 2026-11-23
"""

import sqlalchemy as sa
from alembic import op

revision = "0007_checkpoints"
down_revision = "0006_webhooks"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "job_checkpoints",
        sa.Column(
            "job_id",
            sa.String(36),
            sa.ForeignKey("jobs.id", ondelete="CASCADE"),
            primary_key=True,
        ),
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("step", sa.Integer(), nullable=False),
        sa.Column("total_steps", sa.Integer(), nullable=False),
        sa.Column("hop", sa.Integer(), nullable=False),
        sa.Column("stage", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(16), nullable=False),
        sa.Column("dev", sa.JSON(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("files", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
    )
    op.create_index(
        "ix_job_checkpoints_job_created", "job_checkpoints", ["job_id", "created_at"]
    )


def downgrade() -> None:
    op.drop_index("ix_job_checkpoints_job_created", table_name="job_checkpoints")
    op.drop_table("job_checkpoints")
