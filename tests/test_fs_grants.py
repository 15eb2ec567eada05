"""The quota protocol of a mount, driven in-process: the fast tier.

The mount's own objects (``fs.filesystem.Filesystem``: nodes, write state,
batches, operations) on a real catalog and real backing files, with the
kernel left out: requests are handler calls (tests/support/inprocess.py).
That reaches the protocol's edges in milliseconds, where a kernel mount
needs timing luck: short writes at the limit, grants growing near it,
settling, truncate and fallocate past it, and a mount whose grants another
host reclaimed. The kernel-mount tests (test_fs_quota.py and others) keep
the end-to-end view. Every test ends with the catalog's usage recomputed
from first principles (tests/support/usage.py).
"""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path

import pyfuse3
import pytest
import trio
from sqlalchemy import text
from support.fs import Catalog
from support.inprocess import CTX, Client, filesystem, run
from support.usage import assert_usage_consistent, grant_count

from velocityfs.errors import QuotaExceeded
from velocityfs.fs.boundary import is_guarded
from velocityfs.fs.operations import VelocityOperations
from velocityfs.service.velocity import Velocity
from velocityfs.store.space import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE
from velocityfs.threads import Offload

KIB = 1 << 10
MIB = 1 << 20


@pytest.fixture
def v(catalog: Catalog) -> Velocity:
    catalog.v.init()
    return catalog.v


def used(v: Velocity, ref: str) -> int:
    return v.pool_by_ref(ref).used_bytes


def on_disk(v: Velocity, client: Client, path: str) -> int:
    return os.stat(client.media(path).open_path).st_size


def test_a_write_that_only_partly_fits_is_short_and_the_next_gets_enospc(v: Velocity) -> None:
    v.pools.create(None, "p", 100 * KIB)
    fs = filesystem(v)
    c = Client(fs)

    async def body() -> None:
        fh = await c.create("p/disk.img")
        assert await c.write(fh, 0, b"x" * (150 * KIB)) == 100 * KIB
        assert await c.refused(c.write(fh, 100 * KIB, b"y")) == errno.ENOSPC
        # Within what was written, writes still work at the limit.
        assert await c.write(fh, 0, b"z" * KIB) == KIB
        await c.close(fh)

    run(fs, body)
    assert on_disk(v, c, "p/disk.img") == 100 * KIB
    assert [m.size for m in v.media.all()] == [100 * KIB]
    assert used(v, "p") == 100 * KIB
    assert grant_count(v) == 0
    assert_usage_consistent(v)


def test_two_writers_growing_their_grants_fill_a_pool_to_the_byte(v: Velocity) -> None:
    """Near the limit a grant is never more than a quarter of what is left, so a
    second writer still gets room; together they fill the pool exactly."""
    root = v.pools.create(None, "p", 4 * MIB)
    v.pools.create(root.id, "sub", None)
    fs = filesystem(v)
    c = Client(fs)
    chunk = 12 * KIB

    async def body() -> None:
        a, b = await c.create("p/a.img"), await c.create("p/sub/b.img")
        offsets = {a: 0, b: 0}
        full: set[int] = set()
        while len(full) < 2:
            for fh in (a, b):
                if fh in full:
                    continue
                try:
                    offsets[fh] += await c.write(fh, offsets[fh], b"w" * chunk)
                except pyfuse3.FUSEError as exc:
                    assert exc.errno == errno.ENOSPC
                    full.add(fh)
            # While both are open, grants count: the pool is never over its quota.
            assert used(v, "p") <= 4 * MIB
        assert offsets[a] > MIB and offsets[b] > MIB  # both got room near the limit
        assert offsets[a] + offsets[b] == 4 * MIB
        await c.close(a)
        await c.close(b)

    run(fs, body)
    assert sum(m.size for m in v.media.all()) == 4 * MIB
    assert used(v, "p") == 4 * MIB
    assert grant_count(v) == 0
    assert_usage_consistent(v)


def test_fsync_settles_the_size_and_keeps_the_grant_until_the_close(v: Velocity) -> None:
    v.pools.create(None, "p", 256 * MIB)
    fs = filesystem(v)
    c = Client(fs)
    seen: dict[str, int] = {}

    async def body() -> None:
        fh = await c.create("p/disk.img")
        await c.write(fh, 0, b"d" * (3 * MIB))
        await c.fsync(fh)
        await fs.grants.commit()  # the settle may sit in SQLite's batch: commit it
        media = v.media.all()[0]
        seen["size"] = media.size
        seen["used"] = used(v, "p")
        seen["grants"] = grant_count(v)
        await c.close(fh)

    run(fs, body)
    assert seen["size"] == 3 * MIB
    assert seen["grants"] == 1
    assert seen["used"] > 3 * MIB  # the rest of the grant is still charged
    assert used(v, "p") == 3 * MIB  # and handed back by the close
    assert grant_count(v) == 0
    assert_usage_consistent(v)


def test_truncate_past_the_quota_changes_nothing_and_within_it_is_charged(v: Velocity) -> None:
    v.pools.create(None, "p", MIB)
    fs = filesystem(v)
    c = Client(fs)

    async def body() -> None:
        fh = await c.create("p/disk.img")
        await c.write(fh, 0, b"a" * (512 * KIB))
        await c.close(fh)
        await fs.grants.commit()
        with pytest.raises(QuotaExceeded):
            await c.truncate("p/disk.img", MIB + 1)
        assert on_disk(v, c, "p/disk.img") == 512 * KIB
        assert used(v, "p") == 512 * KIB
        await c.truncate("p/disk.img", MIB)
        assert used(v, "p") == MIB
        # Shrinking while a writer keeps it open gives the cut bytes back at once.
        fh = await c.open("p/disk.img")
        await c.truncate("p/disk.img", 100 * KIB)
        assert used(v, "p") == 100 * KIB
        assert await c.write(fh, 100 * KIB, b"b" * KIB) == KIB
        await c.close(fh)

    run(fs, body)
    assert on_disk(v, c, "p/disk.img") == 101 * KIB
    assert v.media.all()[0].size == 101 * KIB
    assert used(v, "p") == 101 * KIB
    assert_usage_consistent(v)


def test_fallocate_growth_is_charged_like_a_write(v: Velocity) -> None:
    v.pools.create(None, "p", 2 * MIB)
    fs = filesystem(v)
    c = Client(fs)

    async def body() -> None:
        fh = await c.create("p/disk.img")
        assert await c.refused(c.fallocate(fh, 0, 2 * MIB + 1)) == errno.ENOSPC
        assert on_disk(v, c, "p/disk.img") == 0
        await c.fallocate(fh, 0, MIB)
        assert on_disk(v, c, "p/disk.img") == MIB
        # Past the end with the size kept: blocks the quota would never count.
        keep = FALLOC_FL_KEEP_SIZE
        assert await c.refused(c.fallocate(fh, MIB, KIB, keep)) == errno.EOPNOTSUPP
        await c.fallocate(fh, 0, 64 * KIB, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE)
        await c.close(fh)

    run(fs, body)
    assert on_disk(v, c, "p/disk.img") == MIB
    assert used(v, "p") == MIB
    assert grant_count(v) == 0
    assert_usage_consistent(v)


def test_copy_file_range_is_charged_like_a_write_of_the_same_range(v: Velocity) -> None:
    """The destination gets the room a write would: copies fill the pool to the byte
    (the last one short), then ENOSPC with nothing copied; a copy from the source's
    end copies nothing and leaves the size alone."""
    v.pools.create(None, "p", 3 * MIB)
    fs = filesystem(v)
    c = Client(fs)
    data = os.urandom(MIB + KIB)

    async def body() -> None:
        src = await c.create("p/base.img")
        await c.write(src, 0, data)
        await c.close(src)
        src, dst = await c.open("p/base.img", os.O_RDONLY), await c.create("p/copy.img")
        off = 0
        while True:
            try:
                off += await c.copy(src, 0, dst, off, len(data))
            except pyfuse3.FUSEError as exc:
                assert exc.errno == errno.ENOSPC
                break
        assert off == 3 * MIB - len(data)
        assert await c.copy(src, len(data), dst, 0, MIB) == 0
        whole, rest = divmod(off, len(data))
        assert await c.read(dst, 0, 3 * MIB) == data * whole + data[:rest]
        await c.close(src)
        await c.close(dst)

    run(fs, body)
    assert on_disk(v, c, "p/copy.img") == 3 * MIB - len(data)
    assert used(v, "p") == 3 * MIB
    assert grant_count(v) == 0
    assert_usage_consistent(v)


def test_a_mount_whose_grants_were_reclaimed_registers_again_and_loses_nothing(
    catalog_url: str, store_dir: Path
) -> None:
    """Cut off past its lease, a mount's grants are reclaimed by another host, which
    keeps the bytes on disk. When the catalog answers again the mount registers
    afresh; a file it still has open for writing is settled under the new holder,
    which has no grant row yet (the ledger makes one: it used to answer EIO)."""
    lease_s = 0.5
    v = Velocity(catalog_url, store_dir)
    v.init(lease_s=lease_s)
    other_host = Velocity(catalog_url, store_dir)
    v.pools.create(None, "p", 64 * MIB)
    fs = filesystem(v)
    c = Client(fs)
    first_holder = fs.grants.holder_id
    reclaimed: list[int] = []

    async def body() -> None:
        fh = await c.create("p/disk.img")
        await c.write(fh, 0, b"1" * (2 * MIB))
        await c.fsync(fh)
        await fs.grants.commit()
        await trio.sleep(lease_s * 1.5)  # no renewal: the lease runs out
        reclaimed.append(await trio.to_thread.run_sync(other_host.reclaim_dead_holders))
        await fs.grants.renew_lease()  # finds the holder gone: registers again
        assert fs.grants.holder_id != first_holder
        await c.fsync(fh)  # hold=True for a holder with no grant row
        await c.write(fh, 2 * MIB, b"2" * MIB)
        await c.fsync(fh)
        await c.close(fh)

    try:
        run(fs, body)
        assert reclaimed == [1]
        assert v.media.all()[0].size == 3 * MIB
        assert on_disk(v, c, "p/disk.img") == 3 * MIB
        assert used(v, "p") == 3 * MIB
        assert grant_count(v) == 0
        assert_usage_consistent(v)
    finally:
        other_host.close()
        v.close()


def test_growth_stops_with_eio_once_the_lease_may_have_lapsed(
    catalog_url: str, store_dir: Path
) -> None:
    """Writes into a grant need a lease renewed in time: past it, another host may
    already have the room. Writes within the settled size need no room and go on."""
    lease_s = 1.0
    v = Velocity(catalog_url, store_dir)
    v.init(lease_s=lease_s)
    v.pools.create(None, "p", 64 * MIB)
    fs = filesystem(v)
    c = Client(fs)

    async def body() -> None:
        await fs.grants.renew_lease()  # the trusted share starts here, not at setup
        fh = await c.create("p/disk.img")
        await c.write(fh, 0, b"a" * KIB)
        await c.fsync(fh)
        await trio.sleep(lease_s)
        assert await c.refused(c.write(fh, KIB, b"b")) == errno.EIO
        assert await c.refused(c.fallocate(fh, 0, 2 * KIB)) == errno.EIO
        assert await c.write(fh, 0, b"c" * KIB) == KIB  # within the settled size
        await fs.grants.renew_lease()
        assert await c.write(fh, KIB, b"b") == 1
        await c.close(fh)

    try:
        run(fs, body)
        assert v.media.all()[0].size == KIB + 1
        assert_usage_consistent(v)
    finally:
        v.close()


def test_a_write_that_grew_a_file_after_the_lease_lapsed_is_undone(
    catalog_url: str, store_dir: Path
) -> None:
    """The lease is checked before a write that grows a file, but the process may
    stall after that check (under SIGSTOP, or here waiting for a reservation that
    takes longer than the lease's trusted share): checked again after the write, a
    growth that ended outside it is cut back and answered EIO, so no byte that a
    reclaim may not have measured is ever acknowledged."""
    lease_s = 0.5
    v = Velocity(catalog_url, store_dir)
    v.init(lease_s=lease_s)
    v.pools.create(None, "p", 64 * MIB)

    class StallAfterReserving(Offload):
        async def __call__(self, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
            result = await super().__call__(fn, *args, **kwargs)
            if fn == v.ledger.reserve:
                await trio.sleep(lease_s * 0.9)  # past LEASE_TRUST of it
            return result

    fs = filesystem(v, offload=StallAfterReserving(1))
    c = Client(fs)

    async def body() -> None:
        await fs.grants.renew_lease()  # the trusted share starts here, not at setup
        fh = await c.create("p/disk.img")  # a first grant of 1 MiB
        assert await c.write(fh, 0, b"a" * KIB) == KIB
        await fs.grants.renew_lease()
        assert await c.refused(c.write(fh, KIB, b"b" * (2 * MIB))) == errno.EIO
        assert on_disk(v, c, "p/disk.img") == KIB
        await fs.grants.renew_lease()  # registers again if the lease ran out meanwhile
        assert await c.write(fh, KIB, b"c" * MIB) == MIB  # within the grant it got
        await c.close(fh)

    try:
        run(fs, body)
        with open(c.media("p/disk.img").open_path, "rb") as f:
            assert f.read() == b"a" * KIB + b"c" * MIB
        assert v.media.all()[0].size == KIB + MIB
        assert used(v, "p") == KIB + MIB
        assert grant_count(v) == 0
        assert_usage_consistent(v)
    finally:
        v.close()


def test_every_request_handler_is_inside_the_fault_boundary() -> None:
    handlers = [
        name
        for name, value in vars(pyfuse3.Operations).items()
        if callable(value) and name in vars(VelocityOperations) and name not in ("init",)
    ]
    assert {"read", "write", "fsync", "release", "statfs", "create"} <= set(handlers)
    unguarded = [name for name in handlers if not is_guarded(vars(VelocityOperations)[name])]
    assert not unguarded


def test_a_failure_nobody_expected_is_eio_with_its_traceback_logged(
    v: Velocity, caplog: pytest.LogCaptureFixture
) -> None:
    """A catalog that answers, but wrongly (its pools table gone), is a bug somewhere,
    not a refusal: the request gets EIO, the log one line with the traceback, and
    the mount goes on serving what needs no catalog."""
    v.pools.create(None, "p", MIB)
    fs = filesystem(v)
    c = Client(fs)

    async def body() -> None:
        fh = await c.create("p/disk.img")
        await c.write(fh, 0, b"x" * KIB)
        await c.close(fh)
        await fs.grants.commit()
        with v.db.engine.begin() as conn:
            conn.execute(text("ALTER TABLE pools RENAME TO pools_gone"))
        try:
            assert await c.refused(fs.ops.statfs(CTX)) == errno.EIO
            fh = await c.open("p/disk.img", os.O_RDONLY)
            assert await c.read(fh, 0, KIB) == b"x" * KIB
            await c.close(fh)
        finally:
            with v.db.engine.begin() as conn:
                conn.execute(text("ALTER TABLE pools_gone RENAME TO pools"))

    with caplog.at_level(logging.ERROR, logger="velocityfs.fs"):
        run(fs, body)
    failures = [r for r in caplog.records if r.name == "velocityfs.fs"]
    assert [r.getMessage() for r in failures] == ["statfs failed"]
    assert failures[0].exc_info is not None
