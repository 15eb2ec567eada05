"""Disk faults under a real mount: one failing disk must not take the host down.

The velocityfs daemon carries every VM disk of a hypervisor host. When the disk
of one backing volume answers EIO (or ENOSPC), exactly the client that hit it
must get that errno, from that one system call, while the daemon keeps serving
every other file, the faulted one included once the disk recovers, and the
pools' usage stays exact.

The failing disk is faultfs (tests/support/faultfs.py, through the
``faulty_volume`` fixture): a passthrough FUSE filesystem mounted on
STORE/vol/faulty that fails chosen operations on chosen files on demand. The
volume policy puts ``*.img`` there; each test faults one media's backing file
(``media/<2 hex>/<mid>`` on that volume) and checks a bystander on the same
volume and one on DEFAULT while the fault stands and after it is cleared.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.admin import InProcessCli, pattern, write_config
from support.faultfs import FaultyVolume
from support.fs import MIB, Catalog, avail, sync_dir, used, vattr
from support.mount import Mount
from support.usage import assert_usage_consistent, grant_count

POOL = "tenants"
QUOTA_MIB = 100
POLICY = "name *.img :: faulty\nall :: DEFAULT"


@dataclass
class Host:
    """A mount whose pool holds media on a faulty volume and on DEFAULT."""

    m: Mount
    volume: FaultyVolume
    disk: Path  # on the faulty volume: the file the tests fault
    other: Path  # on the faulty volume too, never faulted
    plain: Path  # on DEFAULT
    mids: dict[Path, str]
    data: dict[Path, bytes] = field(default_factory=dict)  # what each file must hold

    @property
    def rule_path(self) -> str:
        """faultfs's glob for the faulted file: its backing file, relative to the volume."""
        mid = self.mids[self.disk]
        return f"media/{mid[:2]}/{mid}"

    @property
    def bystanders(self) -> list[Path]:
        return [self.other, self.plain]


@pytest.fixture
def host(
    catalog: Catalog,
    vcli: InProcessCli,
    faulty_volume: Callable[..., FaultyVolume],
    mount: Callable[..., Mount],
    tmp_path: Path,
) -> Host:
    catalog.setup({POOL: QUOTA_MIB})
    volume = faulty_volume("faulty")
    vcli("volume", "add", "faulty")
    config = write_config(tmp_path / "velocityfs.toml", volume_policy=POLICY)
    m = mount(env={**os.environ, "VELOCITYFS_CONFIG": str(config)})
    files = {"disk.img": "faulty", "other.img": "faulty", "plain.raw": "DEFAULT"}
    mids, data = {}, {}
    for seed, (name, where) in enumerate(files.items()):
        path = m / POOL / name
        data[path] = pattern(2 * MIB + 1000 * seed + 123, seed=seed)
        path.write_bytes(data[path])
        assert vattr(path, "volume") == where
        mids[path] = vattr(path, "mid")
    h = Host(m, volume, m / POOL / "disk.img", m / POOL / "other.img", m / POOL / "plain.raw", mids)
    h.data = data
    for path in (h.disk, h.other):  # really on faultfs's disk, through faultfs
        assert volume.media(mids[path]).read_bytes() == data[path]
    return h


# -- helpers --------------------------------------------------------------------------------


def evict(path: Path) -> None:
    """Drop the mount's page cache of ``path``: the next read must ask the daemon."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def report(h: Host, *, lost: bool = True) -> str:
    """The daemon's state and the end of its log, for a failure message. A session that
    ended (``lost``) answers ENOTCONN/ECONNABORTED at once: give the daemon a moment to
    finish dying, so that its log ends with the traceback."""
    if lost and h.m.proc is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            h.m.proc.wait(timeout=10)
    return (
        f"velocityfs daemon alive: {h.m.alive} (exit status {h.m.proc and h.m.proc.poll()}); "
        f"faults faultfs injected: {h.volume.injected()}\n"
        f"--- velocityfs log (end) ---\n{h.m.log[-6000:]}"
    )


def fails_with(h: Host, code: int, call: Callable[..., Any], *args: Any) -> None:
    """``call(*args)`` on the mount fails with exactly ``code``; otherwise say what the
    daemon did (a daemon that died answers ENOTCONN, and its log has the traceback)."""
    name = getattr(call, "__name__", repr(call))
    try:
        call(*args)
    except OSError as exc:
        got = exc.errno
    else:
        pytest.fail(f"{name} succeeded; expected {errno.errorcode[code]}")
    if got != code:
        pytest.fail(
            f"{name} failed with {errno.errorcode.get(got, got)}, not {errno.errorcode[code]}; "
            + report(h, lost=got in (errno.ENOTCONN, errno.ECONNABORTED))
        )


def still_serving(h: Host, after: str) -> None:
    """The mount still answers (a round trip through the daemon: fsync on the pool)."""
    try:
        sync_dir(h.m / POOL)
    except OSError as exc:
        pytest.fail(
            f"the mount stopped answering ({errno.errorcode.get(exc.errno)}) after {after}; "
            + report(h)
        )


def exercise(h: Host, paths: list[Path], seed: int) -> None:
    """Each file still writes (in place, and growing: a new grant), fsyncs and reads back."""
    assert h.m.alive, f"the velocityfs daemon died; {report(h)}"
    for n, path in enumerate(paths):
        old = h.data[path]
        chunk = pattern(64 * 1024 + 5, seed=seed + n)
        fd = os.open(path, os.O_RDWR)
        try:
            assert os.pwrite(fd, chunk, 0) == len(chunk)
            assert os.pwrite(fd, chunk, len(old)) == len(chunk)
            os.fsync(fd)
        finally:
            os.close(fd)
        h.data[path] = chunk + old[len(chunk) :] + chunk
        evict(path)
        assert path.read_bytes() == h.data[path], f"{path.name} does not read back"


def wait_settled(
    h: Host, catalog: Catalog, why: str = "grants outlived their writers' close()"
) -> None:
    """Every close has been handled: no grant or lease is left (RELEASE is asynchronous,
    and a mount commits closes in batches)."""
    deadline = time.monotonic() + 15
    while grant_count(catalog.v):
        if time.monotonic() > deadline:
            pytest.fail(
                f"{why}: {grant_count(catalog.v)} grant(s) left; {POOL} used_bytes is "
                f"{catalog.pool(POOL)['used_bytes']} for {sum(map(len, h.data.values()))} "
                "bytes of media"
            )
        time.sleep(0.05)


def assert_usage_exact(h: Host, catalog: Catalog) -> None:
    """used_bytes is the sum of the media sizes, to the byte, in every view of it."""
    total = sum(len(d) for d in h.data.values())
    assert catalog.pool(POOL)["used_bytes"] == total
    sizes = {mv.name: mv.size for mv in catalog.v.media.all()}
    assert sizes == {p.name: len(d) for p, d in h.data.items()}
    assert_usage_consistent(catalog.v)


def finish(h: Host, catalog: Catalog, vcli: InProcessCli) -> None:
    """The end of every test: the daemon lives, every file holds what it must, usage is
    exact while mounted and after a clean unmount (exit status 0), fsck finds nothing."""
    assert h.m.alive, f"the velocityfs daemon died; {report(h)}"
    for path, data in h.data.items():
        evict(path)
        assert os.stat(path).st_size == len(data)
        assert path.read_bytes() == data, f"{path.name} changed"
    for path in (h.disk, h.other):
        assert h.volume.media(h.mids[path]).read_bytes() == h.data[path]
    sync_dir(h.m / POOL)
    wait_settled(h, catalog)
    assert used(h.m / POOL) == sum(len(d) for d in h.data.values())
    assert_usage_exact(h, catalog)
    h.m.stop()
    assert grant_count(catalog.v) == 0
    assert_usage_exact(h, catalog)
    res = vcli("fsck", check=False)
    assert res.stdout.splitlines()[-1] == "0 repaired, 0 remaining", str(res)


# -- the faults -----------------------------------------------------------------------------


def test_read_eio_reaches_only_that_read(host: Host, catalog: Catalog, vcli: InProcessCli):
    """An EIO from a volume's disk on read reaches the client's read(2) as EIO.

    It must not end the daemon: that one daemon carries every VM disk of the host,
    so one bad sector under one VM would otherwise take every VM's disk away.
    """
    h = host
    evict(h.disk)  # written just now: the read could be served from the page cache
    h.volume.fail("read", "EIO", h.rule_path)
    fd = os.open(h.disk, os.O_RDONLY)
    try:
        fails_with(h, errno.EIO, os.pread, fd, MIB, 0)
        assert h.volume.injected("read") >= 1, "the read never reached the disk"
        exercise(h, h.bystanders, seed=10)  # while the disk still fails
        h.volume.clear()
        assert os.pread(fd, MIB, 0) == h.data[h.disk][:MIB]  # the same descriptor reads again
    finally:
        os.close(fd)
    exercise(h, [h.disk, *h.bystanders], seed=20)
    finish(h, catalog, vcli)


def test_write_eio_reaches_that_write_and_changes_nothing(
    host: Host, catalog: Catalog, vcli: InProcessCli
):
    """An EIO from the disk on write reaches write(2) as EIO, in place and growing, and
    the file stays as it was: on the disk, in its size, and in the grant taken for the
    growth, which must go back to the pool (usage exact afterwards).

    The daemon carries every VM disk of the host: it must keep serving all of them.
    """
    h = host
    before = h.data[h.disk]
    h.volume.fail("write", "EIO", h.rule_path)
    fd = os.open(h.disk, os.O_RDWR)
    try:
        fails_with(h, errno.EIO, os.pwrite, fd, pattern(4096, seed=30), 0)
        fails_with(h, errno.EIO, os.pwrite, fd, pattern(MIB, seed=31), len(before))
        assert h.volume.injected("write") >= 2, "the writes never reached the disk"
        assert os.fstat(fd).st_size == len(before)
        assert os.pread(fd, len(before) + 10, 0) == before
        assert h.volume.media(h.mids[h.disk]).read_bytes() == before
        exercise(h, h.bystanders, seed=32)
        h.volume.clear()
        new = pattern(4096, seed=33)
        assert os.pwrite(fd, new, 0) == len(new)
        os.fsync(fd)
    finally:
        os.close(fd)
    h.data[h.disk] = new + before[len(new) :]
    exercise(h, [h.disk, *h.bystanders], seed=34)
    finish(h, catalog, vcli)


def test_fsync_eio_reaches_fsync(host: Host, catalog: Catalog, vcli: InProcessCli):
    """An EIO from the disk on fsync reaches fsync(2) and fdatasync(2) as EIO.

    A VM's guest learns from that EIO that its flush did not reach stable storage; the
    daemon, carrying every VM disk of the host, must go on serving them all.
    """
    h = host
    before = h.data[h.disk]
    fd = os.open(h.disk, os.O_RDWR)
    try:
        new = pattern(8192, seed=40)
        assert os.pwrite(fd, new, 0) == len(new)
        h.volume.fail("fsync", "EIO", h.rule_path)
        fails_with(h, errno.EIO, os.fsync, fd)
        fails_with(h, errno.EIO, os.fdatasync, fd)
        assert h.volume.injected("fsync") >= 2, "the fsyncs never reached the disk"
        exercise(h, h.bystanders, seed=41)  # their fsyncs reach the same disk, and work
        h.volume.clear()
        os.fsync(fd)
    finally:
        os.close(fd)
    h.data[h.disk] = new + before[len(new) :]
    exercise(h, [h.disk, *h.bystanders], seed=42)
    finish(h, catalog, vcli)


def test_disk_enospc_before_the_quota_reaches_write(
    host: Host, catalog: Catalog, vcli: InProcessCli
):
    """A volume's disk that fills before the pool's quota does answers write(2) with
    ENOSPC (README: "a quota ... (or a volume's disk) is full"), and the file stays as
    it was; the grant the growing write took goes back, and the write succeeds once the
    disk has room again. The daemon, carrying every VM disk of the host, lives on.
    """
    h = host
    before = h.data[h.disk]
    room = avail(h.m / POOL)
    assert room > 64 * MIB, "the quota must be far from full: the disk is what fails"
    h.volume.fail("write", "ENOSPC", h.rule_path)
    fd = os.open(h.disk, os.O_RDWR)
    try:
        growth = pattern(MIB, seed=50)
        fails_with(h, errno.ENOSPC, os.pwrite, fd, growth, len(before))
        fails_with(h, errno.ENOSPC, os.pwrite, fd, pattern(4096, seed=51), 0)  # thin disk
        assert h.volume.injected("write") >= 2, "the writes never reached the disk"
        assert os.fstat(fd).st_size == len(before)
        assert os.pread(fd, len(before) + 10, 0) == before
        assert h.volume.media(h.mids[h.disk]).read_bytes() == before
        exercise(h, h.bystanders, seed=52)
        h.volume.clear()
        assert os.pwrite(fd, growth, len(before)) == len(growth)
        os.fsync(fd)
    finally:
        os.close(fd)
    h.data[h.disk] = before + growth
    exercise(h, [h.disk, *h.bystanders], seed=53)
    finish(h, catalog, vcli)


# -- what else a failing disk does to a media's life -----------------------------------------


def test_close_eio_does_not_end_the_daemon(host: Host, catalog: Catalog, vcli: InProcessCli):
    """The daemon closes a media's backing file when its client closes the media (FUSE
    RELEASE), and close(2) reports the disk's error of that moment (its FLUSH). That EIO
    has no client left to go to, and must not end the daemon that carries every VM disk
    of the host. The client's own close(2) succeeds (the daemon answers no FLUSH, and the
    answer to RELEASE goes nowhere) or says EIO; never that the mount is gone.
    """
    h = host
    before = h.data[h.disk]
    new = pattern(4096, seed=60)
    fd = os.open(h.disk, os.O_RDWR)
    assert os.pwrite(fd, new, 0) == len(new)
    h.volume.fail("flush", "EIO", h.rule_path)
    try:
        os.close(fd)
    except OSError as exc:
        assert exc.errno == errno.EIO, f"close(2): {exc}; {report(h)}"
    deadline = time.monotonic() + 10  # RELEASE reaches the daemon after close(2) returned
    while not h.volume.injected("flush"):
        assert time.monotonic() < deadline, "the daemon never closed the backing file"
        time.sleep(0.02)
    still_serving(h, "a close of the backing file failed with EIO")
    exercise(h, h.bystanders, seed=61)
    h.volume.clear()
    h.data[h.disk] = new + before[len(new) :]
    exercise(h, [h.disk, *h.bystanders], seed=62)
    finish(h, catalog, vcli)


def test_open_eio_reaches_open_and_leaves_no_lease(
    host: Host, catalog: Catalog, vcli: InProcessCli
):
    """A disk that fails to open the backing file answers open(2) with EIO, for reading
    and for writing, and a failed open for writing leaves no lease behind: a lease marks
    the media open for writing (``media set-volume`` waits for it to go, fsck calls it a
    stale grant once the daemon is gone). The daemon serves every other disk meanwhile.
    """
    h = host
    h.volume.fail("open", "EIO", h.rule_path)
    fails_with(h, errno.EIO, os.open, h.disk, os.O_RDWR)
    fails_with(h, errno.EIO, os.open, h.disk, os.O_RDONLY)
    assert h.volume.injected("open") >= 2, "the opens never reached the disk"
    exercise(h, h.bystanders, seed=70)
    still_serving(h, "open failed with EIO")
    wait_settled(h, catalog, why="the failed open for writing left its lease behind")
    h.volume.clear()
    exercise(h, [h.disk, *h.bystanders], seed=71)
    finish(h, catalog, vcli)


def test_truncate_eio_reaches_truncate_and_gives_the_room_back(
    host: Host, catalog: Catalog, vcli: InProcessCli
):
    """A disk that fails a truncate answers truncate(2) with EIO, growing or shrinking,
    the file stays as it was, and the room reserved for the growth before the disk was
    asked goes back to the pool at once: usage that counts bytes no file holds would
    refuse other VMs' writes for nothing, until the daemon restarts. The daemon, carrying
    every VM disk of the host, serves the others meanwhile.
    """
    h = host
    before = h.data[h.disk]
    h.volume.fail("setattr", "EIO", h.rule_path)
    fails_with(h, errno.EIO, os.truncate, h.disk, 10 * MIB)
    fails_with(h, errno.EIO, os.truncate, h.disk, 1000)
    assert h.volume.injected("setattr") >= 2, "the truncates never reached the disk"
    assert os.stat(h.disk).st_size == len(before)
    assert h.volume.media(h.mids[h.disk]).read_bytes() == before
    exercise(h, h.bystanders, seed=80)
    still_serving(h, "truncate failed with EIO")
    wait_settled(h, catalog, why="the room reserved for the failed truncate stayed charged")
    assert used(h.m / POOL) == sum(len(d) for d in h.data.values())
    h.volume.clear()
    os.truncate(h.disk, 3 * MIB)
    h.data[h.disk] = before + bytes(3 * MIB - len(before))
    exercise(h, [h.disk, *h.bystanders], seed=81)
    finish(h, catalog, vcli)
