"""drop indexes that every create and close wrote but no hot query read

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-25

A create inserts a media row and a grant row; on SQLite every b-tree it
touches is one more page in the write-ahead log (about 15 pages, 60 KiB, per
create before this). ``media.pool_id`` is the prefix of the unique
``(pool_id, name)`` index, which serves the same lookups. Grants only live
while a file is open or an upload runs, so the rare lookups by holder (a
reclaim) or by pool (fsck) scan a small table.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_DROPPED = (
    ("ix_media_pool_id", "media", "pool_id"),
    ("ix_grants_pool_id", "grants", "pool_id"),
    ("ix_grants_holder_id", "grants", "holder_id"),
)


def upgrade() -> None:
    for name, table, _column in _DROPPED:
        op.drop_index(name, table_name=table)


def downgrade() -> None:
    for name, table, column in _DROPPED:
        op.create_index(name, table, [column])
