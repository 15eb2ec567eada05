"""What changed in the catalog since a moment: how mounts on other hosts catch up.

Every pool and media row carries ``changed_ns`` and every deletion leaves a
tombstone, so a mount reads only the rows that changed since its last look.
Re-reading a change is harmless (applying it is idempotent), so callers look
back a margin to cover transactions that committed late and clock skew. A
caller passes the media versions (``changed_ns``) it already applied: those
rows are not built again, the bulk of every read while files are being made.
"""

import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from sqlalchemy import delete, select

from velocityfs.catalog.database import Database
from velocityfs.catalog.models import Media, Pool, Removal, XAttr
from velocityfs.service.media import MediaService
from velocityfs.service.pools import pool_view
from velocityfs.service.views import MediaView, PoolView

TOMBSTONE_TTL_NS = 3600 * 1_000_000_000


@dataclass(frozen=True)
class Changes:
    pools: list[PoolView]
    media: list[MediaView]
    removed_pools: list[str]
    removed_media: list[str]
    # changed_ns of each media in ``media``, to pass back as ``seen`` next time
    versions: dict[str, int] = field(default_factory=dict)


class ChangeFeed:
    """Reads changes since a moment; prunes old tombstones."""

    def __init__(self, database: Database, media: MediaService) -> None:
        self.db = database
        self.media = media

    def since(self, since_ns: int, seen: Mapping[str, int] | None = None) -> Changes:
        """Pools and media changed since ``since_ns``, but not media whose version
        ``seen`` has, and the removals since then."""
        seen = seen or {}
        with self.db.reading() as s:
            pools = [
                pool_view(p)
                for p in s.execute(select(Pool).where(Pool.changed_ns >= since_ns)).scalars()
            ]
            table = Media.__table__
            media = [
                m
                for m in s.execute(
                    select(table).where(
                        table.c.changed_ns >= since_ns, table.c.unlinked_by.is_(None)
                    )
                )
                if seen.get(m.id) != m.changed_ns
            ]
            xattrs: dict[str, dict[str, bytes]] = {}
            if media:
                # A join, not an IN list of the media read: after an outage those can
                # be more than one statement may bind (65,535 on PostgreSQL).
                wanted = {m.id for m in media}
                for owner, name, value in s.execute(
                    select(XAttr.owner_id, XAttr.name, XAttr.value)
                    .join(table, table.c.id == XAttr.owner_id)
                    .where(table.c.changed_ns >= since_ns)
                ):
                    if owner in wanted:
                        xattrs.setdefault(owner, {})[name] = value
            removals = s.execute(
                select(Removal.kind, Removal.object_id).where(Removal.removed_ns >= since_ns)
            ).all()
            return Changes(
                pools=pools,
                media=[self.media.view(m, xattrs.get(m.id)) for m in media],
                removed_pools=[oid for kind, oid in removals if kind == "pool"],
                removed_media=[oid for kind, oid in removals if kind == "media"],
                versions={m.id: m.changed_ns for m in media},
            )

    def prune(self) -> None:
        with self.db.transaction() as s:
            s.execute(delete(Removal).where(Removal.removed_ns < time.time_ns() - TOMBSTONE_TTL_NS))
