"""tenants, API keys, idempotency keys; jobs belong to a tenant

Existing jobs (a database from before tenants) are given to a tenant named ``default``, created
here only when there are jobs to own; on a fresh install no tenant exists until the operator
creates one (``python -m core.admin create-tenant``).

On SQLite the ``jobs`` table is rebuilt (batch mode) to add the NOT NULL foreign key;
migrations/env.py turns SQLite's foreign-key enforcement off while migrating so that dropping
the old table does not cascade into ``artifacts``.

Revision ID: 0002_h1
Revises: 0001
Create Date: 2026-12-01
"""

import uuid
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op

revision = "0002_h1"
down_revision = "0001"
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)
DEFAULT_TENANT = "default"


def upgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("name", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("max_active_jobs", sa.Integer(), nullable=True),
        sa.Column("max_stored_bytes", sa.BigInteger(), nullable=True),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column(
            "tenant_id",
            sa.String(36),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("prefix", sa.String(16), nullable=False, unique=True),
        sa.Column("key_hash", sa.String(64), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("revoked_at", TS, nullable=True),
        sa.Column("last_used_at", TS, nullable=True),
    )
    op.create_index("ix_api_keys_tenant_id", "api_keys", ["tenant_id"])
    op.create_table(
        "idempotency_keys",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column(
            "tenant_id",
            sa.String(36),
            sa.ForeignKey("tenants.id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("route", sa.String(64), nullable=False),
        sa.Column("request_sha256", sa.String(64), nullable=False),
        sa.Column("resource_id", sa.String(64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint(
            "tenant_id", "key", "route", name="uq_idempotency_keys_tenant_key_route"
        ),
    )
    op.create_index("ix_idempotency_keys_created_at", "idempotency_keys", ["created_at"])

    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("tenant_id", sa.String(36), nullable=True))
    conn = op.get_bind()
    if conn.execute(sa.text("SELECT COUNT(*) FROM jobs")).scalar():
        tenant_id = str(uuid.uuid4())
        tenants = sa.table(
            "tenants",
            sa.column("id", sa.String),
            sa.column("name", sa.String),
            sa.column("created_at", TS),
        )
        op.execute(
            tenants.insert().values(id=tenant_id, name=DEFAULT_TENANT, created_at=datetime.now(UTC))
        )
        jobs = sa.table("jobs", sa.column("tenant_id", sa.String))
        op.execute(jobs.update().values(tenant_id=tenant_id))
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("tenant_id", existing_type=sa.String(36), nullable=False)
        batch.create_foreign_key("fk_jobs_tenant_id", "tenants", ["tenant_id"], ["id"])
        batch.create_index("ix_jobs_tenant_id", ["tenant_id"])


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_tenant_id")
        batch.drop_constraint("fk_jobs_tenant_id", type_="foreignkey")
        batch.drop_column("tenant_id")
    op.drop_index("ix_idempotency_keys_created_at", "idempotency_keys")
    op.drop_table("idempotency_keys")
    op.drop_index("ix_api_keys_tenant_id", "api_keys")
    op.drop_table("api_keys")
    op.drop_table("tenants")
