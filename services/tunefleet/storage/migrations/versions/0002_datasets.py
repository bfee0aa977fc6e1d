"""Datasets and the leases that block their deletion.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tunefleet.storage.database import JsonDocument, UtcDateTime

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "datasets",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("display_name", sa.String(128), nullable=False),
        sa.Column("description", sa.String(), nullable=False),
        sa.Column("labels", JsonDocument, nullable=False),
        sa.Column("source_format", sa.Integer(), nullable=False),
        sa.Column("record_count", sa.Integer(), nullable=False),
        sa.Column("train_record_count", sa.Integer(), nullable=False),
        sa.Column("validation_record_count", sa.Integer(), nullable=False),
        sa.Column("content_sha256", sa.String(64), nullable=False),
        sa.Column("source_size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("options", JsonDocument, nullable=False),
        sa.Column("validation_report", JsonDocument, nullable=False),
        sa.Column("cleaning_report", JsonDocument, nullable=False),
        sa.Column("token_statistics", JsonDocument, nullable=True),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_datasets")),
    )
    op.create_index(op.f("ix_datasets_display_name"), "datasets", ["display_name"])
    op.create_index(op.f("ix_datasets_content_sha256"), "datasets", ["content_sha256"])
    op.create_index("ix_datasets_create_time_id", "datasets", ["create_time", "id"])
    op.create_table(
        "dataset_leases",
        sa.Column("dataset_id", sa.String(64), nullable=False),
        sa.Column("holder", sa.String(256), nullable=False),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["dataset_id"],
            ["datasets.id"],
            ondelete="CASCADE",
            name=op.f("fk_dataset_leases_dataset_id_datasets"),
        ),
        sa.PrimaryKeyConstraint("dataset_id", "holder", name=op.f("pk_dataset_leases")),
    )


def downgrade() -> None:
    op.drop_table("dataset_leases")
    op.drop_index("ix_datasets_create_time_id", table_name="datasets")
    op.drop_index(op.f("ix_datasets_content_sha256"), table_name="datasets")
    op.drop_index(op.f("ix_datasets_display_name"), table_name="datasets")
    op.drop_table("datasets")
