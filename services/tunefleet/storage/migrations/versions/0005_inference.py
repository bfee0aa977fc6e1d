"""InferenceService: the responses it produced and the feedback on them.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tunefleet.storage.database import JsonDocument, UtcDateTime

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "inference_responses",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("adapter_version", sa.String(256), nullable=False),
        sa.Column("request", JsonDocument, nullable=False),
        sa.Column("text", sa.String(), nullable=False),
        sa.Column("finish_reason", sa.String(16), nullable=False),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inference_responses")),
    )
    op.create_index(
        op.f("ix_inference_responses_create_time"), "inference_responses", ["create_time"]
    )
    op.create_table(
        "feedback",
        sa.Column("id", sa.String(64), nullable=False),
        sa.Column("response_id", sa.String(64), nullable=False),
        sa.Column("rating", sa.Float(), nullable=False),
        sa.Column("corrected_text", sa.String(), nullable=False),
        sa.Column("comment", sa.String(), nullable=False),
        sa.Column("adapter_version", sa.String(256), nullable=False),
        sa.Column("create_time", UtcDateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_feedback")),
    )
    op.create_index(op.f("ix_feedback_adapter_version"), "feedback", ["adapter_version"])
    op.create_index(op.f("ix_feedback_create_time"), "feedback", ["create_time"])


def downgrade() -> None:
    op.drop_index(op.f("ix_feedback_create_time"), table_name="feedback")
    op.drop_index(op.f("ix_feedback_adapter_version"), table_name="feedback")
    op.drop_table("feedback")
    op.drop_index(op.f("ix_inference_responses_create_time"), table_name="inference_responses")
    op.drop_table("inference_responses")
