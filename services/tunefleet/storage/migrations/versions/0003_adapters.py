"""The adapter registry: adapters, versions, dataset lineage, aliases and alias moves.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tunefleet.storage.database import JsonDocument, UtcDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "adapters",
        sa.Column("id", sa.String(63), nullable=False),
        sa.Column("base_model", sa.String(512), nullable=False),
        sa.Column("description", sa.String(), nullable=False),
        sa.Column("labels", JsonDocument, nullable=False),
        sa.Column("latest_version", sa.Integer(), nullable=False),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.Column("update_time", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapters")),
    )
    op.create_index(op.f("ix_adapters_base_model"), "adapters", ["base_model"])
    op.create_table(
        "adapter_versions",
        sa.Column("adapter_id", sa.String(63), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("description", sa.String(), nullable=False),
        sa.Column("files", JsonDocument, nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("config", JsonDocument, nullable=False),
        sa.Column("compatibility", JsonDocument, nullable=False),
        sa.Column("smoke_test", JsonDocument, nullable=False),
        sa.Column("lineage", JsonDocument, nullable=False),
        sa.Column("training_job", sa.String(256), nullable=False),
        sa.Column("serving_name", sa.String(128), nullable=False),
        sa.Column("merged_from", sa.String(256), nullable=False),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"],
            ["adapters.id"],
            ondelete="CASCADE",
            name=op.f("fk_adapter_versions_adapter_id_adapters"),
        ),
        sa.PrimaryKeyConstraint("adapter_id", "version", name=op.f("pk_adapter_versions")),
        sa.UniqueConstraint("serving_name", name=op.f("uq_adapter_versions_serving_name")),
    )
    op.create_index(op.f("ix_adapter_versions_training_job"), "adapter_versions", ["training_job"])
    op.create_table(
        "adapter_version_datasets",
        sa.Column("adapter_id", sa.String(63), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("dataset", sa.String(256), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id", "version"],
            ["adapter_versions.adapter_id", "adapter_versions.version"],
            ondelete="CASCADE",
            name=op.f("fk_adapter_version_datasets_adapter_id_adapter_versions"),
        ),
        sa.PrimaryKeyConstraint(
            "adapter_id", "version", "dataset", name=op.f("pk_adapter_version_datasets")
        ),
    )
    op.create_index(
        op.f("ix_adapter_version_datasets_dataset"), "adapter_version_datasets", ["dataset"]
    )
    op.create_table(
        "adapter_aliases",
        sa.Column("adapter_id", sa.String(63), nullable=False),
        sa.Column("alias", sa.String(63), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("update_time", UtcDateTime(), nullable=False),
        sa.Column("updated_by", sa.String(256), nullable=False),
        sa.ForeignKeyConstraint(
            ["adapter_id"],
            ["adapters.id"],
            ondelete="CASCADE",
            name=op.f("fk_adapter_aliases_adapter_id_adapters"),
        ),
        sa.ForeignKeyConstraint(
            ["adapter_id", "version"],
            ["adapter_versions.adapter_id", "adapter_versions.version"],
            name=op.f("fk_adapter_aliases_adapter_id_adapter_versions"),
        ),
        sa.PrimaryKeyConstraint("adapter_id", "alias", name=op.f("pk_adapter_aliases")),
    )
    op.create_table(
        "adapter_alias_moves",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("adapter_id", sa.String(63), nullable=False),
        sa.Column("alias", sa.String(63), nullable=False),
        sa.Column("from_version", sa.Integer(), nullable=True),
        sa.Column("to_version", sa.Integer(), nullable=True),
        sa.Column("time", UtcDateTime(), nullable=False),
        sa.Column("actor", sa.String(256), nullable=False),
        sa.Column("reason", sa.String(), nullable=False),
        sa.Column("revision", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_adapter_alias_moves")),
    )
    op.create_index(
        op.f("ix_adapter_alias_moves_adapter_id"), "adapter_alias_moves", ["adapter_id"]
    )


def downgrade() -> None:
    op.drop_table("adapter_alias_moves")
    op.drop_table("adapter_aliases")
    op.drop_table("adapter_version_datasets")
    op.drop_table("adapter_versions")
    op.drop_table("adapters")
