"""Closes and unlinks reach the catalog in batches (fs.grants), and nothing can tell.

They only give room back, so the mount answers them from memory and commits
them together a moment later. What must still hold: the catalog catches up on
its own within the batch window; fsync on a pool commits at once; a name or a
pool freed by unlinks can be used again at once; and a pool still fills to the
byte right after closes whose grants are not yet returned.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest
import trio
from support.bulk import BEYOND_ONE_STATEMENT, insert_media
from support.fs import MIB, Catalog, sync_dir, used
from support.inprocess import filesystem

CATCH_UP_S = 2.0  # far above the batch window (50 ms), for a loaded CI machine


def media_sizes(catalog: Catalog, ref: str) -> dict[str, int]:
    pool = catalog.v.pool_by_ref(ref)
    return {m.name: m.size for m in catalog.v.media.in_pool(pool.id)}


def eventually(check, what: str) -> float:  # type: ignore[no-untyped-def]
    """Seconds until ``check()`` holds; fails after CATCH_UP_S."""
    started = time.monotonic()
    while not check():
        if time.monotonic() - started > CATCH_UP_S:
            pytest.fail(f"the catalog did not catch up with {what} in {CATCH_UP_S} s")
        time.sleep(0.005)
    return time.monotonic() - started


def test_the_catalog_catches_up_without_any_sync(catalog, mount):
    catalog.setup({"tenants": 64})
    m = mount()
    pool = m / "tenants"
    sizes = {f"f{i}.img": 4096 * (i + 1) for i in range(20)}
    for name, size in sizes.items():
        (pool / name).write_bytes(b"x" * size)
    waited = eventually(lambda: media_sizes(catalog, "tenants") == sizes, "20 closes")
    eventually(lambda: catalog.used("tenants") == sum(sizes.values()), "returned grants")
    print(f"closes in the catalog after {waited * 1000:.0f} ms")

    for name in list(sizes)[:10]:
        os.unlink(pool / name)
        del sizes[name]
    eventually(lambda: media_sizes(catalog, "tenants") == sizes, "10 unlinks")
    eventually(lambda: catalog.used("tenants") == sum(sizes.values()), "freed room")
    assert not any((catalog.v.backing.top / "media").glob("*/*.moving"))


def test_fsync_on_a_pool_commits_at_once(catalog, mount):
    catalog.setup({"tenants": 64})
    m = mount()
    pool = m / "tenants"
    (pool / "a.img").write_bytes(b"a" * (3 * MIB + 1))
    backing = os.getxattr(pool / "a.img", "user.velocity.backing_path").decode()
    sync_dir(pool)
    assert media_sizes(catalog, "tenants") == {"a.img": 3 * MIB + 1}
    assert catalog.used("tenants") == 3 * MIB + 1

    os.unlink(pool / "a.img")
    sync_dir(pool)
    assert media_sizes(catalog, "tenants") == {}
    assert catalog.used("tenants") == 0
    assert not os.path.exists(backing)


def test_names_and_pools_freed_by_unlinks_are_usable_at_once(catalog, mount):
    catalog.setup({"tenants": 64})
    m = mount()
    pool = m / "tenants"
    sub = pool / "vm"
    sub.mkdir()
    for i in range(5):
        (sub / f"disk{i}.img").write_bytes(b"d" * MIB)
    (pool / "same.img").write_bytes(b"old")

    # rm -rf: the subpool is empty in the catalog by the time rmdir asks.
    for i in range(5):
        os.unlink(sub / f"disk{i}.img")
    os.rmdir(sub)
    assert not catalog.exists("tenants/vm")

    # The name of an unlinked media is free at once, for a file and for a pool.
    os.unlink(pool / "same.img")
    (pool / "same.img").write_bytes(b"new")
    os.unlink(pool / "same.img")
    (pool / "same.img").mkdir()
    assert catalog.exists("tenants/same.img")
    os.rmdir(pool / "same.img")
    (pool / "same.img").write_bytes(b"newest")
    sync_dir(pool)
    assert media_sizes(catalog, "tenants") == {"same.img": 6}
    assert catalog.used("tenants") == 6


def test_a_pool_fills_to_the_byte_right_after_closes(catalog, mount):
    """Grants of files just closed still count until their batch; a write that needs
    that room commits the batch and gets it."""
    quota = 16 * MIB
    catalog.setup({"tenants": 16})
    m = mount()
    pool: Path = m / "tenants"
    written = 0
    for i in range(8):  # each close leaves a grant behind until the batch
        with open(pool / f"small{i}.img", "wb") as f:
            written += f.write(b"s" * (MIB // 2 + i))
    fd = os.open(pool / "big.img", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        buf = b"b" * MIB
        while True:
            try:
                n = os.write(fd, buf)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
            written += n
            if n < len(buf):
                with pytest.raises(OSError) as exc:
                    os.write(fd, buf)
                assert exc.value.errno == errno.ENOSPC
                break
    finally:
        os.close(fd)
    assert written == quota
    assert used(pool) == quota
    assert catalog.used("tenants") == quota


def test_a_file_reopened_before_its_batch_keeps_its_grant(catalog, mount):
    """Appending with a close after every block (a log, a download) reopens the file
    while its close still waits: the close is dropped, the grant stays the mount's,
    and the pool still fills to the byte."""
    quota = MIB
    catalog.setup({"tenants": 1})
    m = mount()
    log = m / "tenants" / "append.log"
    block = b"l" * 4096
    for _ in range(quota // len(block)):
        with open(log, "ab") as f:
            f.write(block)
    with pytest.raises(OSError) as exc, open(log, "ab") as f:
        f.write(block)
    assert exc.value.errno == errno.ENOSPC
    assert log.stat().st_size == quota
    assert used(m / "tenants") == quota
    sync_dir(m / "tenants")
    assert media_sizes(catalog, "tenants") == {"append.log": quota}
    assert catalog.used("tenants") == quota


def test_a_backlog_beyond_one_statement_still_commits(catalog):
    """After a long catalog outage during an rm -rf, more unlinks wait than one statement
    may bind (PostgreSQL: 65,535 parameters; SQLite: 32,766 as built upstream, 250,000
    by Debian): they commit in several transactions, not never. Driven in-process:
    70,000 unlinks through a kernel would take minutes."""
    catalog.setup({"tenants": 64})
    pool = catalog.pool("tenants")["pid"]
    v = catalog.v
    insert_media(v, pool)
    fs = filesystem(v, writer=False)

    async def rm_rf() -> None:
        for node in list(fs.inodes.by_media.values()):
            fs.grants.unlinked(node)
            fs.inodes.detach(node)
        await fs.grants.commit()

    trio.run(rm_rf)
    assert v.pools.media_count(pool) == 0
    assert catalog.used("tenants") == 0


def test_a_mount_catches_up_on_more_changes_than_one_statement_may_bind(catalog):
    """A mount reads other hosts' changes since its last successful look. After an
    outage that can be more media than one statement may bind: the change feed must
    read them all, with their attributes, rather than fail on every retry and leave
    the mount behind for good."""
    catalog.setup({"tenants": 64})
    pool = catalog.pool("tenants")["pid"]
    v = catalog.v
    last_look = time.time_ns()
    ids = insert_media(v, pool)
    tagged = ids[-1]
    v.xattrs.set(tagged, "user.origin", b"host-b")
    changes = v.changes.since(last_look)
    assert len(changes.media) == BEYOND_ONE_STATEMENT
    assert {m.id: m.xattrs for m in changes.media}[tagged] == {"user.origin": b"host-b"}
