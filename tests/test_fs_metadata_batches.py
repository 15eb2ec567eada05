"""Renames, attribute changes and subpools on a SQLite catalog: batched like creates.

A mount on SQLite answers rename(2), chmod(2), chown(2), utimes(2) and mkdir(2)
once their statements ran in its open batch transaction and their line is in
its journal; the batch commits within 50 ms. What must hold: a kill -9 before
the commit loses none of them (the next start replays the journal in order);
a rename across pools still moves its charge at once; and an rsync of small
files costs far less than a transaction per file. On PostgreSQL each of them
stays a transaction of its own.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from support.fs import file_sizes, sync_dir, used

SET_MTIME_NS = 1_500_000_000_123_456_789


def journal_ops(store_dir: Path) -> set[str]:
    """The kinds of change waiting in the journals (a create has no ``op``)."""
    ops = set()
    for path in (store_dir / "media" / ".journal").glob("*"):
        for line in path.read_bytes().splitlines():
            ops.add(json.loads(line).get("op", "create"))
    return ops


def counts(m) -> dict[str, int]:
    """The mount's counters now (``kill -USR1``: requests and transactions)."""
    seen = len(_counts_lines(m.log))
    os.kill(m.pid, signal.SIGUSR1)
    deadline = time.monotonic() + 10
    while len(_counts_lines(m.log)) == seen:
        assert time.monotonic() < deadline, "no counts line"
        time.sleep(0.02)
    return _counts_lines(m.log)[-1]


def _counts_lines(log: str) -> list[dict[str, int]]:
    return [
        {key: int(value) for key, value in (pair.split("=") for pair in line.split()[2:])}
        for line in log.splitlines()
        if line.startswith("velocityfs: counts ")
    ]


def change_round(pool: Path, i: int) -> None:
    """One round of what rsync does: a subpool, a file in it under a temporary name,
    its mode and times, the rename over its final name; and a move across pools."""
    sub = pool / f"dir-{i}"
    sub.mkdir()
    os.chmod(sub, 0o750)
    temp = sub / f".file-{i}.XXXXXX"
    temp.write_bytes(b"r" * (1000 + i))
    os.chmod(temp, 0o600)
    os.utime(temp, ns=(SET_MTIME_NS, SET_MTIME_NS))
    temp.rename(sub / f"file-{i}")
    (pool / f"old-{i}.img").rename(sub / f"moved-{i}.img")


@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
def test_kill9_before_the_batch_commits_loses_no_rename_mode_time_or_subpool(
    catalog, mount, vcli, store_dir
):
    catalog.setup({"tenants": 64})
    m = mount()
    pool = m / "tenants"
    for i in range(50):
        (pool / f"old-{i}.img").write_bytes(b"o" * (2000 + i))
    sync_dir(pool)
    rounds = 0
    while rounds < 50:
        change_round(pool, rounds)
        rounds += 1
        if {"rename", "attrs", "pool"} <= journal_ops(store_dir):
            break
    assert {"rename", "attrs", "pool"} <= journal_ops(store_dir), "every batch had committed"
    m.kill9()

    m = mount()
    pool = m / "tenants"
    for i in range(rounds):
        sub = pool / f"dir-{i}"
        assert os.stat(sub).st_mode & 0o7777 == 0o750
        assert sorted(p.name for p in sub.iterdir()) == [f"file-{i}", f"moved-{i}.img"]
        moved = sub / f"file-{i}"
        assert moved.read_bytes() == b"r" * (1000 + i)
        st = os.stat(moved)
        assert st.st_mode & 0o7777 == 0o600
        assert st.st_mtime_ns == SET_MTIME_NS
        assert (sub / f"moved-{i}.img").read_bytes() == b"o" * (2000 + i)
        assert not (pool / f"old-{i}.img").exists()
    assert used(pool) == file_sizes(pool)
    sync_dir(pool)
    assert catalog.used("tenants") == used(pool)
    assert catalog.used("tenants/dir-0") == 1000 + 2000
    m.stop()
    assert vcli("fsck").code == 0


@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
def test_a_rename_that_replaced_a_file_is_replayed_with_its_replacement(
    catalog, mount, vcli, store_dir
):
    catalog.setup({"tenants": 64})
    m = mount()
    pool = m / "tenants"
    for i in range(50):
        (pool / f"final-{i}").write_bytes(b"old" * 100)
    sync_dir(pool)
    rounds = 0
    while rounds < 50:
        (pool / f".final-{rounds}.tmp").write_bytes(b"new" * 10)
        (pool / f".final-{rounds}.tmp").rename(pool / f"final-{rounds}")
        rounds += 1
        if "rename" in journal_ops(store_dir):
            break
    assert "rename" in journal_ops(store_dir), "every batch had committed"
    m.kill9()

    m = mount()
    pool = m / "tenants"
    for i in range(50):
        expected = b"new" * 10 if i < rounds else b"old" * 100
        assert (pool / f"final-{i}").read_bytes() == expected
    assert sorted(p.name for p in pool.iterdir()) == sorted(f"final-{i}" for i in range(50))
    sync_dir(pool)
    assert catalog.used("tenants") == used(pool) == file_sizes(pool)
    m.stop()
    assert vcli("fsck").code == 0


@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
def test_a_move_across_pools_is_charged_at_once(catalog, mount):
    catalog.setup({"tenants": 64})
    catalog.v.pools.create(catalog.v.pool_by_ref("tenants").id, "small", 1 << 20)
    m = mount()
    pool = m / "tenants"
    (pool / "big.img").write_bytes(b"b" * (2 << 20))
    (pool / "tiny.img").write_bytes(b"t" * 1000)
    sync_dir(pool)
    with pytest.raises(OSError) as refused:
        (pool / "big.img").rename(pool / "small" / "big.img")
    assert refused.value.errno == 28  # ENOSPC: the 1 MiB pool has no room for it
    (pool / "tiny.img").rename(pool / "small" / "tiny.img")
    assert used(pool / "small") == 1000
    assert int(os.getxattr(pool / "small", "user.velocity.avail_bytes")) == (1 << 20) - 1000
    m.stop()


RSYNC_FILES = 60
# Catalog transactions per rsync'd small file at most: on SQLite its create, close,
# modes, times and rename go in batches (a batch commits every 50 ms, and a change in
# the 5 ms after a commit is a transaction of its own: measured 0.8-1.1 a file on a
# loaded machine, 6 before); on PostgreSQL each is a transaction.
MAX_TXN_PER_FILE = {"sqlite": 2.0, "postgresql": 7.0}


@pytest.mark.parametrize("catalog_url", ["sqlite", "postgresql"], indirect=True)
def test_rsync_costs_few_transactions_per_file(catalog, catalog_url, mount, tmp_path):
    catalog.setup({"tenants": 64})
    source = tmp_path / "source"
    for i in range(RSYNC_FILES):
        folder = source / f"d{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i:03d}.bin").write_bytes(os.urandom(4096))
    m = mount()
    pool = m / "tenants"
    before = counts(m)
    subprocess.run(["rsync", "-a", f"{source}/", f"{pool}/copy/"], check=True)
    sync_dir(pool)
    after = counts(m)
    per_file = {k: (after.get(k, 0) - before.get(k, 0)) / RSYNC_FILES for k in after}
    print("per rsync'd file:", {k: round(v, 2) for k, v in sorted(per_file.items()) if v})
    backend = "sqlite" if catalog_url.startswith("sqlite") else "postgresql"
    assert per_file["transactions"] <= MAX_TXN_PER_FILE[backend], per_file
    m.stop()
    m = mount()
    copied = m / "tenants" / "copy"
    for path in source.rglob("*.bin"):
        target = copied / path.relative_to(source)
        assert target.read_bytes() == path.read_bytes()
        assert os.stat(target).st_mtime == path.stat().st_mtime
    m.stop()


@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
def test_a_missing_name_is_looked_up_once_per_entry_timeout(catalog, mount):
    catalog.setup({"tenants": 64})
    m = mount("--attr-timeout", "30")  # names made elsewhere: test_api_mount
    pool = m / "tenants"
    assert pool.is_dir()  # looked up before the count
    before = counts(m)
    for _ in range(3):
        assert not (pool / "final.img").exists()
    (pool / ".final.img.tmp").write_bytes(b"x")
    (pool / ".final.img.tmp").rename(pool / "final.img")
    assert (pool / "final.img").read_bytes() == b"x"
    after = counts(m)
    # The missing name's three stats cost one lookup, the rename onto it none: three in
    # all with the temporary name's before its create (five without negative entries).
    assert after["lookup"] - before.get("lookup", 0) <= 3
    m.stop()
