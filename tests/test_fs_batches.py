"""Creates on a SQLite catalog: batched, journaled, on spare files made ahead.

A mount on SQLite answers a create once its statements ran in the open batch
transaction and its line is in the journal; the batch commits within 50 ms or
before any other catalog call. What must hold: a kill -9 before the commit
loses no file; the journal of a dead process is replayed (names taken since
and pools removed since included); a create that fails leaves the rest of its
batch; another process still gets the write lock while the mount creates;
and no spare file is ever left as an orphan.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from support.fs import MIB, file_sizes, sync_dir, used

from velocityfs.catalog.database import BATCH_PAUSE_S
from velocityfs.errors import NotFound
from velocityfs.service.velocity import Velocity

pytestmark = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)


def journal_bytes(store_dir: Path) -> int:
    return sum(p.stat().st_size for p in (store_dir / "media" / ".journal").glob("*"))


def bucket_files(store_dir: Path) -> set[str]:
    """Names of the backing files in the DEFAULT volume's buckets."""
    return {p.name for p in (store_dir / "media").glob("[0-9a-f][0-9a-f]/*")}


def media_ids(v: Velocity) -> set[str]:
    return {m.id for m in v.media.all()}


def create_then_kill9(m, store_dir: Path) -> dict[str, bytes]:
    """Create files until some wait for their batch's commit, then kill -9 the mount."""
    contents: dict[str, bytes] = {}
    for i in range(200):
        name = f"vm-{i:03d}.img"
        contents[name] = os.urandom(1000 + i)
        (m / "tenants" / name).write_bytes(contents[name])
        # Stop as soon as creates are waiting for their commit: the journal has them.
        if i >= 20 and journal_bytes(store_dir):
            break
    assert journal_bytes(store_dir), "every batch had committed: nothing to lose"
    m.kill9()
    return contents


def test_kill9_before_the_batch_commits_loses_no_file(catalog, mount, vcli, store_dir):
    catalog.setup({"tenants": 64})
    contents = create_then_kill9(mount(), store_dir)

    m = mount()
    pool = m / "tenants"
    assert {p.name: p.read_bytes() for p in pool.iterdir()} == contents
    assert used(pool) == file_sizes(pool) == sum(map(len, contents.values()))
    sync_dir(pool)
    assert catalog.used("tenants") == used(pool)
    assert journal_bytes(store_dir) == 0
    m.stop()
    # No backing file without media: spares the dead mount kept were deleted.
    assert bucket_files(store_dir) == media_ids(catalog.v)
    assert vcli("fsck").code == 0


def test_fsck_replays_what_a_killed_mount_left(catalog, mount, vcli, store_dir):
    catalog.setup({"tenants": 64})
    contents = create_then_kill9(mount(), store_dir)
    assert spare_files(store_dir)
    res = vcli("fsck", check=False)
    assert res.code == 1
    kinds = {line.split()[1] for line in res.stdout.splitlines()[:-1]}
    assert {"unreplayed-journal:", "orphan-spares:"} <= kinds, res.stdout

    assert vcli("fsck", "--repair", check=False).code == 0
    assert vcli("fsck").stdout == "0 repaired, 0 remaining\n"
    assert {m.name: m.size for m in catalog.v.media.all()} == {
        name: len(data) for name, data in contents.items()
    }
    assert catalog.used("tenants") == sum(map(len, contents.values()))
    assert spare_files(store_dir) == []
    assert bucket_files(store_dir) == media_ids(catalog.v)


def spare_files(store_dir: Path) -> list[Path]:
    return list((store_dir / "media" / ".spare").glob("*/*/*"))


def test_a_clean_stop_leaves_no_journal_and_no_spares(catalog, mount, store_dir):
    catalog.setup({"tenants": 64})
    m = mount()
    for i in range(100):
        (m / "tenants" / f"{i}.img").write_bytes(b"a" * 4096)
    assert spare_files(store_dir), "no spare files were made"
    m.stop()
    assert bucket_files(store_dir) == media_ids(catalog.v)
    assert spare_files(store_dir) == []
    assert list((store_dir / "media" / ".journal").iterdir()) == []


DYING_WRITER = """
import os, sys
from velocityfs.service.velocity import Velocity
v = Velocity(sys.argv[1], sys.argv[2])
holder = v.ledger.register_holder()
v.media.start_creates(holder)
pools = {p.name: p.id for p in v.pools.all()}
for pool, name, data in [("a", "kept.img", b"k" * 3000), ("a", "taken.img", b"t" * 10),
                         ("gone", "lost.img", b"l" * 10), ("a", "big.img", b"b" * 5000)]:
    view, granted = v.media.create_open(pools[pool], name, holder_id=holder, grant_chunk=4096)
    with open(view.backing_path, "wb") as f:
        f.write(data)
print(holder, flush=True)
os._exit(0)
"""


def test_the_journal_of_a_dead_writer_is_replayed(catalog, catalog_url, store_dir):
    catalog.setup({"a": 64, "gone": 64})
    writer = subprocess.run(
        [sys.executable, "-c", DYING_WRITER, catalog_url, str(store_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    holder = writer.stdout.strip()
    v = catalog.v
    # Nothing of the batch reached the catalog; the journal has all four.
    assert v.media.all() == []
    assert journal_bytes(store_dir) > 0
    # Meanwhile someone else took one of the names and removed a pool.
    other = v.media.create(v.pool_by_ref("a").id, "taken.img", size=7)
    v.pools.remove(v.pool_by_ref("gone").id, recursive=True)

    v.reclaim_dead_holders()

    by_name = {m.name: m for m in v.media.in_pool(v.pool_by_ref("a").id)}
    recovered = [n for n in by_name if n.startswith("taken.img.recovered-")]
    assert sorted(by_name) == sorted(["kept.img", "taken.img", "big.img", *recovered])
    assert len(recovered) == 1
    assert by_name["kept.img"].size == 3000
    assert by_name["taken.img"].id == other.id
    assert by_name[recovered[0]].size == 10
    # Never more than the grant it had: 4096 of the 5000 bytes written.
    assert by_name["big.img"].size == 4096
    assert os.path.getsize(by_name["big.img"].backing_path) == 4096
    assert v.pool_by_ref("a").used_bytes == 3000 + 7 + 10 + 4096
    assert bucket_files(store_dir) == media_ids(v)
    assert not (store_dir / "media" / ".journal" / holder).exists()
    assert not (store_dir / "media" / ".spare" / holder).exists()
    with pytest.raises(NotFound):
        v.pool_by_ref("gone")


def test_a_failed_create_leaves_the_rest_of_its_batch(catalog, store_dir):
    v = catalog.v
    catalog.setup({"a": 1 << 42})  # 4 EiB: room for any file the disk can hold
    holder = v.ledger.register_holder()
    v.media.start_creates(holder)
    pool = v.pool_by_ref("a").id
    try:
        first, granted = v.media.create_open(pool, "disk.img", holder_id=holder, grant_chunk=MIB)
        assert v.media.batch_pending
        # Charged and inserted, then the backing file cannot be that large (ext4 stops
        # at 16 TiB): the create fails after its statements ran in the batch.
        with pytest.raises(OSError):
            v.media.create_open(pool, "huge.img", size=1 << 61, holder_id=holder)
        assert v.media.batch_pending
        v.media.commit_batch()
    finally:
        v.media.end_creates()
    assert [m.name for m in v.media.in_pool(pool)] == ["disk.img"]
    assert v.pool_by_ref("a").used_bytes == granted
    assert bucket_files(store_dir) == {first.id}


def test_another_process_writes_while_the_mount_creates(catalog, mount, vcli):
    catalog.setup({"tenants": 256})
    m = mount()
    stop = threading.Event()
    made: list[int] = []

    def creates() -> None:
        i = 0
        while not stop.is_set():
            (m / "tenants" / f"f{i:05d}").write_bytes(b"x" * 100)
            i += 1
        made.append(i)

    creator = threading.Thread(target=creates, daemon=True)
    creator.start()
    try:
        time.sleep(0.5)
        started = time.monotonic()
        vcli("pool", "create", "isos", "--quota-mib", "8")
        waited = time.monotonic() - started
    finally:
        stop.set()
        creator.join(30)
    assert made and made[0] > 0
    # A bound for liveness, not a speed goal: with the pause after each batch it
    # waited 0.03-1.05 s here, without it 1.5-2.5 s (see Database.may_batch).
    assert waited < 10, f"the CLI waited {waited:.1f} s for the write lock"
    assert catalog.exists("isos")
    assert len(list((m / "tenants").iterdir())) == made[0]


def test_a_unit_of_the_batch_cannot_start_another(catalog):
    """It would wait for the lock its own batch holds: an error, never a deadlock."""
    catalog.setup({"a": 64})
    db = catalog.v.db
    with db.batched(), pytest.raises(RuntimeError), db.statements():
        pass
    assert db.batch_open
    db.commit_batch()
    assert not db.batch_open


def test_a_writer_that_registers_again_moves_its_creates_to_the_new_holder(catalog, store_dir):
    """A mount whose lease was reclaimed while it was cut off registers anew: its old
    journal and spares must not be left for reclaim to replay or delete under it."""
    v = catalog.v
    catalog.setup({"a": 64})
    pool = v.pool_by_ref("a").id
    old = v.register_writer()
    try:
        v.media.create_open(pool, "before.img", holder_id=old)
        new = v.register_writer()
        assert not (store_dir / "media" / ".journal" / old).exists()
        assert not (store_dir / "media" / ".spare" / old).exists()
        # Registering committed the old holder's batch; the next opens after the pause.
        time.sleep(BATCH_PAUSE_S)
        v.media.create_open(pool, "after.img", holder_id=new)
        assert v.media.batch_pending
        assert journal_bytes(store_dir) > 0
        v.media.commit_batch()
        assert journal_bytes(store_dir) == 0
    finally:
        v.media.end_creates()
    assert sorted(m.name for m in v.media.in_pool(pool)) == ["after.img", "before.img"]
