"""AdapterService: an alias's canary (a share of its requests to another alias's version), and
its changes in the alias audit trail.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("adapter_aliases", "adapter_alias_moves"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(sa.Column("canary_alias", sa.String(63), nullable=True))
            batch.add_column(
                sa.Column("canary_percent", sa.Integer(), server_default="0", nullable=False)
            )
    with op.batch_alter_table("adapter_alias_moves") as batch:
        batch.add_column(
            sa.Column("canary_changed", sa.Boolean(), server_default=sa.false(), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("adapter_alias_moves") as batch:
        batch.drop_column("canary_changed")
    for table in ("adapter_alias_moves", "adapter_aliases"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("canary_percent")
            batch.drop_column("canary_alias")
