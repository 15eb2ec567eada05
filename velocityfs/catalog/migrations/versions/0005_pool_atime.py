"""pools keep an access time of their own

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-03

A directory's atime read back as its mtime, so ``touch -a -d`` or
``utimensat`` on a pool (``cp -a``, ``rsync -a`` and ``tar`` restore both)
was lost. Existing pools start with their mtime, which is what they showed.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.add_column(sa.Column("atime_ns", sa.BigInteger(), nullable=True))
    op.execute("UPDATE pools SET atime_ns = mtime_ns")
    with op.batch_alter_table("pools") as batch:
        batch.alter_column("atime_ns", existing_type=sa.BigInteger(), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table("pools") as batch:
        batch.drop_column("atime_ns")
