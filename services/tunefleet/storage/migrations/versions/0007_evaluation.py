"""EvaluationService: evaluation jobs and their answers item by item.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tunefleet.storage.database import JsonDocument, UtcDateTime

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "evaluation_jobs",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("document", JsonDocument, nullable=False),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluation_jobs")),
    )
    op.create_index(op.f("ix_evaluation_jobs_state"), "evaluation_jobs", ["state"])
    op.create_index(op.f("ix_evaluation_jobs_create_time"), "evaluation_jobs", ["create_time"])
    op.create_table(
        "evaluation_items",
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("item_index", sa.BigInteger(), nullable=False),
        sa.Column("candidate", sa.String(63), nullable=False),
        sa.Column("output", sa.String(), nullable=True),
        sa.Column("reference", sa.String(), nullable=False),
        sa.Column("scores", JsonDocument, nullable=False),
        sa.Column("errors", JsonDocument, nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["evaluation_jobs.id"],
            name=op.f("fk_evaluation_items_job_id_evaluation_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint(
            "job_id", "item_index", "candidate", name=op.f("pk_evaluation_items")
        ),
    )


def downgrade() -> None:
    op.drop_table("evaluation_items")
    op.drop_index(op.f("ix_evaluation_jobs_create_time"), table_name="evaluation_jobs")
    op.drop_index(op.f("ix_evaluation_jobs_state"), table_name="evaluation_jobs")
    op.drop_table("evaluation_jobs")
