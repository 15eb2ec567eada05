"""Pool and volume usage kept in memory, for the metrics a scrape reads.

A Prometheus server scrapes every few seconds, and a catalog serves every
host's mounts: a scrape must not scan the media table, nor wait for the
catalog at all. So ``Usage`` keeps what the pool and volume gauges show: every
pool's row (its ``used_bytes`` is already the subtree's usage, maintained by
the ledger), every media's pool, volume and size, and the counts and sums per
pool and volume that follow from them. It is read whole once (``read`` on a
new ``Usage``), then kept current from the change feed (``service.changes``):
the rows changed since the last read, with a look-back for transactions that
committed late, and the tombstones of removals. A process that fell behind
the tombstones' lifetime reads it whole again.

``read`` runs on a catalog thread and changes nothing; ``apply`` runs on the
loop that scrapes, so a scrape never sees a half-applied read. The daemon
calls both every ``REFRESH_S``: the gauges are at most that old.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass

from velocityfs.service.chains import Link, chain_path, room
from velocityfs.service.changes import TOMBSTONE_TTL_NS, ChangeFeed, Changes
from velocityfs.service.views import PoolView
from velocityfs.service.volumes import VolumeService

REFRESH_S = 2.0
# Rows committed this long before a read began may still be missing from it.
LOOK_BACK_NS = 5_000_000_000


@dataclass(frozen=True)
class Reading:
    """What one ``read`` found: the changes, when the read began, and whether it was
    a whole read (which replaces everything known) or the changes since the last."""

    changes: Changes
    volumes: list[str]
    started_ns: int
    whole: bool


@dataclass(frozen=True)
class PoolUsage:
    """A pool as its gauges show it: its path, its usage (its subtree's), its quota
    (its own or the nearest ancestor's), the room really left (the least any pool on
    its chain has) and the media directly in it."""

    path: str
    used_bytes: int
    quota_bytes: int
    avail_bytes: int
    media: int


@dataclass(frozen=True)
class _Media:
    pool_id: str
    volume: str
    size: int


class Usage:
    """Pool and volume usage as last read from the catalog (see the module docstring)."""

    def __init__(self, feed: ChangeFeed, volumes: VolumeService) -> None:
        self._feed = feed
        self._volumes = volumes
        self._since_ns: int | None = None
        self._seen: dict[str, int] = {}
        self._pools: dict[str, PoolView] = {}
        self._media: dict[str, _Media] = {}
        # What the gauges show of the media, kept as they change: a scrape is
        # O(pools + volumes), never O(media).
        self._pool_media: Counter[str] = Counter()
        self._volume_media: Counter[str] = Counter()
        self._volume_bytes: Counter[str] = Counter()
        self._volume_names: list[str] = []

    def read(self) -> Reading:
        """The catalog's changes since the last ``apply`` (everything, the first time)."""
        started = time.time_ns()
        whole = self._since_ns is None or started - self._since_ns > TOMBSTONE_TTL_NS // 2
        if whole or self._since_ns is None:
            changes = self._feed.since(0)
        else:
            changes = self._feed.since(self._since_ns - LOOK_BACK_NS, self._seen)
        return Reading(changes, self._volumes.names(), started, whole)

    def apply(self, reading: Reading) -> None:
        """Take what ``read`` found; what was known before is replaced by a whole read."""
        changes = reading.changes
        if reading.whole:
            self._pools, self._media, self._seen = {}, {}, {}
            self._pool_media, self._volume_media, self._volume_bytes = (
                Counter(),
                Counter(),
                Counter(),
            )
        for pool in changes.pools:
            self._pools[pool.id] = pool
        for media in changes.media:
            self._count(self._media.get(media.id), -1)
            self._media[media.id] = _Media(media.pool_id, media.volume, media.size)
            self._count(self._media[media.id], 1)
        for media_id in changes.removed_media:
            self._count(self._media.pop(media_id, None), -1)
        for pool_id in changes.removed_pools:
            self._pools.pop(pool_id, None)
        horizon = reading.started_ns - LOOK_BACK_NS
        self._seen = {k: v for k, v in {**self._seen, **changes.versions}.items() if v >= horizon}
        self._volume_names = reading.volumes
        self._since_ns = reading.started_ns

    def _count(self, media: _Media | None, sign: int) -> None:
        if media is not None:
            self._pool_media[media.pool_id] += sign
            self._volume_media[media.volume] += sign
            self._volume_bytes[media.volume] += sign * media.size

    def pools(self) -> list[PoolUsage]:
        """Every pool known, by path."""
        found = []
        for pool in self._pools.values():
            chain = self._chain(pool)
            if chain is None:
                continue
            quota = next((p.quota_bytes for p in reversed(chain) if p.quota_bytes is not None), 0)
            found.append(
                PoolUsage(
                    chain_path(chain),
                    pool.used_bytes,
                    quota,
                    room(chain),
                    self._pool_media[pool.id],
                )
            )
        return sorted(found, key=lambda p: p.path)

    def volumes(self) -> dict[str, tuple[int, int]]:
        """Each volume's media count and the sum of their sizes."""
        names = set(self._volume_names).union(+self._volume_media)
        return {name: (self._volume_media[name], self._volume_bytes[name]) for name in names}

    def _chain(self, pool: PoolView) -> list[Link] | None:
        """The pool and its ancestors as links, root first; None while an ancestor is
        not known (a read that caught a pool before its parent: the next one has it)."""
        chain = []
        current: PoolView | None = pool
        while current is not None:
            chain.append(
                Link(
                    current.id,
                    current.parent_id,
                    current.name,
                    current.quota_bytes,
                    current.used_bytes,
                )
            )
            if current.parent_id is None:
                break
            current = self._pools.get(current.parent_id)
            if current is None:
                return None
        chain.reverse()
        return chain
