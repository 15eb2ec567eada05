"""Tombstones of deleted pools and media, read by mounts on other hosts."""

import time
from collections.abc import Iterable

from sqlalchemy.orm import Session

from velocityfs.catalog.models import Removal


def record_removals(session: Session, kind: str, object_ids: Iterable[str]) -> None:
    """Leave tombstones for deleted pools ('pool') or media ('media')."""
    now = time.time_ns()
    session.add_all(Removal(kind=kind, object_id=oid, removed_ns=now) for oid in object_ids)
