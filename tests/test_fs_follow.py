"""The follower (the loop that mirrors other hosts' catalog changes into a mount)
must not undo a change this mount made while the follower's read was under way.

The race is real but narrow (a settle or rename committing between the
follower's read of the changed rows and its applying them), so these tests
drive the mount's operations and the follower in-process, without a kernel
mount, and make the follower's read return the rows as they were before the
local change committed.
"""

from __future__ import annotations

import os

import pytest
import trio
from support.fs import MIB, Catalog
from support.inprocess import CTX, filesystem

from velocityfs.fs.filesystem import Filesystem
from velocityfs.fs.mirror import KernelCache
from velocityfs.threads import Offload

pytestmark = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)


class NoKernel(KernelCache):
    """Nothing is mounted: no kernel cache to drop."""

    async def forget_entry(self, parent_ino: int, name: str, ino: int) -> None:
        return None

    async def forget_pages(self, ino: int) -> None:
        return None


def _racing(catalog: Catalog, local_change) -> Filesystem:
    """A mount whose follower's catalog read sees the rows from before ``local_change``,
    which commits while the read is under way."""
    v = catalog.v
    fs: list[Filesystem] = []

    class Racing(Offload):
        async def __call__(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
            if fn == v.changes.since:
                stale = await super().__call__(fn, *args, **kwargs)
                await local_change(fs[0])
                return stale
            return await super().__call__(fn, *args, **kwargs)

    fs.append(filesystem(v, offload=Racing(1), kernel=NoKernel(), writer=False))
    return fs[0]


def test_truncate_racing_a_refresh_is_kept(catalog):
    catalog.setup({"tenants": 64})
    pool = catalog.pool("tenants")["pid"]
    media = catalog.v.media.create(pool, "disk.img")
    fs = _racing(catalog, lambda fs: fs.grants.resize(node, 4 * MIB))
    node = fs.inodes.by_media[media.id]

    async def main() -> None:
        fs.follower.since_ns -= 10**9  # the media row is recent: the read returns it (size 0)
        await fs.follower.refresh()

    trio.run(main)
    assert os.stat(catalog.v.media.get(media.id).backing_path).st_size == 4 * MIB
    assert catalog.v.media.get(media.id).size == 4 * MIB
    assert node.size == node.settled == 4 * MIB
    assert catalog.used("tenants") == 4 * MIB


def test_rename_racing_a_refresh_is_kept(catalog):
    catalog.setup({"tenants": 64})
    pool = catalog.pool("tenants")["pid"]
    media = catalog.v.media.create(pool, "old.img")

    async def rename(fs: Filesystem) -> None:
        await fs.ops.rename(parent.ino, b"old.img", parent.ino, b"new.img", 0, CTX)

    fs = _racing(catalog, rename)
    node = fs.inodes.by_media[media.id]
    parent = node.parent
    assert parent is not None

    async def main() -> None:
        fs.follower.since_ns -= 10**9
        await fs.follower.refresh()

    trio.run(main)
    assert sorted(parent.children) == ["new.img"]
    assert node.name == "new.img"
    assert catalog.v.media.get(media.id).name == "new.img"


def test_a_change_landing_while_rows_are_applied_is_kept(catalog):
    """Applying one row awaits (dropping the kernel's pages); a local change to
    another media can commit meanwhile, and that media's row, read before it,
    must then be skipped, not applied over it."""
    catalog.setup({"tenants": 64})
    pool = catalog.pool("tenants")["pid"]
    remote = catalog.v.media.create(pool, "remote.img")
    local = catalog.v.media.create(pool, "local.img")

    class RemoteFirst(Offload):
        async def __call__(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
            result = await super().__call__(fn, *args, **kwargs)
            if fn == catalog.v.changes.since:  # the remote row first, then the stale local one
                result.media.sort(key=lambda view: view.id != remote.id)
            return result

    class LocalChangeWhileApplying(NoKernel):
        async def forget_pages(self, ino: int) -> None:
            if ino != local_node.ino:  # the first (remote) row's await: change the other
                await fs.grants.resize(local_node, 4 * MIB)

    fs = filesystem(
        catalog.v, offload=RemoteFirst(1), kernel=LocalChangeWhileApplying(), writer=False
    )
    local_node = fs.inodes.by_media[local.id]
    other_host = catalog.v.ledger.register_holder()
    catalog.v.ledger.settle(remote.id, other_host, 1 * MIB)  # changed elsewhere, after the load

    async def main() -> None:
        fs.follower.since_ns -= 10**9
        await fs.follower.refresh()

    trio.run(main)
    assert local_node.size == local_node.settled == 4 * MIB
    assert catalog.v.media.get(local.id).size == 4 * MIB
    assert fs.inodes.by_media[remote.id].size == 1 * MIB


def test_a_refresh_reads_each_media_version_once(catalog):
    """The look-back reads recent rows on every refresh; a version already applied is
    not built again, and a newer one (another host's settle) still is."""
    catalog.setup({"tenants": 64})
    pool = catalog.pool("tenants")["pid"]
    media = catalog.v.media.create(pool, "disk.img")
    read: list[list[str]] = []

    class Recording(Offload):
        async def __call__(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
            result = await super().__call__(fn, *args, **kwargs)
            if fn == catalog.v.changes.since:
                read.append([view.id for view in result.media])
            return result

    fs = filesystem(catalog.v, offload=Recording(1), kernel=NoKernel(), writer=False)
    node = fs.inodes.by_media[media.id]

    async def main() -> None:
        follower = fs.follower
        follower.since_ns -= 10**9  # the media row is recent: within the look-back
        await follower.refresh()
        await follower.refresh()
        other_host = catalog.v.ledger.register_holder()
        catalog.v.ledger.settle(media.id, other_host, 1 * MIB)
        await follower.refresh()

    trio.run(main)
    assert read == [[media.id], [], [media.id]]
    assert node.size == 1 * MIB
