"""Keep a mount in step with a catalog that other hosts change too.

Three loops run beside ``pyfuse3.main()``:

- refresh: every attribute timeout, read what changed since the last look
  and mirror it (new, moved, resized and removed pools and media), dropping
  the kernel's cached entries and pages where they went stale;
- heartbeat: renew this mount's lease on its grants; if another host already
  reclaimed them (we were cut off too long), register afresh and re-hold;
- reclaim: return the grants of holders whose lease expired (a crashed host),
  so their room is usable again without an administrator.
"""

from __future__ import annotations

import contextlib
import logging
import time

import pyfuse3
import trio

from velocityfs.fs.nodes import DirNode, MediaNode
from velocityfs.fs.operations import VelocityOperations
from velocityfs.service.changes import Changes
from velocityfs.service.views import MediaView, PoolView

log = logging.getLogger(__name__)

LOOK_BACK_NS = 5_000_000_000


class Follower:
    """The loops that keep one mount's memory and lease current."""

    def __init__(self, ops: VelocityOperations, interval_s: float) -> None:
        self.ops = ops
        self.interval_s = max(0.2, interval_s)
        self.lease_s = ops.v.ledger.lease_ns / 1e9
        self.since_ns = time.time_ns()
        # Media versions (changed_ns) applied within the look-back: not read again.
        self.seen: dict[str, int] = {}

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._every, self.interval_s, self.refresh)
            nursery.start_soon(self._every, self.lease_s / 3, self.heartbeat)
            nursery.start_soon(self._every, self.lease_s, self.reclaim)

    @staticmethod
    async def _every(seconds: float, step) -> None:  # type: ignore[no-untyped-def]
        while True:
            await trio.sleep(seconds)
            try:
                await step()
            except Exception as exc:  # the catalog may be away; try again next round
                log.warning("%s failed: %s", step.__name__, exc)

    # lease -----------------------------------------------------------------
    async def heartbeat(self) -> None:
        ops = self.ops
        if await ops.offload(ops.v.ledger.heartbeat, ops.holder_id):
            ops.lease_valid_until = time.monotonic() + self.lease_s * 0.8
            return
        log.error("this mount's grants were reclaimed while it was cut off; re-registering")
        ops.holder_id = await ops.offload(ops.v.register_writer)
        ops.lease_valid_until = time.monotonic() + self.lease_s * 0.8
        for node in list(ops.inodes.by_media.values()):
            node.charged = node.settled = node.size
            node.held = False
            node.dirty = node.writers > 0

    async def reclaim(self) -> None:
        ops = self.ops
        reclaimed = await ops.offload(ops.v.reclaim_dead_holders)
        if reclaimed:
            log.warning("reclaimed %d grant(s) of processes whose lease expired", reclaimed)
        await ops.offload(ops.v.changes.prune)

    # catalog changes -------------------------------------------------------
    async def refresh(self) -> None:
        started = time.time_ns()
        changes = await self.ops.offload(
            self.ops.v.changes.since, self.since_ns - LOOK_BACK_NS, self.seen
        )
        self.since_ns = started
        await self.apply(changes, started)
        horizon = started - LOOK_BACK_NS
        self.seen = {k: v for k, v in self.seen.items() if v >= horizon}
        self.ops.touched = {k: t for k, t in self.ops.touched.items() if t >= started}

    def _stale(self, object_id: str, read_ns: int) -> bool:
        """A row read at ``read_ns`` predates a change this mount made to it, or is
        making: skip it (the look-back reads it again). Asked for each row just
        before applying it, since applying earlier rows awaits, and local
        changes can land meanwhile."""
        return self.ops.touched.get(object_id, 0) >= read_ns

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
        for view in changes.media:
            if not self._stale(view.id, read_ns) and await self._media(view):
                self.seen[view.id] = changes.versions[view.id]
        for media_id in changes.removed_media:
            await self.ops.media_removed(media_id)
        for pool_id in changes.removed_pools:
            await self.ops.pool_removed(pool_id)

    async def _pool(self, view: PoolView) -> bool:
        """Mirror one pool; False when its parent is not known yet (try after the others)."""
        inodes = self.ops.inodes
        parent = inodes.by_pool.get(view.parent_id) if view.parent_id else inodes.root
        if parent is None:
            return False
        node = inodes.by_pool.get(view.id)
        if node is None:
            await self._make_room(parent, view.name)
            inodes.add_pool(parent, view, {})
            return True
        if node.parent is not parent or node.name != view.name:
            await self._relocate(node, parent, view.name)
        node.update(view)
        return True

    async def _media(self, view: MediaView) -> bool:
        """Mirror one media; False when its pool is not known (the look-back retries)."""
        inodes = self.ops.inodes
        parent = inodes.by_pool.get(view.pool_id)
        node = inodes.by_media.get(view.id)
        if parent is None:
            return False
        if node is None:
            await self._make_room(parent, view.name)
            inodes.add_media(parent, view)
            return True
        if node.parent is not parent or node.name != view.name:
            await self._relocate(node, parent, view.name)
        if node.writers == 0 and (view.size != node.size or view.mtime_ns != node.mtime_ns):
            node.update(view)
            await self._forget_pages(node)
        elif node.writers == 0:
            node.update(view)
        return True

    async def _make_room(self, parent: DirNode, name: str) -> None:
        """Another host replaced what we list under ``name``: drop our stale entry."""
        stale = parent.children.get(name)
        if stale is None:
            return
        if isinstance(stale, MediaNode):
            await self.ops.media_removed(stale.media_id)
        elif stale.pool_id is not None:
            await self.ops.pool_removed(stale.pool_id)

    async def _relocate(self, node, parent: DirNode, name: str) -> None:  # type: ignore[no-untyped-def]
        old_parent, old_name = node.parent, node.name
        await self._make_room(parent, name)
        self.ops.inodes.move(node, parent, name)
        if old_parent is not None:
            await self.ops.forget_entry(old_parent, old_name, 0)

    async def _forget_pages(self, node: MediaNode) -> None:
        """Another host changed the bytes: the kernel must not serve cached pages or size."""

        def invalidate() -> None:
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(node.ino, attr_only=False)

        await trio.to_thread.run_sync(invalidate)
