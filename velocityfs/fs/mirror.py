"""The mount's nodes kept in step with catalog changes made elsewhere.

Changes reach a mount two ways: from the in-process API, at once (this is the
``Mirror`` that ``api.app`` is given), and from other processes and hosts,
through the change feed (``fs.follow``). Both end here: nodes are added,
moved or dropped, and the kernel's cached entries and pages of what changed
are dropped with them.
"""

from __future__ import annotations

import contextlib
import logging
import os

import pyfuse3
import trio

from velocityfs.fs.grants import Grants
from velocityfs.fs.nodes import DirNode, Inodes, MediaNode, Node
from velocityfs.service.velocity import Velocity
from velocityfs.service.views import MediaView, PoolView
from velocityfs.threads import CatalogUnavailable

log = logging.getLogger(__name__)


def attributes_of(node: DirNode | MediaNode) -> tuple[int, ...]:
    """What the kernel caches of a node (``VelocityOperations.attrs``) that another host
    changes; a media's size is its write state's (``Grants.adopt``). Not the ctime: it
    moves with each of these, and a write here moves it without the catalog (which
    keeps the mtime), so comparing it would drop the attributes of every media this
    mount wrote once more."""
    size = node.size if isinstance(node, MediaNode) else 0
    return (node.mode, node.uid, node.gid, node.mtime_ns, node.atime_ns, size)


class KernelCache:
    """The kernel's cache of this mount's names and pages.

    Invalidation is called on a thread: on the trio thread, while a related FUSE
    request is pending, it deadlocks the whole process (docs/architecture.md).
    """

    async def forget_entry(self, parent_ino: int, name: str, ino: int) -> None:
        def invalidate() -> None:
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_entry(parent_ino, os.fsencode(name), deleted=ino)

        await trio.to_thread.run_sync(invalidate)

    async def forget_pages(self, ino: int) -> None:
        """Drop the pages and the attributes of ``ino``."""
        await self._forget_inode(ino, attr_only=False)

    async def forget_attributes(self, ino: int) -> None:
        await self._forget_inode(ino, attr_only=True)

    @staticmethod
    async def _forget_inode(ino: int, *, attr_only: bool) -> None:
        def invalidate() -> None:
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_inode(ino, attr_only=attr_only)

        await trio.to_thread.run_sync(invalidate)


class Mirror:
    """Applies catalog changes to the nodes; ``kernel`` is None where nothing is mounted."""

    def __init__(
        self, velocity: Velocity, inodes: Inodes, grants: Grants, kernel: KernelCache | None
    ) -> None:
        self._v = velocity
        self.inodes = inodes
        self.grants = grants
        self._kernel = kernel

    def load(self) -> None:
        """Mirror the whole catalog in memory (20,000 media take well under a second)."""
        pools = self._v.pools.all()
        media = self._v.media.all()
        pool_xattrs = self._v.xattrs.of_many([p.id for p in pools])
        by_parent: dict[str | None, list[PoolView]] = {}
        for pool in pools:
            by_parent.setdefault(pool.parent_id, []).append(pool)
        frontier: list[tuple[str | None, DirNode]] = [(None, self.inodes.root)]
        while frontier:
            parent_id, parent_node = frontier.pop()
            for view in by_parent.get(parent_id, []):
                node = self.inodes.add_pool(parent_node, view, pool_xattrs.get(view.id, {}))
                frontier.append((view.id, node))
        for media_view in media:
            parent = self.inodes.by_pool.get(media_view.pool_id)
            if parent is not None:
                self.inodes.add_media(parent, media_view)

    # the in-process API's changes ------------------------------------------------
    async def settle_pending(self) -> None:
        """The in-process API is about to read the catalog: commit what this mount batched.

        If the catalog is away the batch stays queued, and the API call that follows
        meets the outage itself (503), rather than this one failing for it.
        """
        try:
            await self.grants.commit()
        except CatalogUnavailable:
            return
        except Exception:
            log.exception("could not commit this mount's batch before an API call")

    async def pool_added(self, view: PoolView) -> None:
        parent = self.inodes.by_pool.get(view.parent_id or "")
        if parent is not None and view.name not in parent.children:
            self.inodes.add_pool(parent, view, {})
            await self.appeared(parent, view.name)

    async def media_added(self, view: MediaView) -> None:
        parent = self.inodes.by_pool.get(view.pool_id)
        if parent is not None and view.name not in parent.children:
            self.inodes.add_media(parent, view)
            await self.appeared(parent, view.name)

    async def media_removed(self, media_id: str) -> None:
        node = self.inodes.by_media.get(media_id)
        if node is None or node.parent is None:
            return
        parent, name = node.parent, node.name
        self.inodes.detach(node)
        await self.forget_entry(parent, name, node.ino)

    async def pool_removed(self, pool_id: str) -> None:
        """A pool deleted with all its contents: drop the whole subtree."""
        node = self.inodes.by_pool.get(pool_id)
        if node is None or node.parent is None:
            return
        stack = [node]
        while stack:
            current = stack.pop()
            for child in list(current.children.values()):
                if isinstance(child, DirNode):
                    stack.append(child)
                else:
                    self.inodes.detach(child)
            self.inodes.detach(current)
        await self.forget_entry(node.parent, node.name, node.ino)

    # other hosts' changes (fs.follow) ----------------------------------------------
    async def make_room(self, parent: DirNode, name: str) -> None:
        """Another host replaced what we list under ``name``: drop our stale entry."""
        stale = parent.children.get(name)
        if isinstance(stale, MediaNode):
            await self.media_removed(stale.media_id)
        elif isinstance(stale, DirNode) and stale.pool_id is not None:
            await self.pool_removed(stale.pool_id)

    async def relocate(self, node: Node, parent: DirNode, name: str) -> None:
        """Another host moved or renamed ``node``."""
        old_parent, old_name = node.parent, node.name
        await self.make_room(parent, name)
        self.inodes.move(node, parent, name)
        await self.appeared(parent, name)
        if old_parent is not None:
            await self.forget_entry(old_parent, old_name, 0)

    async def media_changed(self, node: MediaNode, view: MediaView) -> None:
        """Another host changed a media's metadata or bytes; an open one here keeps its
        local state. The kernel drops pages the bytes changed under, and attributes
        that changed: nothing it caches outlives a change seen here (``fs.follow``)."""
        if node.writers != 0:
            return
        bytes_changed = view.size != node.size or view.mtime_ns != node.mtime_ns
        shown = attributes_of(node)
        node.update(view)
        self.grants.adopt(node, view)
        if self._kernel is None:
            return
        if bytes_changed:
            await self._kernel.forget_pages(node.ino)
        elif attributes_of(node) != shown:
            await self._kernel.forget_attributes(node.ino)

    async def pool_changed(self, node: DirNode, view: PoolView) -> None:
        """Another host changed a pool's metadata (its mode, owner, times)."""
        shown = attributes_of(node)
        node.update(view)
        if self._kernel is not None and attributes_of(node) != shown:
            await self._kernel.forget_attributes(node.ino)

    async def appeared(self, parent: DirNode, name: str) -> None:
        """``name`` was added to ``parent`` (after the node is there): drop the negative
        entry the kernel may keep for it (``VelocityOperations.absent``)."""
        await self.forget_entry(parent, name, 0)

    async def forget_entry(self, parent: DirNode, name: str, ino: int) -> None:
        """Drop the kernel's cached entry ``name`` of ``parent`` (``ino``: the node gone)."""
        if self._kernel is not None:
            await self._kernel.forget_entry(parent.ino, name, ino)
