"""Names in the mount: renames of media and subpools (with their quota effects),
mkdir/rmdir rules, refused node kinds, unlink, and a 20,000-entry pool.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path

import pytest
from support.fs import MIB, run, sha256, sync_dir, used, vattr

from velocityfs.service.media import MediaService

SQLITE_ONLY = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)


def _write(path: Path, size: int) -> str:
    """Write ``size`` random bytes through the mount; return their sha256."""
    path.write_bytes(os.urandom(size))
    return sha256(path)


def _errno_of(fn, *args) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


# -- renames of media ----------------------------------------------------------------------


@SQLITE_ONLY
def test_rename_within_pool_and_replace_releases_size(catalog, mount):
    catalog.setup({"tenants": 64})
    m = mount()
    pool = m / "tenants"
    a_sum = _write(pool / "a.img", 3 * MIB)
    _write(pool / "b.img", 5 * MIB)
    assert used(pool) == 8 * MIB
    a_backing = vattr(pool / "a.img", "backing_path")
    a_mid = vattr(pool / "a.img", "mid")
    b_backing = vattr(pool / "b.img", "backing_path")
    assert os.path.exists(b_backing)

    run("mv", pool / "a.img", pool / "renamed a.img")  # a plain rename: nothing moves
    assert sorted(os.listdir(pool)) == ["b.img", "renamed a.img"]
    assert used(pool) == 8 * MIB
    assert vattr(pool / "renamed a.img", "backing_path") == a_backing

    os.rename(pool / "renamed a.img", pool / "b.img")  # replaces b: its 5 MiB are released
    assert os.listdir(pool) == ["b.img"]
    assert os.stat(pool / "b.img").st_size == 3 * MIB
    assert sha256(pool / "b.img") == a_sum
    assert vattr(pool / "b.img", "mid") == a_mid
    assert vattr(pool / "b.img", "backing_path") == a_backing
    assert not os.path.exists(b_backing)
    assert used(pool) == 3 * MIB
    assert catalog.pool("tenants")["used_bytes"] == 3 * MIB
    assert catalog.pool("tenants")["media"] == 1


def test_rename_across_pools_moves_the_charge(catalog, mount):
    catalog.setup({"tenants": 64, "isos": 32})
    m = mount()
    tenants, isos = m / "tenants", m / "isos"
    (tenants / "src").mkdir()
    (tenants / "dst").mkdir()
    run("setfattr", "-n", "user.velocity.quota_mib", "-v", "16", tenants / "dst")
    digest = _write(tenants / "src" / "disk.img", 10 * MIB)
    backing = vattr(tenants / "src" / "disk.img", "backing_path")
    mid = vattr(tenants / "src" / "disk.img", "mid")

    os.rename(tenants / "src" / "disk.img", tenants / "dst" / "disk.img")
    assert os.listdir(tenants / "src") == []
    assert used(tenants / "src") == 0
    assert used(tenants / "dst") == 10 * MIB
    assert used(tenants) == 10 * MIB
    moved = tenants / "dst" / "disk.img"
    assert vattr(moved, "backing_path") == backing  # catalog-only: same backing file
    assert vattr(moved, "mid") == mid
    assert sha256(moved) == digest
    assert sha256(backing) == digest

    # Between root pools, with mv (rename(2) on one filesystem).
    run("mv", moved, isos / "disk.img")
    assert used(tenants) == 0
    assert used(tenants / "dst") == 0
    assert used(isos) == 10 * MIB
    assert vattr(isos / "disk.img", "backing_path") == backing
    assert sha256(isos / "disk.img") == digest
    assert catalog.pool("tenants")["used_bytes"] == 0
    assert catalog.pool("tenants/dst")["used_bytes"] == 0
    assert catalog.pool("isos")["used_bytes"] == 10 * MIB

    # 25 MiB do not fit beside the 10 in isos (32), but do in place of them.
    new = _write(tenants / "new.img", 25 * MIB)
    assert _errno_of(os.rename, tenants / "new.img", isos / "new.img") == errno.ENOSPC
    os.rename(tenants / "new.img", isos / "disk.img")
    assert os.listdir(isos) == ["disk.img"]
    assert sha256(isos / "disk.img") == new
    assert not os.path.exists(backing)
    assert used(isos) == 25 * MIB
    assert used(tenants) == 0
    assert catalog.pool("isos")["used_bytes"] == 25 * MIB


def test_rename_across_pools_enospc_changes_nothing(catalog, mount):
    """The target chain cannot fit the media: ENOSPC, both names, sizes and usages intact."""
    catalog.setup({"tenants": 64, "isos": 8})
    m = mount()
    tenants, isos = m / "tenants", m / "isos"
    (tenants / "full").mkdir()
    (isos / "child").mkdir()  # inherits isos's 8 MiB
    big = _write(tenants / "big.img", 10 * MIB)
    small = _write(isos / "child" / "small.img", 2 * MIB)
    before = {p: used(p) for p in (tenants, isos, isos / "child")}

    def unchanged() -> None:
        assert os.stat(tenants / "big.img").st_size == 10 * MIB
        assert sha256(tenants / "big.img") == big
        assert os.stat(isos / "child" / "small.img").st_size == 2 * MIB
        assert sha256(isos / "child" / "small.img") == small
        assert not (isos / "child" / "big.img").exists()
        assert {p: used(p) for p in before} == before
        assert catalog.pool("tenants")["used_bytes"] == 10 * MIB
        assert catalog.pool("isos")["used_bytes"] == 2 * MIB

    # Into a child whose own chain (the root pool) cannot hold it.
    code = _errno_of(os.rename, tenants / "big.img", isos / "child" / "big.img")
    assert code == errno.ENOSPC
    unchanged()
    # Replacing a smaller media does not help when the rest still does not fit.
    code = _errno_of(os.rename, tenants / "big.img", isos / "child" / "small.img")
    assert code == errno.ENOSPC
    unchanged()

    # A child whose explicit quota is below the size, under a parent with room.
    run("setfattr", "-n", "user.velocity.quota_mib", "-v", "4", tenants / "full")
    (isos / "child" / "small.img").rename(tenants / "small.img")
    code = _errno_of(os.rename, tenants / "big.img", tenants / "full" / "big.img")
    assert code == errno.ENOSPC
    assert os.stat(tenants / "big.img").st_size == 10 * MIB
    assert used(tenants / "full") == 0
    assert used(tenants) == 12 * MIB
    assert used(isos) == 0


def test_rename_open_file_with_grant_across_pools(catalog, mount):
    """A media being written moves with its grant; settling charges the new pool."""
    catalog.setup({"tenants": 64})
    m = mount()
    pool = m / "tenants"
    (pool / "a").mkdir()
    (pool / "b").mkdir()
    first, second = os.urandom(2 * MIB), os.urandom(3 * MIB + 5)
    fd = os.open(pool / "a" / "disk.img", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, first) == len(first)
        os.rename(pool / "a" / "disk.img", pool / "b" / "disk.img")
        assert used(pool / "a") == 0
        assert used(pool / "b") >= len(first)
        assert used(pool) == used(pool / "b")
        assert os.write(fd, second) == len(second)
    finally:
        os.close(fd)
    assert (pool / "b" / "disk.img").read_bytes() == first + second
    size = len(first) + len(second)
    assert used(pool / "a") == 0
    assert used(pool / "b") == size
    assert used(pool) == size
    assert catalog.pool("tenants")["used_bytes"] == size
    assert catalog.pool("tenants/a")["used_bytes"] == 0


# -- renames of subpools ---------------------------------------------------------------------


def test_rename_subpool(catalog, mount):
    catalog.setup({"tenants": 64, "isos": 16})
    m = mount()
    t = m / "tenants"
    (t / "x" / "vm").mkdir(parents=True)
    (t / "y").mkdir()
    digest = _write(t / "x" / "vm" / "disk.img", 6 * MIB)
    pid = vattr(t / "x" / "vm", "pid")

    os.rename(t / "x" / "vm", t / "x" / "vm-renamed")  # same parent
    assert vattr(t / "x" / "vm-renamed", "pid") == pid
    assert used(t / "x") == 6 * MIB
    assert catalog.pool("tenants/x/vm-renamed")["pid"] == pid

    os.rename(t / "x" / "vm-renamed", t / "y" / "vm")  # another parent: usage moves
    assert os.listdir(t / "x") == []
    assert used(t / "x") == 0
    assert used(t / "y") == 6 * MIB
    assert used(t) == 6 * MIB
    assert sha256(t / "y" / "vm" / "disk.img") == digest
    assert catalog.pool("tenants/y/vm")["pid"] == pid
    assert catalog.pool("tenants/y")["used_bytes"] == 6 * MIB

    # Onto an empty pool: it is replaced. Onto a non-empty one: ENOTEMPTY.
    (t / "empty").mkdir()
    os.rename(t / "y" / "vm", t / "empty")
    assert vattr(t / "empty", "pid") == pid
    (t / "busy").mkdir()
    (t / "busy" / "f").write_bytes(b"x")
    assert _errno_of(os.rename, t / "empty", t / "busy") == errno.ENOTEMPTY

    # Into a chain without room (isos: 16 MiB, 12 used): ENOSPC, nothing changes.
    _write(m / "isos" / "fill.iso", 12 * MIB)
    assert _errno_of(os.rename, t / "empty", m / "isos" / "vm") == errno.ENOSPC
    assert vattr(t / "empty", "pid") == pid
    assert not (m / "isos" / "vm").exists()
    assert used(t) == 6 * MIB + 1
    assert used(m / "isos") == 12 * MIB

    # A subpool whose quota is above the new chain's: EINVAL (the API's 406).
    os.remove(t / "empty" / "disk.img")
    run("setfattr", "-n", "user.velocity.quota_mib", "-v", "32", t / "empty")
    assert _errno_of(os.rename, t / "empty", m / "isos" / "vm") == errno.EINVAL
    assert vattr(t / "empty", "pid") == pid

    # Root pools are the administrator's: they cannot be renamed from the mount.
    assert _errno_of(os.rename, m / "isos", m / "isos2") == errno.EPERM
    assert _errno_of(os.rename, t / "busy", m / "busy") == errno.EPERM
    assert sorted(os.listdir(m)) == ["isos", "tenants"]


# -- mkdir, rmdir, refused kinds, unlink ------------------------------------------------------


@SQLITE_ONLY
def test_mkdir_rmdir_rules(catalog, mount):
    catalog.setup({"tenants": 64})
    m = mount()
    t = m / "tenants"
    assert _errno_of(os.mkdir, m / "newroot") == errno.EPERM
    assert os.listdir(m) == ["tenants"]
    assert _errno_of(os.mkdir, t) == errno.EEXIST

    (t / "sub" / "deeper").mkdir(parents=True)
    (t / "files").mkdir()
    (t / "files" / "f.img").write_bytes(b"data")
    assert _errno_of(os.rmdir, t / "sub") == errno.ENOTEMPTY
    assert _errno_of(os.rmdir, t / "files") == errno.ENOTEMPTY
    assert _errno_of(os.rmdir, t / "files" / "f.img") == errno.ENOTDIR
    assert _errno_of(os.rmdir, t / "missing") == errno.ENOENT
    assert _errno_of(os.rmdir, m / "tenants") == errno.EPERM
    assert sorted(os.listdir(t)) == ["files", "sub"]

    os.rmdir(t / "sub" / "deeper")
    os.rmdir(t / "sub")
    assert sorted(os.listdir(t)) == ["files"]
    assert not catalog.exists("tenants/sub")
    assert not catalog.exists("tenants/sub/deeper")
    sync_dir(t)
    assert catalog.pool("tenants")["used_bytes"] == 4


@SQLITE_ONLY
def test_links_symlinks_and_device_nodes_are_refused(catalog, mount):
    catalog.setup({"tenants": 64})
    m = mount()
    t = m / "tenants"
    (t / "f.img").write_bytes(b"data")
    assert _errno_of(os.link, t / "f.img", t / "hard") == errno.EPERM
    assert _errno_of(os.symlink, "f.img", t / "soft") == errno.EPERM
    assert _errno_of(os.mkfifo, t / "fifo") == errno.EPERM
    assert _errno_of(os.mknod, t / "null", 0o600 | 0o020000, os.makedev(1, 3)) == errno.EPERM
    res = subprocess.run(
        ["ln", "-s", "f.img", str(t / "soft")], capture_output=True, text=True, check=False
    )
    assert res.returncode != 0 and "Operation not permitted" in res.stderr
    # Files at the mount root are refused too: only pools live there.
    assert _errno_of(os.open, m / "stray", os.O_WRONLY | os.O_CREAT) == errno.EPERM
    assert os.listdir(t) == ["f.img"]
    assert sorted(os.listdir(m)) == ["tenants"]
    assert used(t) == 4


def test_unlink_releases_room_and_backing_file(catalog, mount):
    catalog.setup({"tenants": 16})
    m = mount()
    t = m / "tenants"
    _write(t / "a.img", 5 * MIB)
    _write(t / "b.img", 7 * MIB)
    backing = vattr(t / "a.img", "backing_path")
    assert used(t) == 12 * MIB
    os.unlink(t / "a.img")
    assert not (t / "a.img").exists()
    sync_dir(t)  # the unlink reaches the catalog in a batch; fsync on the pool commits it
    assert not os.path.exists(backing)
    assert used(t) == 7 * MIB
    assert _errno_of(os.unlink, t / "a.img") == errno.ENOENT

    # A media unlinked while open for writing stays charged (size and grant) until its
    # last close, as the kernel keeps an unlinked open file (tests/test_fs_unlinked.py).
    fd = os.open(t / "b.img", os.O_WRONLY)
    try:
        os.write(fd, b"x" * MIB)
        os.unlink(t / "b.img")
        assert os.listdir(t) == []
        assert used(t) >= 7 * MIB
    finally:
        os.close(fd)
    assert os.listdir(t) == []
    assert used(t) == 0
    assert catalog.pool("tenants")["used_bytes"] == 0
    _write(t / "c.img", 16 * MIB)  # all the room is back
    assert used(t) == 16 * MIB


@SQLITE_ONLY
def test_names(catalog, mount):
    """Any name the kernel allows, as UTF-8 of at most 255 bytes, for media and pools."""
    catalog.setup({"tenants": 64})
    m = mount()
    t = m / "tenants"
    longest = "é" * 127 + "x"  # 255 bytes
    names = [longest, "with space", " lead and trail ", "日本語.iso", "-dash", ".hidden", "a\nb"]
    for name in names:
        (t / name).write_bytes(name.encode())
    (t / ("d" * 255)).mkdir()
    assert sorted(os.listdir(t)) == sorted([*names, "d" * 255])
    for name in names:
        assert (t / name).read_bytes() == name.encode()
    assert _errno_of(os.open, t / (longest + "y"), os.O_WRONLY | os.O_CREAT) == (errno.ENAMETOOLONG)
    assert _errno_of(os.mkdir, t / ("d" * 256)) == errno.ENAMETOOLONG
    assert _errno_of(os.rename, t / "with space", t / ("r" * 256)) == errno.ENAMETOOLONG
    # Bytes that are not UTF-8 cannot be a catalog name.
    bad = os.fsencode(t) + b"/caf\xe9.img"
    assert _errno_of(os.open, bad, os.O_WRONLY | os.O_CREAT) == errno.EINVAL
    assert _errno_of(os.mkdir, bad) == errno.EINVAL
    assert len(os.listdir(t)) == len(names) + 1
    assert catalog.pool("tenants")["media"] == len(names)


# -- a big pool ----------------------------------------------------------------------------------

ENTRIES = 20_000


@SQLITE_ONLY
@pytest.mark.watchdog(240)
def test_pool_with_20000_entries(catalog, mount):
    catalog.setup({"tenants": 1024})
    pid = catalog.pool("tenants")["pid"]
    names = {f"media-{i:05d}.img" for i in range(ENTRIES - 2)} | {"with space", "ünïcødé"}
    # Through the service, before mounting. MediaService without a placement
    # callback puts everything on DEFAULT (what the default policy decides
    # anyway) and skips two extra policy transactions per media: 2 ms, not 5.
    start = time.monotonic()
    media = MediaService(catalog.v.db, catalog.v.backing, catalog.v.chains)
    for name in sorted(names):
        media.create(pid, name)
    create_s = time.monotonic() - start
    m = mount()
    pool = m / "tenants"

    start = time.monotonic()
    listed = os.listdir(pool)
    listdir_s = time.monotonic() - start
    assert len(listed) == ENTRIES
    assert set(listed) == names

    start = time.monotonic()
    res = run("ls", "-l", pool, timeout=120)
    ls_s = time.monotonic() - start
    lines = res.stdout.splitlines()
    assert lines[0].startswith("total")
    assert len(lines) == ENTRIES + 1
    assert all(line.startswith("-rw-r--r--") for line in lines[1:])
    print(
        f"\n{ENTRIES} entries: created in {create_s:.1f} s, "
        f"os.listdir {listdir_s:.2f} s, ls -l {ls_s:.2f} s"
    )
    assert listdir_s < 60
    assert ls_s < 60

    # The pool still works normally at that size.
    (pool / "media-00042.img").write_bytes(b"hello")
    os.unlink(pool / "media-00043.img")
    assert len(os.listdir(pool)) == ENTRIES - 1
    assert used(pool) == 5
    assert catalog.pool("tenants")["media"] == ENTRIES - 1
