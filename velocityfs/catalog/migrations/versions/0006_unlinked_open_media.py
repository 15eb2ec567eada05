"""media unlinked while open stay until their last close

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06

A file unlinked while a mount still had it open lost its catalog row at once,
so writes that grew it, ftruncate and fchmod through the open descriptor
failed. Such media now keep their row, hidden from every listing and marked
with the holder that has them open (``media.unlinked_by``), until its last
close or its reclaim. No index: only a reclaim looks rows up by it.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("media") as batch:
        batch.add_column(sa.Column("unlinked_by", sa.String(length=36), nullable=True))


def downgrade() -> None:
    op.execute("DELETE FROM media WHERE unlinked_by IS NOT NULL")
    with op.batch_alter_table("media") as batch:
        batch.drop_column("unlinked_by")
