"""Service boundaries: dataset leases become resources with ids (DatasetService's
CreateDatasetLease), and training jobs record whether they hold their leases (TrainingService
acquires and releases them through DatasetService's RPCs, not in its own transactions).

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("dataset_leases") as batch:
        batch.add_column(sa.Column("lease_id", sa.String(63), nullable=True))
    # Every lease so far was a training job's: `trainingJobs/{id}` gets the id `job-{id}`, the
    # one TrainingService now asks for.
    op.execute("UPDATE dataset_leases SET lease_id = 'job-' || substr(holder, 14)")
    with op.batch_alter_table("dataset_leases", recreate="always") as batch:
        batch.alter_column("lease_id", existing_type=sa.String(63), nullable=False)
        batch.drop_constraint("pk_dataset_leases", type_="primary")
        batch.create_primary_key("pk_dataset_leases", ["dataset_id", "lease_id"])

    with op.batch_alter_table("training_jobs") as batch:
        batch.add_column(
            sa.Column("lease_state", sa.String(16), nullable=False, server_default="released")
        )
        batch.create_index(op.f("ix_training_jobs_lease_state"), ["lease_state"])
    # Unfinished jobs took their leases in the transaction that created them.
    op.execute(
        "UPDATE training_jobs SET lease_state = 'held' "
        "WHERE state NOT IN ('SUCCEEDED', 'FAILED', 'CANCELLED')"
    )


def downgrade() -> None:
    with op.batch_alter_table("training_jobs") as batch:
        batch.drop_index(op.f("ix_training_jobs_lease_state"))
        batch.drop_column("lease_state")
    with op.batch_alter_table("dataset_leases", recreate="always") as batch:
        batch.drop_constraint("pk_dataset_leases", type_="primary")
        batch.create_primary_key("pk_dataset_leases", ["dataset_id", "holder"])
        batch.drop_column("lease_id")
