"""pyfuse3 operations: translate kernel requests into service calls and back.

Hot paths (lookup, getattr, readdir, read, write within a grant) are served
from the in-memory nodes. What changes a media's write state (room, sizes,
leases, the batches of closes and unlinks) goes through ``fs.grants``;
other catalog changes go through ``Grants.call``, which orders them after
the mount's pending unlinks and runs them off the trio thread. Every handler
runs inside the fault boundary (``fs.boundary``): whatever it raises reaches
the kernel as an errno, never pyfuse3 as an exception.
"""

from __future__ import annotations

import errno
import functools
import grp
import os
import pwd
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import pyfuse3
import trio

from velocityfs.errors import NameTooLong
from velocityfs.fs.boundary import fault_boundary
from velocityfs.fs.grants import Grants
from velocityfs.fs.local_changes import LocalChanges
from velocityfs.fs.nodes import DirNode, Inodes, MediaNode, Node, blocks_of
from velocityfs.service.metrics import Metrics
from velocityfs.service.names import MAX_NAME_BYTES
from velocityfs.service.pools import mib_to_bytes
from velocityfs.service.velocity import Velocity
from velocityfs.service.views import Creator
from velocityfs.store.space import (
    FALLOC_FL_KEEP_SIZE,
    FALLOC_FL_PUNCH_HOLE,
    FALLOC_FL_ZERO_RANGE,
    fallocate,
)

MIB = 1 << 20
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


@fault_boundary
class VelocityOperations(pyfuse3.Operations):
    """The filesystem seen by the kernel."""

    supports_dot_lookup = False
    enable_writeback_cache = False
    enable_acl = False
    # Privilege clearing is ours (patches/pyfuse3-velocityfs.patch): the kernel then
    # stops asking getxattr("security.capability") before every write, half of a 4 KiB
    # write's requests. What it hands over is empty: media never carry setuid or
    # setgid (service.views.media_mode) nor security.capability (setxattr refuses it).
    handle_killpriv_v2 = True

    def __init__(
        self,
        velocity: Velocity,
        inodes: Inodes,
        grants: Grants,
        changes: LocalChanges,
        *,
        attr_timeout: float = 1.0,
        metrics: Metrics | None = None,
    ) -> None:
        super().__init__()
        self.v = velocity
        self.inodes = inodes
        self.grants = grants
        self.changes = changes
        self.attr_timeout = attr_timeout
        self.handles: dict[int, Handle] = {}
        self.requests: Counter[str] = Counter()  # counted by the fault boundary
        self.metrics = metrics or Metrics()  # reported to by the fault boundary
        self._next_fh = 1
        self.dir_handles: dict[int, list[tuple[str, Node]]] = {}

    # helpers -------------------------------------------------------------
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

    def handle(self, fh: int) -> Handle:
        try:
            return self.handles[fh]
        except KeyError:
            raise fuse_error(errno.EBADF) from None

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
            a.st_nlink = 0 if node.unlinked else 1
            a.st_size = node.size
            a.st_blocks = blocks_of(node)
            a.st_atime_ns = node.atime_ns
        else:
            assert isinstance(node, DirNode)
            a.st_mode = node.st_mode()
            a.st_nlink = 2 + node.subpools
            a.st_size = 4096
            a.st_blocks = 8
            a.st_atime_ns = node.atime_ns
        return a

    # lookup and attributes -----------------------------------------------
    async def lookup(
        self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.dir(parent_inode)
        if len(name) > MAX_NAME_BYTES:
            # The kernel passes longer names on; its own filesystems refuse them here.
            raise NameTooLong(f"a name is at most {MAX_NAME_BYTES} bytes")
        text = os.fsdecode(name)
        if text == ".":
            return self.attrs(parent)
        if text == "..":
            return self.attrs(parent.parent or parent)
        child = parent.children.get(text)
        if child is None:
            return self.absent()
        return self.attrs(child)

    def absent(self) -> pyfuse3.EntryAttributes:
        """ENOENT that the kernel keeps for the entry timeout (a negative entry, st_ino
        0): rsync looks a file's name up three times before it creates it under
        another and renames it there. A name that appears otherwise than by this
        mount's own requests (another host, the in-process API) drops the kernel's
        negative entry (``Mirror.appeared``)."""
        a = pyfuse3.EntryAttributes()
        a.st_ino = 0
        a.entry_timeout = self.attr_timeout
        return a

    async def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:
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
        if fields.update_atime:
            changes["atime_ns"] = attr.st_atime_ns
        if isinstance(node, MediaNode):
            if fields.update_size:
                await self.grants.settle_first(node)  # its batch would write the old size
                await self.grants.resize(node, attr.st_size)
            if changes:
                changes.update(await self.grants.set_attrs(node, changes))
                node.atime_ns = changes.get("atime_ns", node.atime_ns)
        else:
            assert isinstance(node, DirNode) and node.pool_id is not None
            if fields.update_size:
                raise fuse_error(errno.EISDIR)
            if changes:
                with self.changes.changing(node.pool_id):
                    await self.grants.batched(self.v.pools.set_attrs, node.pool_id, **changes)
            node.atime_ns = changes.get("atime_ns", node.atime_ns)
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
        dots: list[tuple[str, Node]] = [(".", node), ("..", node.parent or node)]
        self.dir_handles[fh] = dots + list(node.children.items())
        return fh

    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        entries = self.dir_handles.get(fh, [])
        for index in range(start_id, len(entries)):
            name, child = entries[index]
            if not pyfuse3.readdir_reply(token, os.fsencode(name), self.attrs(child), index + 1):
                break

    async def fsyncdir(self, fh: int, datasync: bool) -> None:
        """fsync on a pool: its closes and unlinks reach the catalog now (fs.grants)."""
        await self.grants.commit()

    async def releasedir(self, fh: int) -> None:
        self.dir_handles.pop(fh, None)

    async def mkdir(
        self, parent_inode: int, name: bytes, mode: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        parent = self.pool_dir(parent_inode)
        view = await self.grants.batched(
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
        with self.changes.changing(child.pool_id):
            await self.grants.call(self.v.pools.remove, child.pool_id)
        self.inodes.detach(child)
        parent.mtime_ns = parent.ctime_ns = time.time_ns()

    # refused node kinds --------------------------------------------------
    async def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise fuse_error(errno.EPERM)

    async def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise fuse_error(errno.EPERM)

    async def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        raise fuse_error(errno.EPERM)

    # media lifecycle -----------------------------------------------------
    async def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: pyfuse3.RequestContext
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        parent = self.pool_dir(parent_inode)
        assert parent.pool_id is not None
        text = os.fsdecode(name)
        if text in parent.children:
            raise fuse_error(errno.EEXIST)
        view, granted = await self.grants.create(
            parent.pool_id,
            text,
            mode=(mode & ~ctx.umask) & 0o7777,
            uid=ctx.uid,
            gid=ctx.gid,
            creator=creator_of(ctx.uid, ctx.gid),
        )
        node = self.inodes.add_media(parent, view)
        self.grants.created(node, granted)
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
                await self.grants.resize(node, 0)
            except BaseException:
                await self.release(info.fh)
                raise
        return info

    async def _open_handle(self, node: MediaNode, flags: int) -> pyfuse3.FileInfo:
        """Open the DEFAULT path (it follows a volume move); writers first take a lease.

        Media on a volume whose disk is not there gets ENODEV, not a file of the disk
        under its mount point (nor ENOENT for a file the directory lists). O_APPEND
        must not reach the backing file: pwrite would ignore our offsets.
        """
        presence = self.v.volumes.presence
        presence.require_online(node.volume)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable:
            await self.grants.open_writer(node)
        try:
            fd = os.open(node.open_path, os.O_RDWR if writable else os.O_RDONLY)
        except OSError as exc:
            if writable:
                self.grants.released(node, writable=True)
            if isinstance(exc, FileNotFoundError):
                presence.require_online(node.volume, fresh=True)  # gone since the check
            raise
        fh = self._new_fh()
        self.handles[fh] = Handle(node, fd, writable)
        node.open_count += 1
        return pyfuse3.FileInfo(fh=fh)

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(self.handle(fh).fd, size, off)

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        handle = self.handle(fh)
        node = handle.node
        if not self.grants.fits(node, off + len(buf)):
            buf = buf[: await self.grants.room_for_write(node, off, len(buf))]
        # No await from here to wrote(): the room cannot shrink under the write. A
        # volume's disk that fails or fills first leaves the file as it was.
        written = os.pwrite(handle.fd, buf, off)
        self.grants.wrote(node, off + written)
        return written

    async def fallocate(self, fh: int, mode: int, off: int, length: int) -> None:
        """fallocate(2): allocation that grows the file is charged first, like a write.

        Growth past a quota gets ENOSPC and changes nothing. Holes may be punched
        and ranges zeroed anywhere; allocating past the end while keeping the size
        is refused (EOPNOTSUPP), since those blocks would use disk the quota, which
        counts apparent sizes, never sees.
        """
        if mode & ~(FALLOC_FL_KEEP_SIZE | FALLOC_FL_PUNCH_HOLE | FALLOC_FL_ZERO_RANGE):
            raise fuse_error(errno.EOPNOTSUPP)
        handle = self.handle(fh)
        node = handle.node
        end = off + length
        keep_size = bool(mode & FALLOC_FL_KEEP_SIZE)
        if keep_size and not mode & FALLOC_FL_PUNCH_HOLE and end > node.size:
            raise fuse_error(errno.EOPNOTSUPP)
        grows = not keep_size and end > node.size
        await self.grants.allocate(
            node, end if grows else None, functools.partial(fallocate, handle.fd, mode, off, length)
        )

    async def lseek(self, fh: int, off: int, whence: int) -> int:
        """SEEK_DATA and SEEK_HOLE, answered by the backing file: every write, truncate
        and punched hole reaches it as asked, so its holes are the media's, and ``cp``,
        ``qemu-img map`` and ``convert`` skip them instead of reading zeros.

        ENXIO (no data at or after ``off``, or ``off`` past the end) is an answer, not
        a disk fault: it goes back as chosen, without the boundary's warning line.
        """
        try:
            return os.lseek(self.handle(fh).fd, off, whence)
        except OSError as exc:
            if exc.errno == errno.ENXIO:
                raise fuse_error(errno.ENXIO) from None
            raise

    async def copy_file_range(
        self, fh_in: int, off_in: int, fh_out: int, off_out: int, length: int, flags: int
    ) -> int:
        """copy_file_range(2) between two media: one request for the whole range, the
        copy made by the backing files' own (a reflink where the volume has them).

        The destination's room is that of a write of the same range (``Grants.copy``).
        Backing files on filesystems that cannot copy between them (EXDEV, EOPNOTSUPP)
        send the kernel back to reading and writing, each write charged as usual;
        *flags* is always 0 (the kernel refuses any other).
        """
        source, target = self.handle(fh_in), self.handle(fh_out)
        copy = functools.partial(
            os.copy_file_range, source.fd, target.fd, offset_src=off_in, offset_dst=off_out
        )
        try:
            return await self.grants.copy(target.node, off_out, length, copy)
        except OSError as exc:
            if exc.errno in (errno.EXDEV, errno.EOPNOTSUPP):
                raise fuse_error(exc.errno) from None
            raise

    async def fsync(self, fh: int, datasync: bool) -> None:
        handle = self.handle(fh)
        await trio.to_thread.run_sync(os.fdatasync if datasync else os.fsync, handle.fd)
        await self.grants.settle(handle.node, release_grant=False)

    # No flush handler: pyfuse3 answers ENOSYS, and the kernel then stops sending a
    # FLUSH round trip with every close(2). The last release settles, in a batch
    # (see fs.grants).

    async def release(self, fh: int) -> None:
        handle = self.handles.pop(fh)
        node = handle.node
        node.open_count -= 1
        try:
            self.grants.released(node, writable=handle.writable)
        finally:
            try:
                os.close(handle.fd)
            finally:
                if node.deleted and node.open_count == 0:
                    self.inodes.by_ino.pop(node.ino, None)

    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        parent = self.pool_dir(parent_inode)
        child = parent.children.get(os.fsdecode(name))
        if child is None:
            raise fuse_error(errno.ENOENT)
        if not isinstance(child, MediaNode):
            raise fuse_error(errno.EISDIR)
        open_now = child.open_count > 0
        self.grants.unlinked(child)
        self.inodes.detach(child, keep_row=open_now)
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
        # A replaced file still open here lives on unlinked, as after unlink.
        kept = isinstance(target, MediaNode) and target.open_count > 0
        with self.grants.changing(_object_id(node), _object_id(target)):
            if isinstance(node, MediaNode):
                if isinstance(target, DirNode):
                    raise fuse_error(errno.EISDIR)
                if new_parent is not old_parent:
                    await self.grants.settle_before_move(node)
                await self.grants.batched_with_room(
                    self.v.media.rename,
                    node.media_id,
                    new_parent.pool_id,
                    new_name,
                    keep_replaced_for=self.grants.holder_id if kept else None,
                )
            else:
                assert isinstance(node, DirNode) and node.pool_id is not None
                if isinstance(target, MediaNode):
                    raise fuse_error(errno.ENOTDIR)
                if isinstance(target, DirNode):
                    if target.children:
                        raise fuse_error(errno.ENOTEMPTY)
                    assert target.pool_id is not None
                    await self.grants.call(self.v.pools.remove, target.pool_id)
                await self.grants.call_with_room(
                    self.v.pools.rename, node.pool_id, new_parent.pool_id, new_name
                )
            if target is not None:
                self.inodes.detach(target, keep_row=kept)
            self.inodes.move(node, new_parent, new_name)
        now = time.time_ns()
        old_parent.mtime_ns = old_parent.ctime_ns = now
        new_parent.mtime_ns = new_parent.ctime_ns = now
        node.ctime_ns = now

    # filesystem ----------------------------------------------------------
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        await self.grants.commit()
        quota, used = await self.grants.call(self.v.pools.capacity)
        disk = os.statvfs(self.v.backing.top)
        # The room on the disks of the volumes that are there (an offline one's
        # directory is on another disk).
        room = await self.grants.call(self.v.volumes.free_bytes)
        frsize = 4096
        free = min(max(0, quota - used), room)
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
                await self.grants.commit()  # usage and room as they are, after the batch
            if key in ("quota_mib", "used_bytes"):
                view = await self.grants.call(self.v.pools.get, node.pool_id)
                if key == "quota_mib":
                    return _format_mib(view.quota_bytes)
                return str(view.used_bytes).encode()
            if key == "avail_bytes":
                return str(await self.grants.call(self.v.pools.available, node.pool_id)).encode()
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
        await self.grants.call(self.v.xattrs.set, owner, text, value)
        node.xattrs[text] = value

    async def _set_velocity_xattr(self, node: Node, key: str, value: bytes) -> None:
        if not (isinstance(node, DirNode) and node.pool_id is not None and key == "quota_mib"):
            raise fuse_error(errno.EPERM)
        text = value.decode(errors="replace").strip().rstrip("\0")
        quota = None if text.lower() in ("", "inherit", "none") else text
        quota_bytes = None if quota is None else mib_to_bytes(quota)
        await self.grants.commit()  # grants of closed files must not count as usage
        await self.grants.call(self.v.pools.set_quota, node.pool_id, quota_bytes)

    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        node = self.node(inode)
        text = os.fsdecode(name)
        if text.startswith(XATTR_PREFIX):
            raise fuse_error(errno.EPERM)
        if text not in node.xattrs:
            raise fuse_error(pyfuse3.ENOATTR)
        await self.grants.call(self.v.xattrs.remove, self._xattr_owner(node), text)
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
        await self.grants.settle_all([handle.node for handle in self.handles.values()])
