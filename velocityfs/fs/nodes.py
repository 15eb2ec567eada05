"""The mount's in-memory mirror of the catalog.

Lookups, getattr, readdir, read and write are answered from these nodes
without SQL; every change goes through the service first and is mirrored
here only once it has committed. A media node's write state (its size,
grant, lease and lock) is changed by ``fs.grants`` alone.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field

import trio

from velocityfs.service.views import MediaView, PoolView


@dataclass(eq=False)
class Node:
    """Anything with an inode number and a name in a directory."""

    ino: int
    name: str
    parent: DirNode | None
    mode: int
    uid: int
    gid: int
    mtime_ns: int
    ctime_ns: int
    xattrs: dict[str, bytes] = field(default_factory=dict)

    @property
    def is_dir(self) -> bool:
        return False


@dataclass(eq=False)
class DirNode(Node):
    """The mount root (pool_id None) or a pool."""

    pool_id: str | None = None
    atime_ns: int = 0
    children: dict[str, Node] = field(default_factory=dict)
    # Pools among the children: a directory's link count is 2 plus these, as on the
    # kernel's own filesystems (find(1) relies on it). Kept by ``Inodes``.
    subpools: int = 0

    @property
    def is_dir(self) -> bool:
        return True

    @property
    def is_root(self) -> bool:
        return self.pool_id is None

    def st_mode(self) -> int:
        return stat.S_IFDIR | self.mode

    def update(self, view: PoolView) -> None:
        self.name = view.name
        self.mode, self.uid, self.gid = view.mode, view.uid, view.gid
        self.atime_ns, self.mtime_ns, self.ctime_ns = view.atime_ns, view.mtime_ns, view.ctime_ns


@dataclass(eq=False)
class MediaNode(Node):
    """A media file and the state of writers on it.

    The write state, changed only by ``fs.grants`` (docs/architecture.md,
    "The write state"): ``size`` is the file's size here; ``settled`` is the
    size the catalog records; ``charged`` is what the ledger charges for it
    on behalf of this mount (settled size plus our grant). Writes up to
    ``charged`` need no SQL; ``size`` never exceeds it. ``held`` says the
    catalog has our grant row, which marks the media open for writing here
    (volume moves wait for it to go); ``dirty`` that the mtime or bytes
    changed since the last settle; ``grew`` that writes grew it since the
    last lease was taken (``Grants.open_writer``); ``writers`` counts
    handles open for writing; ``lock`` serialises the catalog calls that
    change the grant.
    ``open_count`` (every handle) is the operations' bookkeeping.
    ``unlinked``: its name is gone (link count 0); ``deleted``: so is its
    catalog row, or it goes with the next batch. A media unlinked while open
    is ``unlinked`` but not ``deleted`` until its last close.
    """

    media_id: str = ""
    volume: str = ""
    open_path: str = ""
    size: int = 0
    settled: int = 0
    charged: int = 0
    atime_ns: int = 0
    open_count: int = 0
    writers: int = 0
    held: bool = False
    dirty: bool = False
    grew: bool = False
    unlinked: bool = False
    deleted: bool = False
    lock: trio.Lock = field(default_factory=trio.Lock)
    # ``blocks_of``'s memo: the backing file's blocks, and for which path, size, mtime.
    blocks: int = 0
    blocks_for: tuple[str, int, int] | None = None

    def st_mode(self) -> int:
        return stat.S_IFREG | self.mode

    @property
    def granted(self) -> int:
        return self.charged - self.settled

    @property
    def unsettled(self) -> bool:
        """The catalog does not know this node's state yet: size, grant or lease."""
        return self.held or self.dirty or self.size != self.settled or self.granted != 0

    def update(self, view: MediaView) -> None:
        """Take the catalog's metadata (its size is for ``Grants.adopt`` to take)."""
        self.name = view.name
        self.mode, self.uid, self.gid = view.mode, view.uid, view.gid
        self.atime_ns, self.mtime_ns, self.ctime_ns = view.atime_ns, view.mtime_ns, view.ctime_ns
        self.volume = view.volume
        self.open_path = view.open_path


class Inodes:
    """Inode numbers handed to the kernel, never reused within one mount."""

    def __init__(self, root: DirNode) -> None:
        self.by_ino: dict[int, Node] = {root.ino: root}
        self.by_pool: dict[str, DirNode] = {}
        self.by_media: dict[str, MediaNode] = {}
        self._next = root.ino + 1
        self.root = root

    def next_ino(self) -> int:
        ino = self._next
        self._next += 1
        return ino

    def add_pool(self, parent: DirNode, view: PoolView, xattrs: dict[str, bytes]) -> DirNode:
        node = DirNode(
            ino=self.next_ino(),
            name=view.name,
            parent=parent,
            mode=view.mode,
            uid=view.uid,
            gid=view.gid,
            mtime_ns=view.mtime_ns,
            ctime_ns=view.ctime_ns,
            xattrs=dict(xattrs),
            pool_id=view.id,
            atime_ns=view.atime_ns,
        )
        _link(parent, node)
        self.by_ino[node.ino] = node
        self.by_pool[view.id] = node
        return node

    def add_media(self, parent: DirNode, view: MediaView) -> MediaNode:
        node = MediaNode(
            ino=self.next_ino(),
            name=view.name,
            parent=parent,
            mode=view.mode,
            uid=view.uid,
            gid=view.gid,
            mtime_ns=view.mtime_ns,
            ctime_ns=view.ctime_ns,
            xattrs=dict(view.xattrs),
            media_id=view.id,
            volume=view.volume,
            open_path=view.open_path,
            size=view.size,
            settled=view.size,
            charged=view.size,
            atime_ns=view.atime_ns,
        )
        _link(parent, node)
        self.by_ino[node.ino] = node
        self.by_media[view.id] = node
        return node

    def detach(self, node: Node, *, keep_row: bool = False) -> None:
        """Take a node out of its directory; keep its inode while a handle is open.

        ``keep_row``: a media unlinked while open, whose catalog row stays until
        its last close (``Grants.unlinked``).
        """
        _unlink(node)
        if isinstance(node, MediaNode):
            node.unlinked = True
            node.deleted = not keep_row
            self.by_media.pop(node.media_id, None)
            if node.open_count == 0:
                self.by_ino.pop(node.ino, None)
        elif isinstance(node, DirNode):
            self.by_pool.pop(node.pool_id or "", None)
            self.by_ino.pop(node.ino, None)

    def move(self, node: Node, new_parent: DirNode, new_name: str) -> None:
        _unlink(node)
        node.parent = new_parent
        node.name = new_name
        _link(new_parent, node)


def _link(parent: DirNode, node: Node) -> None:
    """Enter ``node`` in ``parent`` under its name, in place of what was there."""
    replaced = parent.children.get(node.name)
    if replaced is not None and replaced is not node:
        _unlink(replaced)
    parent.children[node.name] = node
    if isinstance(node, DirNode):
        parent.subpools += 1


def _unlink(node: Node) -> None:
    parent = node.parent
    if parent is not None and parent.children.get(node.name) is node:
        del parent.children[node.name]
        if isinstance(node, DirNode):
            parent.subpools -= 1


def blocks_of(node: MediaNode) -> int:
    """512-byte blocks really allocated on the backing volume (sparse files show small).

    Asked of the backing file again only once the media's path, size or mtime moved:
    every change of its bytes here moves the mtime (``fs.grants``: writes, truncates,
    fallocate, copies), one elsewhere comes with the catalog's. Without the stat(2),
    building a media's attributes for a lookup, getattr or readdirplus entry took 1.8
    instead of 8 us here (issue 18).
    """
    key = (node.open_path, node.size, node.mtime_ns)
    if node.blocks_for == key:
        return node.blocks
    try:
        node.blocks = os.stat(node.open_path).st_blocks
    except OSError:
        return (node.size + 511) // 512
    node.blocks_for = key
    return node.blocks
