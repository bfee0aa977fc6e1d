"""EvaluationService: human A/B annotation tasks and their answers.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tunefleet.storage.database import UtcDateTime

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "evaluation_annotations",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("item_index", sa.BigInteger(), nullable=False),
        sa.Column("candidate", sa.String(63), nullable=False),
        sa.Column("baseline", sa.String(63), nullable=False),
        sa.Column("candidate_first", sa.Boolean(), nullable=False),
        sa.Column("annotator", sa.String(128), nullable=False),
        sa.Column("choice", sa.String(16), nullable=True),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.Column("answer_time", UtcDateTime(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["evaluation_jobs.id"],
            name=op.f("fk_evaluation_annotations_job_id_evaluation_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_evaluation_annotations")),
    )
    op.create_index(op.f("ix_evaluation_annotations_job_id"), "evaluation_annotations", ["job_id"])


def downgrade() -> None:
    op.drop_index(op.f("ix_evaluation_annotations_job_id"), table_name="evaluation_annotations")
    op.drop_table("evaluation_annotations")
