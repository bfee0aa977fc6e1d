"""The migrations and the ORM models describe the same schema: on each backend, a database at
head compared with every table the code declares gives no autogenerate diff (a new migration
written with `alembic revision --autogenerate` would contain only the change it is for)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import text

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


def test_leases_and_jobs_keep_their_meaning_across_0006(database_url: str) -> None:
    """Leases taken by training jobs before 0006 get the ids TrainingService now asks for, and
    unfinished jobs are known to hold theirs (ended ones do not)."""
    db = Database(database_url)
    db.migrate("0005")
    now = "2026-12-01 00:00:00"
    document = "{}"
    with db.engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO datasets (id, display_name, description, labels, source_format, "
                "record_count, train_record_count, validation_record_count, content_sha256, "
                "source_size_bytes, options, validation_report, cleaning_report, create_time) "
                "VALUES ('d1', '', '', :doc, 1, 1, 1, 0, 'x', 1, :doc, :doc, :doc, :now)"
            ),
            {"doc": document, "now": now},
        )
        for job, state in (("a1", "RUNNING"), ("b2", "SUCCEEDED")):
            connection.execute(
                text(
                    "INSERT INTO training_jobs (id, state, adapter, priority, document, "
                    "worker_spec, token_sha256, cancel_requested, launcher_state, create_time) "
                    "VALUES (:id, :state, 'adapters/x', 0, :doc, :doc, '', false, :doc, :now)"
                ),
                {"id": job, "state": state, "doc": document, "now": now},
            )
        connection.execute(
            text(
                "INSERT INTO dataset_leases (dataset_id, holder, create_time) "
                "VALUES ('d1', 'trainingJobs/a1', :now)"
            ),
            {"now": now},
        )
    db.migrate()
    try:
        with db.engine.connect() as connection:
            leases = connection.execute(
                text("SELECT dataset_id, lease_id, holder FROM dataset_leases")
            ).all()
            rows = connection.execute(text("SELECT id, lease_state FROM training_jobs")).all()
            states = {str(job): str(state) for job, state in rows}
    finally:
        db.close()
    assert [tuple(lease) for lease in leases] == [("d1", "job-a1", "trainingJobs/a1")]
    assert states == {"a1": "held", "b2": "released"}
