"""change tracking for mounts on other hosts

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for table in ("pools", "media"):
        with op.batch_alter_table(table) as batch:
            batch.add_column(
                sa.Column("changed_ns", sa.BigInteger(), nullable=False, server_default="0")
            )
            batch.create_index(f"ix_{table}_changed_ns", ["changed_ns"])
    op.create_table(
        "removals",
        sa.Column("id", sa.Integer(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(length=8), nullable=False),
        sa.Column("object_id", sa.String(length=36), nullable=False),
        sa.Column("removed_ns", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index("ix_removals_removed_ns", "removals", ["removed_ns"])


def downgrade() -> None:
    op.drop_index("ix_removals_removed_ns", table_name="removals")
    op.drop_table("removals")
    for table in ("pools", "media"):
        with op.batch_alter_table(table) as batch:
            batch.drop_index(f"ix_{table}_changed_ns")
            batch.drop_column("changed_ns")
