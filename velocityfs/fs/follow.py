"""Keep a mount in step with a catalog that other hosts change too.

Three loops run beside ``pyfuse3.main()``:

- refresh: every attribute timeout, but at least every ``REFRESH_MAX_S``,
  read what changed since the last look and mirror it (new, moved, resized and
  removed pools and media, through ``fs.mirror``), dropping the kernel's
  cached entries, attributes and pages where they went stale;
- lease: renew this mount's lease on its grants (``Grants.renew_lease``,
  which registers afresh once it has expired: an expired lease is never
  renewed), every third of the catalog's lease length;
- reclaim: return the grants of holders whose lease expired (a crashed host),
  so their room is usable again without an administrator.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

import trio

from velocityfs.fs.grants import Grants
from velocityfs.fs.local_changes import LocalChanges
from velocityfs.fs.mirror import Mirror
from velocityfs.service.changes import Changes
from velocityfs.service.velocity import Velocity
from velocityfs.service.views import MediaView, PoolView
from velocityfs.threads import Offload

log = logging.getLogger(__name__)

LOOK_BACK_NS = 5_000_000_000
# Why the kernel's cache may outlive a refresh period (an attribute timeout above this
# one costs other hosts' changes no delay): the kernel caches four things of a mount,
# and a refresh drops each that another host changed. Names: a removed, renamed or
# replaced entry is invalidated (``Mirror.forget_entry``), and no negative entry is
# ever cached (a lookup of a missing name answers ENOENT, not an entry with a
# timeout), so a name made elsewhere is found at the next lookup. Attributes: a
# pool's or media's that changed are invalidated (``Mirror.pool_changed``,
# ``media_changed``). Pages: dropped with the attributes when the bytes changed.
# Listings: never cached (every opendir reads the nodes). This host's own changes
# reach the kernel in the replies. So what a mount shows is at most a refresh
# period (plus the invalidation's thread hop) behind the catalog, whatever the
# timeout; a longer one only saves the round trips of lookups and stats
# (``--attr-timeout``, README).
REFRESH_MAX_S = 1.0


class Follower:
    """The loops that keep one mount's memory and lease current."""

    def __init__(
        self,
        velocity: Velocity,
        offload: Offload,
        mirror: Mirror,
        changes: LocalChanges,
        interval_s: float,
    ) -> None:
        self._v = velocity
        self.offload = offload
        self.mirror = mirror
        self.grants: Grants = mirror.grants
        self._changes = changes
        self.interval_s = min(max(0.2, interval_s), REFRESH_MAX_S)
        self.since_ns = time.time_ns()
        # Media versions (changed_ns) applied within the look-back: not read again.
        self.seen: dict[str, int] = {}

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._every, lambda: self.interval_s, self.refresh)
            nursery.start_soon(self._every, lambda: self._lease_s() / 3, self.grants.renew_lease)
            nursery.start_soon(self._every, self._lease_s, self.reclaim)

    def _lease_s(self) -> float:
        """The catalog's lease length, as last read (each renewal reads it again)."""
        return self._v.ledger.lease_ns / 1e9

    @staticmethod
    async def _every(seconds: Callable[[], float], step: Callable[[], Awaitable[None]]) -> None:
        while True:
            await trio.sleep(seconds())
            try:
                await step()
            except Exception as exc:  # the catalog may be away; try again next round
                log.warning("%s failed: %s", step.__name__, exc)

    async def reclaim(self) -> None:
        reclaimed = await self.offload(self._v.reclaim_dead_holders)
        if reclaimed:
            log.warning("reclaimed %d grant(s) of processes whose lease expired", reclaimed)
        await self.offload(self._v.changes.prune)

    # catalog changes -------------------------------------------------------
    async def refresh(self) -> None:
        started = time.time_ns()
        changes = await self.offload(self._v.changes.since, self.since_ns - LOOK_BACK_NS, self.seen)
        self.since_ns = started
        await self.apply(changes, started)
        horizon = started - LOOK_BACK_NS
        self.seen = {k: v for k, v in self.seen.items() if v >= horizon}
        self._changes.forget_before(started)

    def _stale(self, object_id: str, read_ns: int) -> bool:
        """A row read at ``read_ns`` predates a change this mount made to it, or is
        making: skip it (the look-back reads it again). Asked for each row just
        before applying it, since applying earlier rows awaits, and local
        changes can land meanwhile."""
        return self._changes.is_stale(object_id, read_ns)

    async def apply(self, changes: Changes, read_ns: int) -> None:
        pending = [view for view in changes.pools if not self._stale(view.id, read_ns)]
        while pending:
            later = [
                view
                for view in pending
                if not self._stale(view.id, read_ns) and not await self._pool(view)
            ]
            if len(later) == len(pending):
                break
            pending = later
        for media_view in changes.media:
            if not self._stale(media_view.id, read_ns) and await self._media(media_view):
                self.seen[media_view.id] = changes.versions[media_view.id]
        for media_id in changes.removed_media:
            await self.mirror.media_removed(media_id)
        for pool_id in changes.removed_pools:
            await self.mirror.pool_removed(pool_id)

    async def _pool(self, view: PoolView) -> bool:
        """Mirror one pool; False when its parent is not known yet (try after the others)."""
        inodes = self.mirror.inodes
        parent = inodes.by_pool.get(view.parent_id) if view.parent_id else inodes.root
        if parent is None:
            return False
        node = inodes.by_pool.get(view.id)
        if node is None:
            await self.mirror.make_room(parent, view.name)
            inodes.add_pool(parent, view, {})
            await self.mirror.appeared(parent, view.name)
            return True
        if node.parent is not parent or node.name != view.name:
            await self.mirror.relocate(node, parent, view.name)
        await self.mirror.pool_changed(node, view)
        return True

    async def _media(self, view: MediaView) -> bool:
        """Mirror one media; False when its pool is not known (the look-back retries)."""
        inodes = self.mirror.inodes
        parent = inodes.by_pool.get(view.pool_id)
        node = inodes.by_media.get(view.id)
        if parent is None:
            return False
        if node is None:
            await self.mirror.make_room(parent, view.name)
            inodes.add_media(parent, view)
            await self.mirror.appeared(parent, view.name)
            return True
        if node.parent is not parent or node.name != view.name:
            await self.mirror.relocate(node, parent, view.name)
        await self.mirror.media_changed(node, view)
        return True
