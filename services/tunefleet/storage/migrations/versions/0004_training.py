"""TrainingService: training jobs and their checkpoints (events use the change feeds).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tunefleet.storage.database import JsonDocument, UtcDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "training_jobs",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("adapter", sa.String(128), nullable=False),
        sa.Column("priority", sa.Integer(), nullable=False),
        sa.Column("document", JsonDocument, nullable=False),
        sa.Column("worker_spec", JsonDocument, nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("launcher_state", JsonDocument, nullable=False),
        sa.Column("last_report_time", UtcDateTime(), nullable=True),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_training_jobs")),
    )
    op.create_index(op.f("ix_training_jobs_state"), "training_jobs", ["state"])
    op.create_index(op.f("ix_training_jobs_adapter"), "training_jobs", ["adapter"])
    op.create_index(op.f("ix_training_jobs_create_time"), "training_jobs", ["create_time"])
    op.create_table(
        "training_checkpoints",
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("step", sa.BigInteger(), nullable=False),
        sa.Column("uri", sa.String(), nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), nullable=False),
        sa.Column("validation_loss", sa.Float(), nullable=True),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["training_jobs.id"],
            ondelete="CASCADE",
            name=op.f("fk_training_checkpoints_job_id_training_jobs"),
        ),
        sa.PrimaryKeyConstraint("job_id", "step", name=op.f("pk_training_checkpoints")),
    )


def downgrade() -> None:
    op.drop_table("training_checkpoints")
    op.drop_index(op.f("ix_training_jobs_create_time"), table_name="training_jobs")
    op.drop_index(op.f("ix_training_jobs_adapter"), table_name="training_jobs")
    op.drop_index(op.f("ix_training_jobs_state"), table_name="training_jobs")
    op.drop_table("training_jobs")
