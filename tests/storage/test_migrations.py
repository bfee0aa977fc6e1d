"""The migrations and the ORM models describe the same schema: on each backend, a database at
head compared with every table the code declares gives no autogenerate diff (a new migration
written with `alembic revision --autogenerate` would contain only the change it is for)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

import tunefleet.storage
from tunefleet.storage.database import Base, Database
from tunefleet.storage.migrations.tables import register_tables


def test_the_models_match_the_migrations(database_url: str) -> None:
    register_tables()
    db = Database(database_url)
    db.migrate()
    try:
        with db.engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "render_as_batch": True}
            )
            diff: list[Any] = compare_metadata(context, Base.metadata)
    finally:
        db.close()
    assert diff == []


def test_every_table_the_code_declares_is_known_to_the_migrations() -> None:
    register_tables()
    source = Path(tunefleet.storage.__file__).parents[1]  # services/tunefleet
    declared = {
        match
        for path in source.rglob("*.py")
        for match in re.findall(r'__tablename__ = "(\w+)"', path.read_text())
    }
    assert {"training_jobs", "training_checkpoints", "inference_responses", "feedback"} <= declared
    assert declared == set(Base.metadata.tables)
