"""The mount's objects driven in-process, without a kernel mount.

The fast tier: ``Filesystem`` is what the daemon serves (the same nodes, write
state, batches and operations, on a real catalog and real backing files);
only the kernel is left out, so its requests are made by calling the
operations' handlers directly, inside ``trio.run``. A handler's refusal comes
back as the ``pyfuse3.FUSEError`` the kernel would have got.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pyfuse3
import trio

from velocityfs.fs.filesystem import Filesystem
from velocityfs.fs.mirror import KernelCache
from velocityfs.fs.nodes import DirNode, MediaNode
from velocityfs.service.velocity import Velocity
from velocityfs.threads import Offload

T = TypeVar("T")

# A request from root with umask 0, as the kernel would describe it.
CTX = pyfuse3.RequestContext()


def filesystem(
    v: Velocity,
    *,
    offload: Offload | None = None,
    kernel: KernelCache | None = None,
    writer: bool = True,
) -> Filesystem:
    """A mount's objects on ``v``'s catalog, registered as a holder as a mount is
    (a writer: batched and journaled creates on SQLite)."""
    holder = v.register_writer() if writer else v.ledger.register_holder()
    return Filesystem(v, holder, offload or Offload(1), kernel=kernel)


def run(fs: Filesystem, body: Callable[[], Awaitable[T]]) -> T:
    """Run ``body`` in a trio loop with the mount's batches committing beside it, as
    they do in the daemon; what is still pending is committed at the end."""
    result: list[T] = []

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.grants.run_batches)
            result.append(await body())
            await fs.grants.commit()
            nursery.cancel_scope.cancel()

    trio.run(main)
    return result[0]


def errno_of(exc: BaseException) -> int:
    assert isinstance(exc, pyfuse3.FUSEError), f"not a FUSEError: {exc!r}"
    return exc.errno


class Client:
    """System calls on the mount's objects, the way the kernel turns them into
    requests (paths resolved by lookup, one handle per open)."""

    def __init__(self, fs: Filesystem) -> None:
        self.fs = fs
        self.ops = fs.ops

    def pool(self, path: str) -> DirNode:
        node: Any = self.fs.inodes.root
        for name in path.strip("/").split("/"):
            node = node.children[name]
        assert isinstance(node, DirNode)
        return node

    def media(self, path: str) -> MediaNode:
        parent, _, name = path.rpartition("/")
        node = self.pool(parent).children[name]
        assert isinstance(node, MediaNode)
        return node

    async def create(self, path: str, mode: int = 0o644) -> int:
        parent, _, name = path.rpartition("/")
        info, _attrs = await self.ops.create(
            self.pool(parent).ino, os.fsencode(name), mode, os.O_RDWR, CTX
        )
        return int(info.fh)

    async def open(self, path: str, flags: int = os.O_RDWR) -> int:
        info = await self.ops.open(self.media(path).ino, flags, CTX)
        return int(info.fh)

    async def write(self, fh: int, off: int, data: bytes) -> int:
        return await self.ops.write(fh, off, data)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return await self.ops.read(fh, off, size)

    async def truncate(self, path: str, size: int) -> None:
        """truncate(2). pyfuse3's SetattrFields cannot be made outside a request, so this
        asks the write state's owner directly, which is what setattr does with a size;
        a refusal is raised as the service's exception, not as an errno."""
        await self.fs.grants.resize(self.media(path), size)

    async def fallocate(self, fh: int, off: int, length: int, mode: int = 0) -> None:
        await self.ops.fallocate(fh, mode, off, length)

    async def copy(self, fh_in: int, off_in: int, fh_out: int, off_out: int, length: int) -> int:
        return await self.ops.copy_file_range(fh_in, off_in, fh_out, off_out, length, 0)

    async def fsync(self, fh: int) -> None:
        await self.ops.fsync(fh, False)

    async def close(self, fh: int) -> None:
        await self.ops.release(fh)

    async def unlink(self, path: str) -> None:
        parent, _, name = path.rpartition("/")
        await self.ops.unlink(self.pool(parent).ino, os.fsencode(name), CTX)

    async def refused(self, call: Awaitable[Any]) -> int:
        """The errno a request was refused with (it must be refused)."""
        try:
            await call
        except pyfuse3.FUSEError as exc:
            return exc.errno
        raise AssertionError("the request was not refused")
