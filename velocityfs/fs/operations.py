"""pyfuse3 operations: translate kernel requests into service calls and back.

Hot paths (lookup, getattr, readdir, read, write within a grant) are served
from the in-memory nodes; everything that changes the catalog runs the
service in a worker thread (one at a time, which SQLite prefers) so a slow
transaction never stalls the trio loop that serves FUSE and HTTP. The one
exception is a unit of work of an open SQLite batch (creates, batched closes):
the batch holds the write lock, so it cannot wait for one, and it runs on the
loop (``call_batched``).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import grp
import logging
import os
import pwd
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pyfuse3
import trio

from velocityfs.errors import QuotaExceeded, VelocityError
from velocityfs.fs.deferred import DeferredReleases
from velocityfs.fs.errno_map import errno_of
from velocityfs.fs.nodes import IN_FLIGHT, DirNode, Inodes, MediaNode, Node, blocks_of
from velocityfs.service.pools import mib_to_bytes
from velocityfs.service.velocity import Velocity
from velocityfs.service.views import Creator, MediaView, PoolView
from velocityfs.store.space import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
)
from velocityfs.threads import CatalogUnavailable, Offload

log = logging.getLogger(__name__)

T = TypeVar("T")

MIB = 1 << 20
# A new file's first grant: a small file is then written without another transaction.
FIRST_GRANT = MIB
BLKSIZE = MIB
XATTR_PREFIX = "user.velocity."


@functools.lru_cache(maxsize=256)
def creator_of(uid: int, gid: int) -> Creator:
    """The Unix user and group of a creating process, as the volume policy sees them."""
    try:
        user: str | None = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        group = grp.getgrgid(gid).gr_name
    except KeyError:
        group = str(gid)
    return Creator(user=user, groups=frozenset({group}))


def fuse_error(code: int) -> pyfuse3.FUSEError:
    return pyfuse3.FUSEError(code)


@dataclass
class Handle:
    """One open() of a media: the backing file descriptor it reads and writes."""

    node: MediaNode
    fd: int
    writable: bool


@contextlib.contextmanager
def _as_errno(fn: Callable[..., Any]) -> Iterator[None]:
    """Service refusals become their errno, a catalog away or failing EIO (logged)."""
    try:
        yield
    except VelocityError as exc:
        raise fuse_error(errno_of(exc)) from exc
    except pyfuse3.FUSEError:
        raise
    except CatalogUnavailable as exc:
        log.warning("%s: %s", getattr(fn, "__name__", fn), exc)
        raise fuse_error(errno.EIO) from exc
    except Exception as exc:
        log.exception("catalog call %s failed", getattr(fn, "__name__", fn))
        raise fuse_error(errno.EIO) from exc


def _object_id(node: Node | None) -> str | None:
    """The catalog id of a media or pool node."""
    if isinstance(node, MediaNode):
        return node.media_id
    return node.pool_id if isinstance(node, DirNode) else None


def _format_mib(nbytes: int | None) -> bytes:
    if nbytes is None:
        return b"inherit"
    if nbytes % MIB == 0:
        return str(nbytes // MIB).encode()
    return f"{nbytes / MIB:.6f}".rstrip("0").encode()


class VelocityOperations(pyfuse3.Operations):
    """The filesystem seen by the kernel."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False

    def __init__(
        self,
        velocity: Velocity,
        holder_id: str,
        *,
        offload: Offload,
        attr_timeout: float = 1.0,
    ) -> None:
        super().__init__()
        self.v = velocity
        self.holder_id = holder_id
        self.attr_timeout = attr_timeout
        self.offload = offload
        # Writes past a media's settled size use grants, which are only ours
        # while our lease is renewed (see fs.follow).
        self.lease_valid_until = time.monotonic() + velocity.ledger.lease_ns / 1e9 * 0.8
        now = time.time_ns()
        root = DirNode(
            ino=pyfuse3.ROOT_INODE,
            name="",
            parent=None,
            mode=0o755,
            uid=0,
            gid=0,
            mtime_ns=now,
            ctime_ns=now,
        )
        self.inodes = Inodes(root)
        self.handles: dict[int, Handle] = {}
        self._next_fh = 1
        self.dir_handles: dict[int, list[tuple[str, Node]]] = {}
        # Pools and media this mount is changing (IN_FLIGHT) or changed, and when
        # (after the commit): the follower drops catalog views of them read before
        # that, which would undo the change they raced (a settle, rename, chmod).
        self.touched: dict[str, int] = {}
        self.deferred = DeferredReleases(self)

    @contextlib.contextmanager
    def changing(self, *object_ids: str | None) -> Iterator[None]:
        """Mark pools or media as changed by this mount for the follower (see touched)."""
        ids = [i for i in object_ids if i]
        for object_id in ids:
            self.touched[object_id] = IN_FLIGHT
        try:
            yield
        finally:
            now = time.time_ns()
            for object_id in ids:
                self.touched[object_id] = now

    # loading -------------------------------------------------------------
    def load(self) -> None:
        """Mirror the whole catalog in memory (20,000 media take well under a second)."""
        pools = self.v.pools.all()
        media = self.v.media.all()
        pool_xattrs = self.v.xattrs.of_many([p.id for p in pools])
        by_parent: dict[str | None, list] = {}
        for pool in pools:
            by_parent.setdefault(pool.parent_id, []).append(pool)
        frontier: list[tuple[str | None, DirNode]] = [(None, self.inodes.root)]
        while frontier:
            parent_id, parent_node = frontier.pop()
            for view in by_parent.get(parent_id, []):
                node = self.inodes.add_pool(parent_node, view, pool_xattrs.get(view.id, {}))
                frontier.append((view.id, node))
        for view in media:
            parent = self.inodes.by_pool.get(view.pool_id)
            if parent is not None:
                self.inodes.add_media(parent, view)

    # helpers -------------------------------------------------------------
    async def sql(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a service call off the trio thread, after the unlinks still pending (a name
        they free may be the one this call uses); service refusals become errno."""
        await self.deferred.commit_unlinks()
        return await self.call(fn, *args, **kwargs)

    async def sql_with_room(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``sql``, once more after committing pending closes if the room did not suffice:
        their grants may be what holds it."""
        try:
            return await self.sql(fn, *args, **kwargs)
        except pyfuse3.FUSEError as exc:
            if exc.errno != errno.ENOSPC or not self.deferred.pending:
                raise
        await self.deferred.commit()
        return await self.sql(fn, *args, **kwargs)

    async def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a service call off the trio thread; service refusals become errno."""
        with _as_errno(fn):
            return await self.offload(fn, *args, **kwargs)

    async def call_batched(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``call`` for a unit of work of the service's batch: right here on the loop
        while the batch is open (see ``Offload.in_batch``), else off the trio thread."""
        with _as_errno(fn):
            return await self.offload.in_batch(self.v.media.open_batch, fn, *args, **kwargs)

    def node(self, ino: int) -> Node:
        try:
            return self.inodes.by_ino[ino]
        except KeyError:
            raise fuse_error(errno.ENOENT) from None

    def dir(self, ino: int) -> DirNode:
        node = self.node(ino)
        if not isinstance(node, DirNode):
            raise fuse_error(errno.ENOTDIR)
        return node

    def pool_dir(self, ino: int) -> DirNode:
        """A directory that may hold media and subpools: any pool, not the root."""
        node = self.dir(ino)
        if node.is_root:
            raise fuse_error(errno.EPERM)
        return node

    def attrs(self, node: Node) -> pyfuse3.EntryAttributes:
        a = pyfuse3.EntryAttributes()
        a.st_ino = node.ino
        a.generation = 0
        a.entry_timeout = self.attr_timeout
        a.attr_timeout = self.attr_timeout
        a.st_uid = node.uid
        a.st_gid = node.gid
        a.st_rdev = 0
        a.st_blksize = BLKSIZE
        a.st_mtime_ns = node.mtime_ns
        a.st_ctime_ns = node.ctime_ns
        if isinstance(node, MediaNode):
            a.st_mode = node.st_mode()
            a.st_nlink = 1
            a.st_size = node.size
            a.st_blocks = blocks_of(node)
            a.st_atime_ns = node.atime_ns
        else:
            assert isinstance(node, DirNode)
            a.st_mode = node.st_mode()
            a.st_nlink = 2
            a.st_size = 4096
            a.st_blocks = 8
            a.st_atime_ns = node.mtime_ns
        return a

    # lookup and attributes -----------------------------------------------
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.dir(parent_inode)
        text = os.fsdecode(name)
        if text == ".":
            return self.attrs(parent)
        if text == "..":
            return self.attrs(parent.parent or parent)
        child = parent.children.get(text)
        if child is None:
            raise fuse_error(errno.ENOENT)
        return self.attrs(child)

    async def forget(self, inode_list: list[tuple[int, int]]) -> None:
        """Nodes live as long as their catalog rows; the kernel's counts are not needed."""

    async def getattr(self, inode: int, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self.attrs(self.node(inode))

    async def setattr(
        self,
        inode: int,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: int | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        node = self.node(inode)
        if isinstance(node, DirNode) and node.is_root:
            raise fuse_error(errno.EPERM)
        changes: dict[str, int] = {}
        if fields.update_mode:
            changes["mode"] = attr.st_mode & 0o7777
        if fields.update_uid:
            changes["uid"] = attr.st_uid
        if fields.update_gid:
            changes["gid"] = attr.st_gid
        if fields.update_mtime:
            changes["mtime_ns"] = attr.st_mtime_ns
        if isinstance(node, MediaNode):
            await self.deferred.settle_first(node)  # its batch would write the old mtime
            if fields.update_size:
                await self.truncate(node, attr.st_size)
            if fields.update_atime:
                changes["atime_ns"] = attr.st_atime_ns
            if changes:
                with self.changing(node.media_id):
                    await self.sql(self.v.media.set_attrs, node.media_id, **changes)
                node.atime_ns = changes.get("atime_ns", node.atime_ns)
        else:
            assert isinstance(node, DirNode) and node.pool_id is not None
            if fields.update_size:
                raise fuse_error(errno.EISDIR)
            if changes:
                with self.changing(node.pool_id):
                    await self.sql(self.v.pools.set_attrs, node.pool_id, **changes)
        node.mode = changes.get("mode", node.mode)
        node.uid = changes.get("uid", node.uid)
        node.gid = changes.get("gid", node.gid)
        node.mtime_ns = changes.get("mtime_ns", node.mtime_ns)
        if changes or fields.update_size:
            node.ctime_ns = time.time_ns()
        return self.attrs(node)

    # directories ---------------------------------------------------------
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        """Snapshot the entries so a listing is stable while the pool changes."""
        node = self.dir(inode)
        fh = self._new_fh()
        self.dir_handles[fh] = list(node.children.items())
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self.dir_handles.get(fh, [])
        for index in range(start_id, len(entries)):
            name, child = entries[index]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self.attrs(child), index + 1):
                break

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """fsync on a pool: its closes and unlinks reach the catalog now (fs.deferred)."""
        await self.deferred.commit()

    async def settle_pending(self) -> None:
        """The in-process API is about to read the catalog: commit what this mount deferred.

        If the catalog is away the batch stays queued, and the API call that follows
        meets the outage itself (503), rather than this one failing for it.
        """
        with contextlib.suppress(pyfuse3.FUSEError):
            await self.deferred.commit()

    async def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.pool_dir(parent_inode)
        view = await self.sql(
            self.v.pools.create,
            parent.pool_id,
            os.fsdecode(name),
            None,
            mode=(mode & ~ctx.umask) & 0o7777,
            uid=ctx.uid,
            gid=ctx.gid,
        )
        node = self.inodes.add_pool(parent, view, {})
        parent.mtime_ns = parent.ctime_ns = view.ctime_ns
        return self.attrs(node)

    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.pool_dir(parent_inode)
        child = parent.children.get(os.fsdecode(name))
        if child is None:
            raise fuse_error(errno.ENOENT)
        if not isinstance(child, DirNode):
            raise fuse_error(errno.ENOTDIR)
        if child.children:
            raise fuse_error(errno.ENOTEMPTY)
        assert child.pool_id is not None
        with self.changing(child.pool_id):
            await self.sql(self.v.pools.remove, child.pool_id)
        self.inodes.detach(child)
        parent.mtime_ns = parent.ctime_ns = time.time_ns()

    # refused node kinds --------------------------------------------------
    async def symlink(self, parent_inode, name, target, ctx):  # type: ignore[no-untyped-def]
        raise fuse_error(errno.EPERM)

    async def link(self, inode, new_parent_inode, new_name, ctx):  # type: ignore[no-untyped-def]
        raise fuse_error(errno.EPERM)

    async def mknod(self, parent_inode, name, mode, rdev, ctx):  # type: ignore[no-untyped-def]
        raise fuse_error(errno.EPERM)

    # media lifecycle -----------------------------------------------------
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self.pool_dir(parent_inode)
        text = os.fsdecode(name)
        if text in parent.children:
            raise fuse_error(errno.EEXIST)
        await self.deferred.commit_unlinks()
        view, granted = await self.call_batched(
            self.v.media.create_open,
            parent.pool_id,
            text,
            mode=(mode & ~ctx.umask) & 0o7777,
            uid=ctx.uid,
            gid=ctx.gid,
            creator=creator_of(ctx.uid, ctx.gid),
            holder_id=self.holder_id,
            grant_chunk=FIRST_GRANT,
        )
        self.deferred.created()
        node = self.inodes.add_media(parent, view)
        node.charged += granted
        node.held = True
        parent.mtime_ns = parent.ctime_ns = view.ctime_ns
        return await self._open_handle(node, flags), self.attrs(node)

    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        node = self.node(inode)
        if not isinstance(node, MediaNode):
            raise fuse_error(errno.EISDIR)
        info = await self._open_handle(node, flags)
        if flags & os.O_TRUNC and flags & os.O_ACCMODE != os.O_RDONLY:
            # libfuse asks for atomic O_TRUNC: the kernel leaves the truncation to us.
            try:
                await self.truncate(node, 0)
            except BaseException:
                await self.release(info.fh)
                raise
        return info

    async def _open_handle(self, node: MediaNode, flags: int) -> pyfuse3.FileInfo:
        """Open the DEFAULT path (it follows a volume move); writers first take a lease.

        O_APPEND must not reach the backing file: pwrite would ignore our offsets.
        """
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable:
            await self.deferred.reopen(node)
            # Under the node's lock: a batched lease release may be in flight.
            async with node.lock:
                if not node.held:
                    await self.call(self.v.ledger.hold, node.media_id, self.holder_id)
                    node.held = True
        try:
            fd = os.open(node.open_path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as exc:
            log.error("cannot open backing file %s: %s", node.open_path, exc)
            raise fuse_error(exc.errno or errno.EIO) from exc
        fh = self._new_fh()
        self.handles[fh] = Handle(node, fd, writable)
        node.open_count += 1
        node.writers += writable
        return pyfuse3.FileInfo(fh=fh)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.handles[fh].fd, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handles[fh]
        node = handle.node
        end = off + len(buf)
        if end > node.settled and time.monotonic() > self.lease_valid_until:
            # Cut off from the catalog too long: another host may have reclaimed our grants.
            raise fuse_error(errno.EIO)
        if end > node.charged:
            await self._reserve(node, end, partial=True)
            if off >= node.charged:
                raise fuse_error(errno.ENOSPC)
            if end > node.charged:
                buf = buf[: node.charged - off]
        # No await between the room check and the write: the grant cannot shrink under us.
        try:
            written = os.pwrite(handle.fd, buf, off)
        except OSError as exc:
            # A volume's disk filled before the quota did: the file stays as it was.
            raise fuse_error(exc.errno or errno.EIO) from exc
        if off + written > node.size:
            node.size = off + written
        node.mtime_ns = node.ctime_ns = time.time_ns()
        node.dirty = True
        return written

    async def _reserve(self, node: MediaNode, end: int, *, partial: bool) -> None:
        """``_grow``, and once more after committing pending closes if it fell short:
        their grants may be what holds the room."""
        try:
            await self._grow(node, end, partial=partial)
            if end <= node.charged or not self.deferred.pending:
                return
        except pyfuse3.FUSEError as exc:
            if exc.errno != errno.ENOSPC or not self.deferred.pending:
                raise
        await self.deferred.commit()
        await self._grow(node, end, partial=partial)

    async def _grow(self, node: MediaNode, end: int, *, partial: bool) -> None:
        """Reserve room so that ``node.charged >= end`` (or as much as fits, if partial)."""
        async with node.lock:
            if end <= node.charged:
                return
            if node.deleted:
                raise fuse_error(errno.ENOSPC)
            need = end - node.charged
            try:
                reservation = await self.offload(
                    self.v.ledger.reserve, node.media_id, self.holder_id, need, partial=partial
                )
            except QuotaExceeded as exc:
                if partial:
                    return
                raise fuse_error(errno.ENOSPC) from exc
            except VelocityError as exc:
                raise fuse_error(errno_of(exc)) from exc
            except CatalogUnavailable as exc:
                # As in sql(): an exception escaping a handler would end the whole daemon.
                log.warning("reserve: %s", exc)
                raise fuse_error(errno.EIO) from exc
            except Exception as exc:
                log.exception("catalog call reserve failed")
                raise fuse_error(errno.EIO) from exc
            node.charged += reservation.added
            node.held = True

    async def settle(self, node: MediaNode, *, release_grant: bool) -> None:
        """Record the node's size (and mtime) in the catalog; optionally return the grant.

        The grant row itself stays while a writer has the media open (the lease
        volume moves respect). Shrinking ``charged`` happens before the await, so
        a write racing the settlement has to reserve again instead of writing
        into room that is being handed back.
        """
        async with node.lock:
            if node.deleted:
                return
            size = node.size
            keep = 0 if release_grant else node.charged - size
            hold = node.writers > 0
            unchanged = not node.dirty and size == node.settled and keep == node.granted
            if unchanged and hold == node.held:
                return
            node.charged = size + keep
            node.dirty = False
            with self.changing(node.media_id):
                # call, not sql: a batch being committed may wait for this node's lock.
                await self.call(
                    self.v.ledger.settle,
                    node.media_id,
                    self.holder_id,
                    size,
                    keep,
                    hold=hold,
                    mtime_ns=node.mtime_ns,
                )
                node.settled = size
                node.held = hold or keep > 0

    async def truncate(self, node: MediaNode, size: int) -> None:
        """Resize a media; growth past a quota fails with ENOSPC and changes nothing."""
        await self.deferred.settle_first(node)
        if size > node.charged:
            await self._reserve(node, size, partial=False)
        with self.changing(node.media_id):
            async with node.lock:
                try:
                    os.truncate(node.open_path, size)
                except OSError as exc:
                    raise fuse_error(exc.errno or errno.EIO) from exc
                if size < node.size:
                    # The cut bytes were data, not reservation: they go back to the pool
                    # now, even while a writer keeps the file open (its grant stays).
                    node.charged -= node.size - size
                node.size = size
                node.mtime_ns = node.ctime_ns = time.time_ns()
                node.dirty = True
            await self.settle(node, release_grant=node.writers == 0)

    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        """fallocate(2): allocation that grows the file is charged first, like a write.

        Growth past a quota gets ENOSPC and changes nothing. Holes may be punched
        and ranges zeroed anywhere; allocating past the end while keeping the size
        is refused (EOPNOTSUPP), since those blocks would use disk the quota, which
        counts apparent sizes, never sees.
        """
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise fuse_error(errno.EOPNOTSUPP)
        handle = self.handles[fh]
        node = handle.node
        end = off + length
        keep_size = bool(mode & FALLOC_FL_KEEP_SIZE)
        if keep_size and not mode & FALLOC_FL_PUNCH_HOLE and end > node.size:
            raise fuse_error(errno.EOPNOTSUPP)
        grows = not keep_size and end > node.size
        if grows and time.monotonic() > self.lease_valid_until:
            raise fuse_error(errno.EIO)  # as in write(): our grants may be gone
        if grows and end > node.charged:
            await self._reserve(node, end, partial=False)
        async with node.lock:
            if grows and end > node.charged:
                # Handed back while we waited for the lock (a truncate, a settle).
                raise fuse_error(errno.ENOSPC)
            try:
                await trio.to_thread.run_sync(fallocate, handle.fd, mode, off, length)
            except OSError as exc:
                raise fuse_error(exc.errno or errno.EIO) from exc
            if grows:
                node.size = end
            node.mtime_ns = node.ctime_ns = time.time_ns()
            node.dirty = True

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.handles[fh]
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, handle.fd)
        await self.settle(handle.node, release_grant=False)

    # No flush handler: pyfuse3 answers ENOSYS, and the kernel then stops sending a
    # FLUSH round trip with every close(2). The last release settles, in a batch
    # (see fs.deferred).

    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        node = handle.node
        node.open_count -= 1
        node.writers -= handle.writable
        try:
            if node.writers == 0 and node.unsettled and not node.deleted:
                self.deferred.close(node)
        finally:
            os.close(handle.fd)
            if node.deleted and node.open_count == 0:
                self.inodes.by_ino.pop(node.ino, None)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.pool_dir(parent_inode)
        child = parent.children.get(os.fsdecode(name))
        if child is None:
            raise fuse_error(errno.ENOENT)
        if not isinstance(child, MediaNode):
            raise fuse_error(errno.EISDIR)
        self.deferred.unlink(child)
        self.inodes.detach(child)
        parent.mtime_ns = parent.ctime_ns = time.time_ns()

    async def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        if flags & pyfuse3.RENAME_EXCHANGE:
            raise fuse_error(errno.EINVAL)
        old_parent = self.dir(parent_inode_old)
        new_parent = self.dir(parent_inode_new)
        old_name, new_name = os.fsdecode(name_old), os.fsdecode(name_new)
        node = old_parent.children.get(old_name)
        if node is None:
            raise fuse_error(errno.ENOENT)
        target = new_parent.children.get(new_name)
        if target is node:
            return
        if target is not None and flags & pyfuse3.RENAME_NOREPLACE:
            raise fuse_error(errno.EEXIST)
        if old_parent.is_root or new_parent.is_root:
            raise fuse_error(errno.EPERM)
        with self.changing(_object_id(node), _object_id(target)):
            if isinstance(node, MediaNode):
                if isinstance(target, DirNode):
                    raise fuse_error(errno.EISDIR)
                await self._settle_before_move(node)
                await self.sql_with_room(
                    self.v.media.rename, node.media_id, new_parent.pool_id, new_name
                )
            else:
                assert isinstance(node, DirNode) and node.pool_id is not None
                if isinstance(target, MediaNode):
                    raise fuse_error(errno.ENOTDIR)
                if isinstance(target, DirNode):
                    if target.children:
                        raise fuse_error(errno.ENOTEMPTY)
                    assert target.pool_id is not None
                    await self.sql(self.v.pools.remove, target.pool_id)
                await self.sql_with_room(
                    self.v.pools.rename, node.pool_id, new_parent.pool_id, new_name
                )
            if target is not None:
                self.inodes.detach(target)
            self.inodes.move(node, new_parent, new_name)
        now = time.time_ns()
        old_parent.mtime_ns = old_parent.ctime_ns = now
        new_parent.mtime_ns = new_parent.ctime_ns = now
        node.ctime_ns = now

    async def _settle_before_move(self, node: MediaNode) -> None:
        """A move charges the catalog's size plus grants, so bring the size up to date first."""
        if node.dirty or node.size != node.settled:
            await self.settle(node, release_grant=node.open_count == 0)

    # filesystem ----------------------------------------------------------
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        await self.deferred.commit()
        quota, used = await self.sql(self.v.pools.capacity)
        disk = os.statvfs(self.v.backing.top)
        frsize = 4096
        free = min(max(0, quota - used), disk.f_bavail * disk.f_frsize)
        s = pyfuse3.StatvfsData()
        s.f_bsize = BLKSIZE
        s.f_frsize = frsize
        s.f_blocks = quota // frsize
        s.f_bfree = free // frsize
        s.f_bavail = free // frsize
        s.f_files = disk.f_files
        s.f_ffree = disk.f_ffree
        s.f_favail = disk.f_favail
        s.f_namemax = 255
        return s

    # extended attributes -------------------------------------------------
    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        node = self.node(inode)
        text = os.fsdecode(name)
        if text.startswith(XATTR_PREFIX):
            return await self._velocity_xattr(node, text[len(XATTR_PREFIX) :])
        try:
            return node.xattrs[text]
        except KeyError:
            raise fuse_error(pyfuse3.ENOATTR) from None

    async def _velocity_xattr(self, node: Node, key: str) -> bytes:
        if isinstance(node, MediaNode):
            if key == "mid":
                return node.media_id.encode()
            if key in ("volume", "backing_path"):
                volume, path = self.v.backing.locate(node.media_id)
                return (volume if key == "volume" else str(path)).encode()
        elif isinstance(node, DirNode) and node.pool_id is not None:
            if key == "pid":
                return node.pool_id.encode()
            if key in ("quota_mib", "used_bytes", "avail_bytes"):
                await self.deferred.commit()  # usage and room as they are, after the batch
            if key in ("quota_mib", "used_bytes"):
                view = await self.sql(self.v.pools.get, node.pool_id)
                if key == "quota_mib":
                    return _format_mib(view.quota_bytes)
                return str(view.used_bytes).encode()
            if key == "avail_bytes":
                return str(await self.sql(self.v.pools.available, node.pool_id)).encode()
        raise fuse_error(pyfuse3.ENOATTR)

    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        """Stored attributes only: ``user.velocity.*`` are virtual, as CephFS's quota
        attributes are, so ``rsync -X`` and ``cp -a`` neither copy nor try to remove them."""
        return [os.fsencode(n) for n in sorted(self.node(inode).xattrs)]

    async def setxattr(
        self, inode: int, name: bytes, value: bytes, ctx: pyfuse3.RequestContext
    ) -> None:
        node = self.node(inode)
        text = os.fsdecode(name)
        if text.startswith(XATTR_PREFIX):
            await self._set_velocity_xattr(node, text[len(XATTR_PREFIX) :], value)
            return
        if not text.startswith("user."):
            raise fuse_error(errno.EOPNOTSUPP)
        owner = self._xattr_owner(node)
        await self.sql(self.v.xattrs.set, owner, text, value)
        node.xattrs[text] = value

    async def _set_velocity_xattr(self, node: Node, key: str, value: bytes) -> None:
        if not (isinstance(node, DirNode) and node.pool_id is not None and key == "quota_mib"):
            raise fuse_error(errno.EPERM)
        text = value.decode(errors="replace").strip().rstrip("\0")
        quota = None if text.lower() in ("", "inherit", "none") else text
        try:
            quota_bytes = None if quota is None else mib_to_bytes(quota)
        except VelocityError as exc:
            raise fuse_error(errno.EINVAL) from exc
        await self.deferred.commit()  # grants of closed files must not count as usage
        await self.sql(self.v.pools.set_quota, node.pool_id, quota_bytes)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self.node(inode)
        text = os.fsdecode(name)
        if text.startswith(XATTR_PREFIX):
            raise fuse_error(errno.EPERM)
        if text not in node.xattrs:
            raise fuse_error(pyfuse3.ENOATTR)
        await self.sql(self.v.xattrs.remove, self._xattr_owner(node), text)
        del node.xattrs[text]

    @staticmethod
    def _xattr_owner(node: Node) -> str:
        if isinstance(node, MediaNode):
            return node.media_id
        assert isinstance(node, DirNode)
        if node.pool_id is None:
            raise fuse_error(errno.EPERM)
        return node.pool_id

    # shutdown ------------------------------------------------------------
    async def settle_all(self) -> None:
        """On unmount: settle every open media and hand back every grant and lease."""
        await self.deferred.commit()
        for handle in list(self.handles.values()):
            handle.node.writers = 0
            if not handle.node.deleted:
                await self.settle(handle.node, release_grant=True)

    # changes made by the in-process API ------------------------------------
    async def forget_entry(self, parent: DirNode, name: str, ino: int) -> None:
        """Drop the kernel's cached entry; from a thread, as a call on the loop deadlocks."""

        def invalidate() -> None:
            with contextlib.suppress(OSError):
                pyfuse3.invalidate_entry(parent.ino, os.fsencode(name), deleted=ino)

        await trio.to_thread.run_sync(invalidate)

    async def pool_added(self, view: PoolView) -> None:
        parent = self.inodes.by_pool.get(view.parent_id or "")
        if parent is not None and view.name not in parent.children:
            self.inodes.add_pool(parent, view, {})

    async def media_added(self, view: MediaView) -> None:
        parent = self.inodes.by_pool.get(view.pool_id)
        if parent is not None and view.name not in parent.children:
            self.inodes.add_media(parent, view)

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
