"""Many media at once, straight into the catalog.

For the tests about more rows than one SQL statement may bind as parameters
(PostgreSQL: 65,535): making 70,000 files through a mount would take minutes.
"""

from __future__ import annotations

import time

from sqlalchemy import insert

from velocityfs.catalog.models import Media, new_id
from velocityfs.service.velocity import Velocity

# Past every limit on parameters per statement that the catalogs have.
BEYOND_ONE_STATEMENT = 70_000


def insert_media(
    v: Velocity, pool_id: str, count: int = BEYOND_ONE_STATEMENT, size: int = 0
) -> list[str]:
    """``count`` media rows of ``size`` bytes in ``pool_id`` (no backing files, usage
    not charged); returns their ids."""
    now = time.time_ns()
    rows = [
        {"id": new_id(), "pool_id": pool_id, "name": f"m{i:06d}", "size": size}
        | {"volume": "DEFAULT", "mode": 0o644, "uid": 0, "gid": 0}
        | {"atime_ns": now, "mtime_ns": now, "ctime_ns": now}
        for i in range(count)
    ]
    with v.db.statements() as conn:
        conn.execute(insert(Media.__table__), rows)
    return [row["id"] for row in rows]
