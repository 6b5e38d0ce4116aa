"""Alembic environment: the database URL comes from Distillery's settings (or -x url=...)."""

from __future__ import annotations

from logging.config import fileConfig

from alembic import context

from core.db import Base, make_engine
from core.settings import Settings

config = context.config
if config.config_file_name is not None and config.attributes.get("configure_logger", True):
    fileConfig(config.config_file_name, disable_existing_loggers=False)

url = (
    context.get_x_argument(as_dictionary=True).get("url")
    or config.attributes.get("url")
    or Settings().database_url
)


def run_migrations_offline() -> None:
    context.configure(
        url=url,
        target_metadata=Base.metadata,
        literal_binds=True,
        render_as_batch=url.startswith("sqlite"),
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    engine = make_engine(url)
    with engine.connect() as connection:
        if url.startswith("sqlite"):
            # Batch mode rebuilds a table (copy, drop, rename): with foreign keys enforced, the
            # drop would cascade into the rows that reference it. Off for this connection only;
            # it must be set outside a transaction.
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        context.configure(
            connection=connection,
            target_metadata=Base.metadata,
            render_as_batch=url.startswith("sqlite"),
        )
        with context.begin_transaction():
            context.run_migrations()
    engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
