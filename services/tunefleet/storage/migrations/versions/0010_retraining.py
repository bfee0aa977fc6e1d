"""RetrainingService: retraining policies and their runs.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tunefleet.storage.database import JsonDocument, UtcDateTime

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "retraining_policies",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("adapter", sa.String(128), nullable=False),
        sa.Column("document", JsonDocument, nullable=False),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retraining_policies")),
        sa.UniqueConstraint("adapter", name=op.f("uq_retraining_policies_adapter")),
    )
    op.create_index(
        op.f("ix_retraining_policies_create_time"), "retraining_policies", ["create_time"]
    )
    op.create_table(
        "retraining_runs",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("policy_id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(24), nullable=False),
        sa.Column("document", JsonDocument, nullable=False),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["policy_id"],
            ["retraining_policies.id"],
            name=op.f("fk_retraining_runs_policy_id_retraining_policies"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_retraining_runs")),
    )
    op.create_index(op.f("ix_retraining_runs_policy_id"), "retraining_runs", ["policy_id"])
    op.create_index(op.f("ix_retraining_runs_state"), "retraining_runs", ["state"])
    op.create_index(op.f("ix_retraining_runs_create_time"), "retraining_runs", ["create_time"])


def downgrade() -> None:
    op.drop_index(op.f("ix_retraining_runs_create_time"), table_name="retraining_runs")
    op.drop_index(op.f("ix_retraining_runs_state"), table_name="retraining_runs")
    op.drop_index(op.f("ix_retraining_runs_policy_id"), table_name="retraining_runs")
    op.drop_table("retraining_runs")
    op.drop_index(op.f("ix_retraining_policies_create_time"), table_name="retraining_policies")
    op.drop_table("retraining_policies")
