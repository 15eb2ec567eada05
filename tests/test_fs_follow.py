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

from velocityfs.fs.follow import Follower
from velocityfs.fs.operations import VelocityOperations
from velocityfs.threads import Offload

pytestmark = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)


async def _no_kernel(*_args) -> None:  # nothing is mounted: no kernel cache to drop
    return None


def _racing_follower(ops: VelocityOperations, local_change) -> Follower:
    """A follower whose catalog read sees the rows from before ``local_change``,
    which commits while the read is under way."""
    follower = Follower(ops, 1.0)

    class Racing(Offload):
        async def __call__(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
            if fn == ops.v.changes.since:
                stale = await super().__call__(fn, *args, **kwargs)
                await local_change()
                return stale
            return await super().__call__(fn, *args, **kwargs)

    follower.ops = ops
    ops.offload = Racing(1)
    follower._forget_pages = _no_kernel  # type: ignore[method-assign]
    ops.forget_entry = _no_kernel  # type: ignore[method-assign]
    return follower


def _ops(catalog: Catalog) -> VelocityOperations:
    v = catalog.v
    ops = VelocityOperations(v, v.ledger.register_holder(), offload=Offload(1))
    ops.load()
    return ops


def test_truncate_racing_a_refresh_is_kept(catalog):
    catalog.setup({"tenants": 64})
    pool = catalog.pool("tenants")["pid"]
    media = catalog.v.media.create(pool, "disk.img")
    ops = _ops(catalog)
    node = ops.inodes.by_media[media.id]

    async def main() -> None:
        follower = _racing_follower(ops, lambda: ops.truncate(node, 4 * MIB))
        follower.since_ns -= 10**9  # the media row is recent: the read returns it (size 0)
        await follower.refresh()

    trio.run(main)
    assert os.stat(catalog.v.media.get(media.id).backing_path).st_size == 4 * MIB
    assert catalog.v.media.get(media.id).size == 4 * MIB
    assert node.size == node.settled == 4 * MIB
    assert catalog.used("tenants") == 4 * MIB


def test_rename_racing_a_refresh_is_kept(catalog):
    catalog.setup({"tenants": 64})
    pool = catalog.pool("tenants")["pid"]
    media = catalog.v.media.create(pool, "old.img")
    ops = _ops(catalog)
    node = ops.inodes.by_media[media.id]
    parent = node.parent
    assert parent is not None

    async def main() -> None:
        async def rename() -> None:
            await ops.rename(parent.ino, b"old.img", parent.ino, b"new.img", 0, None)

        follower = _racing_follower(ops, rename)
        follower.since_ns -= 10**9
        await follower.refresh()

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
    ops = _ops(catalog)
    local_node = ops.inodes.by_media[local.id]
    other_host = catalog.v.ledger.register_holder()
    catalog.v.ledger.settle(remote.id, other_host, 1 * MIB)  # changed elsewhere

    async def main() -> None:
        follower = Follower(ops, 1.0)
        follower.since_ns -= 10**9

        class RemoteFirst(Offload):
            async def __call__(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
                result = await super().__call__(fn, *args, **kwargs)
                if fn == ops.v.changes.since:  # the remote row first, then the stale local one
                    result.media.sort(key=lambda view: view.id != remote.id)
                return result

        async def local_change_while_applying(node) -> None:
            if node is not local_node:  # the first (remote) row's await: change the other
                await ops.truncate(local_node, 4 * MIB)

        ops.offload = RemoteFirst(1)
        follower._forget_pages = local_change_while_applying  # type: ignore[method-assign]
        ops.forget_entry = _no_kernel  # type: ignore[method-assign]
        await follower.refresh()

    trio.run(main)
    assert local_node.size == local_node.settled == 4 * MIB
    assert catalog.v.media.get(local.id).size == 4 * MIB
    assert ops.inodes.by_media[remote.id].size == 1 * MIB


def test_a_refresh_reads_each_media_version_once(catalog):
    """The look-back reads recent rows on every refresh; a version already applied is
    not built again, and a newer one (another host's settle) still is."""
    catalog.setup({"tenants": 64})
    pool = catalog.pool("tenants")["pid"]
    media = catalog.v.media.create(pool, "disk.img")
    ops = _ops(catalog)
    node = ops.inodes.by_media[media.id]
    read: list[list[str]] = []

    class Recording(Offload):
        async def __call__(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
            result = await super().__call__(fn, *args, **kwargs)
            if fn == ops.v.changes.since:
                read.append([view.id for view in result.media])
            return result

    async def main() -> None:
        follower = Follower(ops, 1.0)
        follower.since_ns -= 10**9  # the media row is recent: within the look-back
        ops.offload = Recording(1)
        await follower.refresh()
        await follower.refresh()
        other_host = catalog.v.ledger.register_holder()
        catalog.v.ledger.settle(media.id, other_host, 1 * MIB)
        follower._forget_pages = _no_kernel  # type: ignore[method-assign]
        await follower.refresh()

    trio.run(main)
    assert read == [[media.id], [], [media.id]]
    assert node.size == 1 * MIB
