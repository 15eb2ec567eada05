"""Quotas through the mount: dd to ENOSPC, concurrent writers, short writes,
truncate, fallocate and qemu-img.

The invariant under test (docs/architecture.md, Quotas): for every pool P at every instant
used(P) <= quota(P), where used counts apparent sizes plus outstanding grants;
after every writer closed, used equals the sum of the file sizes exactly.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support.fs import MIB, avail, getfattr, pool_show, run, sha256, used, vattr

SQLITE_ONLY = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
FALLOC_FL_KEEP_SIZE = 0x01


def _random_file(path: Path, size: int) -> Path:
    with open(path, "wb") as f:
        f.write(os.urandom(size))
    return path


def _dd_bytes(stderr: str) -> int:
    """The byte count of dd's final 'N bytes (...) copied' line."""
    counts = re.findall(r"^(\d+) bytes", stderr, flags=re.MULTILINE)
    assert counts, f"no byte count in dd's output:\n{stderr}"
    return int(counts[-1])


# -- dd until the parent is full ----------------------------------------------------------


@pytest.mark.parametrize("child_quota", ["inherit", "larger-than-room"])
def test_dd_into_child_until_parent_quota(child_quota, catalog, cli, mount, tmp_path):
    """The parent's quota is the one that stops dd, to the byte."""
    quota = 64 * MIB
    catalog.setup({"tenants": 64})
    m = mount()
    parent = m / "tenants"
    (parent / "other").mkdir()
    (parent / "vm").mkdir()
    if child_quota == "larger-than-room":
        run("setfattr", "-n", "user.velocity.quota_mib", "-v", "50", parent / "vm")
        assert getfattr(parent / "vm", "user.velocity.quota_mib") == "50"
    else:
        assert getfattr(parent / "vm", "user.velocity.quota_mib") == "inherit"
    # A sibling takes an odd amount, so the room left is not a multiple of dd's block.
    sibling = 24 * MIB + 12345
    (parent / "other" / "base.img").write_bytes(os.urandom(sibling))
    room = quota - sibling
    assert avail(parent / "vm") == room

    src = _random_file(tmp_path / "src.bin", 48 * MIB)
    target = parent / "vm" / "disk.img"
    res = subprocess.run(
        ["dd", f"if={src}", f"of={target}", "bs=1M", "conv=fsync"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode != 0, res.stderr
    assert "No space left on device" in res.stderr
    written = _dd_bytes(res.stderr)
    assert written == room
    assert os.stat(target).st_size == written
    with open(src, "rb") as f:
        assert target.read_bytes() == f.read(written)

    assert int(getfattr(parent, "user.velocity.used_bytes")) == quota
    assert int(getfattr(parent / "vm", "user.velocity.used_bytes")) == written
    assert int(getfattr(parent / "vm", "user.velocity.avail_bytes")) == 0
    shown = pool_show(cli, "tenants")
    assert shown["used_bytes"] == quota == shown["quota_bytes"]
    assert shown["avail_bytes"] == 0
    assert catalog.pool("tenants/vm")["used_bytes"] == written
    assert catalog.pool("tenants/other")["used_bytes"] == sibling

    # Full means full: not one more byte, in any child.
    fd = os.open(parent / "other" / "one-more", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as exc:
            os.write(fd, b"x")
        assert exc.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert used(parent) == quota


# -- concurrent writers ---------------------------------------------------------------------

WRITER = r"""
import errno, os, sys, time
path, go, fill = sys.argv[1], sys.argv[2], int(sys.argv[3])
block = bytes([fill]) * (1 << 20)
while not os.path.exists(go):
    time.sleep(0.001)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
written, err = 0, 0
try:
    while True:
        written += os.write(fd, block)
except OSError as exc:
    err = exc.errno
os.close(fd)
print(written, err)
"""


def _concurrent_fill(mounts, n_writers: int, quota: int, tmp_path: Path) -> list[int]:
    """n writers in sibling pools, spread over ``mounts``, fill the parent while we poll.

    Returns the byte count each writer reports; asserts the invariant on every poll.
    """
    parents = [mt / "tenants" for mt in mounts]
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER,
                str(parents[i % len(parents)] / f"vm{i}" / "disk.img"),
                str(go),
                str(i + 1),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(n_writers)
    ]
    for i in range(n_writers):
        assert (parents[i % len(parents)] / f"vm{i}").is_dir()
    polls, peak = 0, 0
    time.sleep(0.3)  # let every writer reach its start line
    go.touch()
    deadline = time.monotonic() + 120
    while any(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "writers did not finish"
        for parent in parents:
            now = used(parent)
            assert now <= quota, f"used {now} > quota {quota} during the run"
            peak = max(peak, now)
        for i in range(n_writers):
            assert used(parents[i % len(parents)] / f"vm{i}") <= quota
        polls += 1
    results = []
    for p in procs:
        out, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
        written, code = map(int, out.split())
        assert code == errno.ENOSPC, f"writer ended with errno {code}, not ENOSPC"
        results.append(written)
    assert polls >= 3, "the writers finished before usage could be watched"
    assert peak > 0
    return results


def _check_filled(parents: list[Path], results: list[int], quota: int) -> None:
    """Each writer's file (read through the mount that wrote it) and the parent's usage."""
    sizes = []
    for i, written in enumerate(results):
        pool = parents[i % len(parents)] / f"vm{i}"
        disk = pool / "disk.img"
        size = os.stat(disk).st_size
        assert size == written
        assert used(pool) == size
        with open(disk, "rb") as f:  # every byte is the writer's own
            while chunk := f.read(4 * MIB):
                assert chunk.count(i + 1) == len(chunk)
        sizes.append(size)
    total = sum(sizes)
    for parent in parents:
        assert used(parent) == total
    # A writer gets ENOSPC only once its own grant is used up and no room is left,
    # so every byte charged then belongs to a file or to a grant its writer will
    # still fill: together they fill the parent to the byte.
    assert total == quota


@pytest.mark.watchdog(150)
@pytest.mark.parametrize("n_writers", [2, 4])
def test_concurrent_writers_in_sibling_pools(n_writers, catalog, mount, tmp_path):
    quota = 192 * MIB
    catalog.setup({"tenants": 192})
    m = mount()
    for i in range(n_writers):
        (m / "tenants" / f"vm{i}").mkdir()
    results = _concurrent_fill([m], n_writers, quota, tmp_path)
    _check_filled([m / "tenants"], results, quota)
    shown = catalog.pool("tenants")
    assert shown["used_bytes"] == sum(results)
    for i, written in enumerate(results):
        assert catalog.pool(f"tenants/vm{i}")["used_bytes"] == written


@pytest.mark.watchdog(150)
def test_concurrent_writers_through_two_mounts(catalog, mount, tmp_path):
    """Two daemons on one catalog (two hosts sharing it) hold the same invariant.

    The subpools exist before the second mount starts: a mount loads the tree
    when it starts, and writers on both mounts then share the parent's quota.
    """
    quota = 160 * MIB
    catalog.setup({"tenants": 160})
    a = mount()
    for i in range(4):
        (a / "tenants" / f"vm{i}").mkdir()
    b = mount()
    results = _concurrent_fill([a, b], 4, quota, tmp_path)
    _check_filled([a / "tenants", b / "tenants"], results, quota)
    assert catalog.pool("tenants")["used_bytes"] == sum(results)


# -- short writes -----------------------------------------------------------------------------


def test_write_that_partly_fits_is_short_then_enospc(catalog, mount):
    quota = 10 * MIB
    catalog.setup({"tenants": 10})
    m = mount()
    path = m / "tenants" / "disk.img"
    first = os.urandom(8 * MIB + 4321)
    crossing = os.urandom(4 * MIB)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, first) == len(first)
        n = os.write(fd, crossing)
        assert n == quota - len(first)
        assert 0 < n < len(crossing)
        with pytest.raises(OSError) as exc:
            os.write(fd, b"one more")
        assert exc.value.errno == errno.ENOSPC
        assert used(m / "tenants") <= quota
    finally:
        os.close(fd)
    assert os.stat(path).st_size == quota
    assert path.read_bytes() == first + crossing[:n]
    assert used(m / "tenants") == quota
    assert catalog.pool("tenants")["used_bytes"] == quota

    # A new, empty media still fits; its first byte does not.
    fd = os.open(m / "tenants" / "new.img", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        with pytest.raises(OSError) as exc:
            os.write(fd, b"x")
        assert exc.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert os.stat(m / "tenants" / "new.img").st_size == 0
    assert used(m / "tenants") == quota


def test_sparse_append_and_in_place_writes_at_the_limit(catalog, mount):
    """Apparent size is what counts; rewriting bytes already charged needs no room."""
    quota = 16 * MIB
    catalog.setup({"tenants": 16})
    m = mount()
    pool = m / "tenants"
    path = pool / "disk.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        # A write far past the end charges the hole before it too.
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"x", quota)
        assert exc.value.errno == errno.ENOSPC
        assert os.fstat(fd).st_size == 0
        assert os.pwrite(fd, b"end", 12 * MIB - 3) == 3
        assert os.fstat(fd).st_size == 12 * MIB
    finally:
        os.close(fd)
    assert used(pool) == 12 * MIB
    backing = vattr(path, "backing_path")
    assert os.stat(backing).st_blocks * 512 < MIB  # the hole stays a hole on disk

    # Appends (shell >> and O_APPEND) land at the end and are charged.
    run("sh", "-c", f"printf 'appended' >> '{path}'")
    with open(path, "ab") as f:
        f.write(b"!" * (4 * MIB - 9))
    assert os.stat(path).st_size == quota - 1
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        assert os.write(fd, b"too much") == 1  # one byte was left
        with pytest.raises(OSError) as exc:
            os.write(fd, b"more")
        assert exc.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert os.stat(path).st_size == quota
    assert used(pool) == os.stat(path).st_size
    assert used(pool) <= quota

    # Full pool: overwriting bytes that exist still works, growing does not.
    fd = os.open(path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        assert os.pwrite(fd, b"B" * MIB, 0) == MIB
        assert os.pwrite(fd, b"tail", size - 4) == 4
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"xx", size)
        assert exc.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    with open(path, "rb") as f:
        assert f.read(MIB) == b"B" * MIB
        f.seek(12 * MIB - 3)
        assert f.read(11) == b"endappended"
        f.seek(-4, os.SEEK_END)
        assert f.read() == b"tail"
    assert os.stat(path).st_size == size
    assert used(pool) == size
    assert catalog.pool("tenants")["used_bytes"] == size


# -- truncate and fallocate ----------------------------------------------------------------


def test_truncate_beyond_quota_fails_and_shrink_returns_room(catalog, mount):
    quota = 16 * MIB
    catalog.setup({"tenants": 16})
    m = mount()
    pool = m / "tenants"
    path = pool / "disk.img"
    data = os.urandom(4 * MIB)
    path.write_bytes(data)
    assert used(pool) == 4 * MIB

    with pytest.raises(OSError) as exc:
        os.truncate(path, quota + 1)
    assert exc.value.errno == errno.ENOSPC
    res = subprocess.run(
        ["truncate", "-s", "20M", str(path)], capture_output=True, text=True, check=False
    )
    assert res.returncode != 0
    assert "No space left on device" in res.stderr
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            os.ftruncate(fd, 64 * MIB)
        assert exc.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
    assert os.stat(path).st_size == 4 * MIB
    assert used(pool) == 4 * MIB
    assert catalog.pool("tenants")["used_bytes"] == 4 * MIB
    assert sha256(path) == hashlib.sha256(data).hexdigest()

    # Growing to exactly the quota is allowed; the growth reads back as zeros.
    run("truncate", "-s", "16M", path)
    assert os.stat(path).st_size == quota
    assert used(pool) == quota
    assert avail(pool) == 0
    with open(path, "rb") as f:
        assert f.read(4 * MIB) == data
        assert f.read() == bytes(12 * MIB)

    # Shrinking returns room, which a sibling can then use.
    os.truncate(path, MIB)
    assert os.stat(path).st_size == MIB
    assert used(pool) == MIB
    assert avail(pool) == quota - MIB
    run("truncate", "-s", "15M", pool / "other.img")
    assert used(pool) == quota
    assert catalog.pool("tenants")["used_bytes"] == quota
    assert path.read_bytes() == data[:MIB]


def test_shrinking_an_open_file_returns_room_at_once(catalog, mount):
    """ftruncate on a descriptor kept open (a hypervisor's disk) gives the room back now,
    not at close: what was cut was data, not the writer's reservation."""
    quota = 32 * MIB
    catalog.setup({"tenants": 32})
    m = mount()
    pool = m / "tenants"
    (pool / "a").mkdir()
    (pool / "b").mkdir()
    fd = os.open(pool / "a" / "disk.img", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, os.urandom(20 * MIB))
        os.fsync(fd)
        before = used(pool)
        assert 20 * MIB <= before <= quota
        os.ftruncate(fd, 2 * MIB)
        assert os.fstat(fd).st_size == 2 * MIB
        assert used(pool) == before - 18 * MIB
        # A sibling can use the room while the file stays open.
        sibling = pool / "b" / "other.img"
        sibling.write_bytes(b"s" * (quota - used(pool)))
        assert used(pool) == quota
        # The open file keeps writing into what it still holds, then gets ENOSPC.
        held = before - 20 * MIB
        assert os.pwrite(fd, b"w" * held, 2 * MIB) == held
        with pytest.raises(OSError) as exc:
            os.pwrite(fd, b"w", 2 * MIB + held)
        assert exc.value.errno == errno.ENOSPC
        os.truncate(pool / "a" / "disk.img", MIB)  # by path, while open
        assert used(pool) == quota - (MIB + held)
    finally:
        os.close(fd)
    sizes = os.stat(pool / "a" / "disk.img").st_size + os.stat(sibling).st_size
    assert os.stat(pool / "a" / "disk.img").st_size == MIB
    assert used(pool) == sizes
    assert catalog.pool("tenants")["used_bytes"] == sizes


def _pool_with_disk(catalog, mount, size: int) -> tuple[Path, Path, bytes]:
    """A 16 MiB pool on a fresh mount, holding disk.img of ``size`` random bytes."""
    catalog.setup({"tenants": 16})
    pool = mount() / "tenants"
    data = os.urandom(size)
    (pool / "disk.img").write_bytes(data)
    return pool, pool / "disk.img", data


def test_fallocate_grows_within_quota_and_beyond_fails_changing_nothing(catalog, mount):
    """fallocate(2) growth is charged like a write; past the quota it changes nothing."""
    pool, path, data = _pool_with_disk(catalog, mount, 3 * MIB)

    run("fallocate", "-l", "8M", path)
    assert os.stat(path).st_size == 8 * MIB
    assert os.stat(path).st_blocks * 512 >= 8 * MIB  # really allocated, not a hole
    assert used(pool) == 8 * MIB
    assert catalog.pool("tenants")["used_bytes"] == 8 * MIB

    res = subprocess.run(
        ["fallocate", "-l", "100M", str(path)], capture_output=True, text=True, check=False
    )
    assert res.returncode != 0
    assert "No space left on device" in res.stderr, res.stderr
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            _fallocate(fd, 0, 0, 16 * MIB + 1)
        assert exc.value.errno == errno.ENOSPC
        # Exactly to the quota fits.
        _fallocate(fd, 0, 8 * MIB, 8 * MIB)
        assert os.fstat(fd).st_size == 16 * MIB
        assert avail(pool) == 0
    finally:
        os.close(fd)
    assert os.stat(path).st_size == 16 * MIB
    assert used(pool) == 16 * MIB
    assert catalog.pool("tenants")["used_bytes"] == 16 * MIB
    with open(path, "rb") as f:
        assert f.read(3 * MIB) == data
        assert f.read() == bytes(13 * MIB)


def test_fallocate_punches_and_zeroes_without_changing_usage(catalog, mount):
    pool, path, data = _pool_with_disk(catalog, mount, 4 * MIB)
    blocks = os.stat(path).st_blocks

    run("fallocate", "--punch-hole", "-o", "1M", "-l", "1M", path)  # qemu's discard
    run("fallocate", "--zero-range", "-o", "3M", "-l", "512K", path)
    assert os.stat(path).st_size == 4 * MIB
    assert os.stat(path).st_blocks < blocks  # the hole gave its blocks back to the disk
    assert used(pool) == 4 * MIB
    assert catalog.pool("tenants")["used_bytes"] == 4 * MIB
    expected = data[: 1 * MIB] + bytes(MIB) + data[2 * MIB : 3 * MIB] + bytes(MIB // 2)
    expected += data[3 * MIB + MIB // 2 :]
    assert path.read_bytes() == expected

    # Allocating past the end while keeping the size would use disk no quota counts.
    res = subprocess.run(
        ["fallocate", "--keep-size", "-l", "8M", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode != 0
    assert "unsupported" in res.stderr, res.stderr
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(OSError) as exc:
            _fallocate(fd, FALLOC_FL_KEEP_SIZE, 3 * MIB, 2 * MIB)
        assert exc.value.errno == errno.EOPNOTSUPP
        _fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, 4 * MIB)  # within the size: fine
    finally:
        os.close(fd)
    assert os.stat(path).st_size == 4 * MIB
    assert used(pool) == 4 * MIB


def test_qemu_img_preallocates_with_falloc(catalog, mount):
    catalog.setup({"tenants": 64})
    m = mount()
    pool = m / "tenants"
    image = pool / "vm.raw"
    run("qemu-img", "create", "-f", "raw", "-o", "preallocation=falloc", image, "32M")
    assert os.stat(image).st_size == 32 * MIB
    assert os.stat(image).st_blocks * 512 >= 32 * MIB
    assert used(pool) == 32 * MIB
    res = subprocess.run(
        ["qemu-img", "create", "-f", "raw", "-o", "preallocation=falloc", str(pool / "big.raw")]
        + ["64M"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode != 0
    assert "No space left on device" in res.stderr + res.stdout
    assert used(pool) == 32 * MIB + os.stat(pool / "big.raw").st_size
    assert catalog.pool("tenants")["used_bytes"] == used(pool)


def _fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2) itself (os.posix_fallocate would fall back to writing zeros)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, mode, offset, length) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


# -- qemu-img -----------------------------------------------------------------------------------


@SQLITE_ONLY
def test_qemu_img_create_convert_check(catalog, mount):
    catalog.setup({"tenants": 256})
    m = mount()
    pool = m / "tenants"

    run("qemu-img", "create", "-f", "qcow2", pool / "vm.qcow2", "10G")
    run("qemu-img", "check", pool / "vm.qcow2")
    assert "virtual size: 10 GiB" in run("qemu-img", "info", pool / "vm.qcow2").stdout

    raw = pool / "disk.raw"
    run("qemu-img", "create", "-f", "raw", raw, "64M")
    assert os.stat(raw).st_size == 64 * MIB
    with open(raw, "r+b") as f:
        for offset in (0, 5 * MIB + 17, 40 * MIB, 64 * MIB - 4096):
            f.seek(offset)
            f.write(os.urandom(4096))

    run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, pool / "disk.qcow2")
    run("qemu-img", "check", pool / "disk.qcow2")
    run("qemu-img", "compare", "-f", "raw", "-F", "qcow2", raw, pool / "disk.qcow2")

    sizes = sum(os.stat(pool / n).st_size for n in os.listdir(pool))
    assert used(pool) == sizes
    assert catalog.pool("tenants")["used_bytes"] == sizes

    # A raw image larger than the room left is refused, and leaves no charge behind.
    res = subprocess.run(
        ["qemu-img", "create", "-f", "raw", str(pool / "huge.raw"), "1G"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert res.returncode != 0
    assert "No space left on device" in res.stderr + res.stdout
    if (pool / "huge.raw").exists():
        assert os.stat(pool / "huge.raw").st_size == 0
    assert used(pool) == sizes
