"""Tombstones of deleted pools and media, read by mounts on other hosts."""

import time
from collections.abc import Iterable

from sqlalchemy import Connection, insert

from velocityfs.catalog.models import Removal

_INSERT = insert(Removal.__table__)


def record_removals(conn: Connection, kind: str, object_ids: Iterable[str]) -> None:
    """Leave tombstones for deleted pools ('pool') or media ('media')."""
    now = time.time_ns()
    rows = [{"kind": kind, "object_id": oid, "removed_ns": now} for oid in object_ids]
    if rows:
        conn.execute(_INSERT, rows)
