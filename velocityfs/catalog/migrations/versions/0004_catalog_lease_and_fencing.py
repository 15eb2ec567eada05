"""one lease length per catalog; holders carry their lease's end and a fence

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03

The lease length was each process's configuration, so two processes could
judge one holder by different leases (an fsck with a shorter one took a live
mount for dead). It is now the catalog's: one row of ``catalog_settings``.

A holder's lease ends at ``expires_ns``, on the catalog's clock, set by each
renewal from the lease length at that moment; a renewal is refused once it
has passed. ``fenced`` is set by the process that reclaims the holder, in the
transaction that finds its lease expired: from then on every grant, settle
and renewal of that holder fails, so it can only register afresh.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

DEFAULT_LEASE_NS = 30_000_000_000


def upgrade() -> None:
    settings = op.create_table(
        "catalog_settings",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("lease_ns", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.bulk_insert(settings, [{"id": 1, "lease_ns": DEFAULT_LEASE_NS}])
    with op.batch_alter_table("holders") as batch:
        batch.add_column(
            sa.Column("expires_ns", sa.BigInteger(), nullable=False, server_default="0")
        )
        batch.add_column(
            sa.Column("fenced", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    # Holders of the previous schema were judged by their heartbeat and a 30 s lease.
    op.execute(f"UPDATE holders SET expires_ns = heartbeat_ns + {DEFAULT_LEASE_NS}")


def downgrade() -> None:
    with op.batch_alter_table("holders") as batch:
        batch.drop_column("fenced")
        batch.drop_column("expires_ns")
    op.drop_table("catalog_settings")
