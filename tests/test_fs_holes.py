"""Holes and copies through the mount: SEEK_DATA/SEEK_HOLE, qemu-img map, cp, and
copy_file_range between media.

Each answer is compared with the same call on a plain file in the test's tmp
directory, built the same way: the expected answer is the kernel's own, never a
constant in the test. The backing volume lies in that same directory, so both
files sit on one filesystem and have the same extents.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from support.fs import MIB, avail, run, sha256, used

from velocityfs.fs.session import PATCHED_HANDLERS, PATCHED_OPTIONS
from velocityfs.store.space import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate

KIB = 1 << 10
SQLITE_ONLY = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
PATCH = Path(__file__).resolve().parents[1] / "patches" / "pyfuse3-velocityfs.patch"

# (offset, length) of the data in a 20 MiB file; the rest is holes, the end one too.
SIZE = 20 * MIB
DATA = [(0, 64 * KIB), (3 * MIB, 4 * KIB), (5 * MIB + 4 * KIB, MIB), (15 * MIB, 512 * KIB)]


def sparse_file(path: Path, seed: bytes) -> None:
    """A file of SIZE bytes with data (derived from ``seed``) only at DATA."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        for off, length in DATA:
            f.seek(off)
            f.write(_bytes(seed + str(off).encode(), length))


def _bytes(seed: bytes, length: int) -> bytes:
    """``length`` bytes that are never zero (a zero block could read as a hole)."""
    block = hashlib.sha256(seed).digest()
    return (block.replace(b"\0", b"\1") * (length // len(block) + 1))[:length]


def seek(fd: int, off: int, whence: int) -> int | str:
    """Where lseek(2) lands, or the name of its errno."""
    try:
        return os.lseek(fd, off, whence)
    except OSError as exc:
        return errno.errorcode[exc.errno]


def probes() -> list[int]:
    """Offsets in data, in holes, at the edges of both, at the end and past it."""
    offsets = {0, 1, SIZE - 1, SIZE, SIZE + 1, 2 * SIZE}
    for off, length in DATA:
        offsets |= {off - 1, off, off + 1, off + length - 1, off + length, off + length + 1}
    return sorted(o for o in offsets if o >= 0)


def answers(path: Path) -> dict[tuple[int, int], int | str]:
    with opened(path) as fd:
        return {
            (off, whence): seek(fd, off, whence)
            for off in probes()
            for whence in (os.SEEK_DATA, os.SEEK_HOLE)
        }


def extents(path: Path) -> list[tuple[int, int]]:
    """The data extents as SEEK_DATA and SEEK_HOLE show them, walking from 0."""
    found = []
    with opened(path) as fd:
        pos = 0
        while True:
            start = seek(fd, pos, os.SEEK_DATA)
            if isinstance(start, str):
                assert start == "ENXIO"
                return found
            end = os.lseek(fd, start, os.SEEK_HOLE)
            found.append((start, end))
            pos = end


@contextmanager
def opened(path: Path, flags: int = os.O_RDONLY) -> Iterator[int]:
    fd = os.open(path, flags)
    try:
        yield fd
    finally:
        os.close(fd)


def proc_io(pid: int | None, field: str) -> int:
    """A counter of the daemon's I/O so far (/proc/PID/io: rchar bytes read, syscw
    write-like system calls)."""
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/io")


# -- SEEK_DATA and SEEK_HOLE ---------------------------------------------------------------


@SQLITE_ONLY
def test_seek_data_and_seek_hole_answer_as_on_a_plain_file(catalog, mount, tmp_path):
    catalog.setup({"tenants": 256})
    media = mount() / "tenants" / "disk.raw"
    plain = tmp_path / "plain.raw"
    for path in (media, plain):
        sparse_file(path, b"a")
    assert extents(plain) == [(off, off + length) for off, length in DATA]  # the premise
    assert answers(media) == answers(plain)
    assert extents(media) == extents(plain)

    # A hole punched through the mount (qemu's discard) and a truncate that leaves
    # one at the end show as they do on the plain file.
    for path in (media, plain):
        with opened(path, os.O_RDWR) as fd:
            punch = FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE
            fallocate(fd, punch, 5 * MIB + 68 * KIB, 64 * KIB)
            os.ftruncate(fd, SIZE + 4 * MIB)
    assert answers(media) == answers(plain)
    assert extents(media) == extents(plain)
    assert len(extents(media)) == len(DATA) + 1


@SQLITE_ONLY
def test_qemu_img_map_shows_the_holes_of_a_raw_image(catalog, mount, tmp_path):
    catalog.setup({"tenants": 2048})
    media = mount() / "tenants" / "vm.raw"
    plain = tmp_path / "vm.raw"
    for path in (media, plain):
        run("qemu-img", "create", "-f", "raw", path, "1G")
        with open(path, "r+b") as f:
            for off in (0, 100 * MIB, 700 * MIB + 4 * KIB):
                f.seek(off)
                f.write(_bytes(str(off).encode(), MIB))

    def qemu_map(path: Path) -> list[dict[str, object]]:
        out = run("qemu-img", "map", "--output=json", "-f", "raw", path).stdout
        return list(json.loads(out))

    assert qemu_map(media) == qemu_map(plain)
    assert [e["length"] for e in qemu_map(media) if e["data"]] == [MIB, MIB, MIB]


@SQLITE_ONLY
def test_cp_out_of_the_mount_reads_only_the_data(catalog, mount, tmp_path):
    """cp finds the data with SEEK_DATA/SEEK_HOLE: the daemon reads the data (and the
    kernel's read-ahead past it), not the 20 MiB of the file; the copy keeps the holes."""
    catalog.setup({"tenants": 256})
    m = mount()
    media = m / "tenants" / "disk.raw"
    plain = tmp_path / "plain.raw"
    for path in (media, plain):
        sparse_file(path, b"c")
    before = proc_io(m.pid, "rchar")
    run("cp", media, tmp_path / "from-mount.raw")
    daemon_read = proc_io(m.pid, "rchar") - before
    run("cp", plain, tmp_path / "from-plain.raw")
    assert daemon_read < SIZE // 2, daemon_read
    assert extents(tmp_path / "from-mount.raw") == extents(tmp_path / "from-plain.raw")
    assert sha256(tmp_path / "from-mount.raw") == sha256(plain)


# -- copy_file_range between media -----------------------------------------------------------


def copy_range(src: Path, dst: Path, length: int, off_in: int = 0, off_out: int = 0) -> int:
    """copy_file_range(2) from ``src`` to ``dst``, once."""
    with opened(src) as fd_in, opened(dst, os.O_WRONLY) as fd_out:
        return os.copy_file_range(fd_in, fd_out, length, off_in, off_out)


def test_copy_file_range_between_media_is_one_request_charged_like_a_write(
    catalog, mount, tmp_path
):
    catalog.setup({"tenants": 256})
    m = mount()
    pool = m / "tenants"
    (pool / "sub").mkdir()
    data, old = os.urandom(64 * MIB), os.urandom(64 * MIB)
    media, plain = pool / "sub" / "copy.raw", tmp_path / "copy.raw"  # another pool
    for root, target in ((pool, media), (tmp_path, plain)):
        (root / "base.raw").write_bytes(data)
        target.write_bytes(old)
    assert used(pool) == 128 * MIB  # (and the closes are committed: no write below)

    with opened(pool / "base.raw") as fd_in, opened(media, os.O_WRONLY) as fd_out:
        before = proc_io(m.pid, "syscw")
        copied = os.copy_file_range(fd_in, fd_out, 64 * MIB, 0, 0)
        daemon_writes = proc_io(m.pid, "syscw") - before
    assert copied == copy_range(tmp_path / "base.raw", plain, 64 * MIB)
    # Read and written block by block (the kernel's fallback), 64 MiB would take the
    # daemon 64 writes of 1 MiB to the backing file and as many replies; one request
    # (over written bytes: the catalog is not asked for room) takes the copy and its
    # reply.
    assert daemon_writes < 16, daemon_writes
    assert sha256(media) == sha256(plain)

    # From an offset, to one past the end (a hole between), charged like a write.
    assert copy_range(pool / "base.raw", media, MIB, 5, 65 * MIB) == copy_range(
        tmp_path / "base.raw", plain, MIB, 5, 65 * MIB
    )
    assert sha256(media) == sha256(plain)
    assert extents(media) == extents(plain)
    assert os.stat(media).st_size == os.stat(plain).st_size == 66 * MIB
    assert used(pool) == 130 * MIB
    assert catalog.pool("tenants")["used_bytes"] == 130 * MIB


def test_copy_file_range_past_the_quota_is_short_then_enospc(catalog, mount):
    """The destination's room is that of a write of the same range: what fits is
    copied (a short count), then ENOSPC, and a refused copy changes nothing."""
    catalog.setup({"tenants": 40})
    m = mount()
    pool = m / "tenants"
    source = pool / "base.raw"
    source.write_bytes(os.urandom(16 * MIB))
    target = pool / "copy.raw"
    target.write_bytes(os.urandom(MIB))
    room = avail(pool)
    assert room == 40 * MIB - 17 * MIB

    with opened(source) as fd_in, opened(target, os.O_WRONLY) as fd_out:
        assert os.copy_file_range(fd_in, fd_out, 16 * MIB, 0, MIB) == 16 * MIB
        # 7 MiB left: a copy of 16 MiB at the end is short, to the byte.
        assert os.copy_file_range(fd_in, fd_out, 16 * MIB, 0, 17 * MIB) == room - 16 * MIB
        assert avail(pool) == 0
        full = sha256(target)
        with pytest.raises(OSError) as exc:
            os.copy_file_range(fd_in, fd_out, MIB, 0, 40 * MIB)
        assert exc.value.errno == errno.ENOSPC
    assert sha256(target) == full
    assert os.stat(target).st_size == 24 * MIB
    assert used(pool) == 40 * MIB
    assert catalog.pool("tenants")["used_bytes"] == 40 * MIB


def test_the_mount_checks_every_handler_and_option_the_patch_adds():
    """The bootstrap rebuilds pyfuse3 from a changed patch; the mount warns of one
    without them."""
    patch = PATCH.read_text()
    added = re.findall(r"^\+    async def (\w+)\(", patch, flags=re.MULTILINE)
    assert sorted(added) == sorted(PATCHED_HANDLERS)
    options = re.findall(r"^\+    (\w+): bool = False$", patch, flags=re.MULTILINE)
    assert sorted(options) == sorted(PATCHED_OPTIONS)
