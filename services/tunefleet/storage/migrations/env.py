"""Alembic environment. `Database.migrate()` passes its connection in `config.attributes`."""

from alembic import context
from sqlalchemy import Connection, create_engine

from tunefleet.storage.database import Base
from tunefleet.storage.migrations.tables import register_tables

register_tables()

config = context.config
connection = config.attributes.get("connection")


def run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=True,  # SQLite alters tables by copying them
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if connection is not None:
    run(connection)
else:  # `alembic` command line, for writing new migrations
    with create_engine(config.get_main_option("sqlalchemy.url") or "").begin() as owned:
        run(owned)
