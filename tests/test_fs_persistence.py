"""What survives the daemon: a clean unmount and remount, and kill -9 and restart.

Tree, bytes (sha256), modes, mtimes, user xattrs and usage stay; after a crash
with a file open for writing, the restarted daemon reclaims the dead writer's
grant, so usage equals the sum of the file sizes again.
"""

from __future__ import annotations

import contextlib
import os

from support.fs import MIB, VX, file_sizes, manifest, pool_show, run, used, vattr

POOLS = ["tenants", "tenants/acme", "tenants/acme/vm 1", "tenants/globex", "isos"]


def _build(m) -> None:
    t = m / "tenants"
    (t / "acme" / "vm 1").mkdir(parents=True)
    (t / "globex").mkdir()
    os.setxattr(t / "acme", VX + "quota_mib", b"96")
    (t / "acme" / "vm 1" / "disk.img").write_bytes(os.urandom(7 * MIB + 3))
    (t / "acme" / "notes ü.txt").write_bytes(b"remember\n")
    (t / "globex" / "empty.img").write_bytes(b"")
    run("truncate", "-s", "32M", t / "globex" / "sparse.raw")
    with open(t / "globex" / "sparse.raw", "r+b") as f:
        f.seek(9 * MIB)
        f.write(os.urandom(4096))
    (m / "isos" / "install.iso").write_bytes(os.urandom(3 * MIB))
    os.chmod(t / "acme" / "notes ü.txt", 0o600)
    os.chmod(t / "acme" / "vm 1", 0o700)
    os.chown(t / "acme" / "notes ü.txt", 1234, 5678)
    os.chown(t / "globex", 4321, 8765)
    os.utime(t / "acme" / "vm 1" / "disk.img", ns=(1_500_000_000_000_000_001,) * 2)
    os.setxattr(t / "acme" / "vm 1" / "disk.img", "user.os", b"debian")
    os.setxattr(t / "globex", "user.tier", b"silver")


def _state(m, catalog) -> dict:
    """Everything that must survive, seen through the mount and in the catalog."""
    return {
        "manifest": manifest(m.path),
        "xattrs": {
            "disk": os.getxattr(m / "tenants/acme/vm 1/disk.img", "user.os"),
            "globex": os.getxattr(m / "tenants/globex", "user.tier"),
        },
        "pids": {p: vattr(m / p, "pid") for p in POOLS},
        "mid": vattr(m / "tenants/acme/vm 1/disk.img", "mid"),
        "quota": vattr(m / "tenants/acme", "quota_mib"),
        "used": {p: used(m / p) for p in POOLS},
        "shown": {p: catalog.pool(p)["used_bytes"] for p in ("tenants", "isos")},
    }


def _check_usage(m, state: dict) -> None:
    assert state["used"]["tenants"] == file_sizes(m / "tenants")
    assert state["used"]["tenants/acme"] == file_sizes(m / "tenants" / "acme")
    assert state["used"]["isos"] == 3 * MIB
    assert state["shown"] == {"tenants": state["used"]["tenants"], "isos": 3 * MIB}


def test_unmount_and_remount_keep_everything(catalog, mount):
    catalog.setup({"tenants": 256, "isos": 64})
    m = mount()
    _build(m)
    before = _state(m, catalog)
    _check_usage(m, before)
    m.stop()
    assert not m.is_mounted()

    m = mount()
    after = _state(m, catalog)
    assert after == before
    # And it still works: the room left is what it was.
    (m / "tenants" / "globex" / "more.img").write_bytes(b"x" * MIB)
    assert used(m / "tenants") == before["used"]["tenants"] + MIB


def test_kill9_and_restart_keep_everything(catalog, mount):
    catalog.setup({"tenants": 256, "isos": 64})
    m = mount()
    _build(m)
    before = _state(m, catalog)
    _check_usage(m, before)
    m.kill9()
    assert not m.is_mounted()

    m = mount()
    assert _state(m, catalog) == before


def test_kill9_with_open_writer_reclaims_its_grant(catalog, cli, mount):
    catalog.setup({"tenants": 256})
    m = mount()
    t = m / "tenants"
    (t / "vm").mkdir()
    (t / "vm" / "done.img").write_bytes(os.urandom(2 * MIB))
    data = os.urandom(5 * MIB + 123)

    fd = os.open(t / "vm" / "live.img", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, data) == len(data)
        # The writer holds a grant beyond what it wrote: the catalog charges it.
        # (Read through the mount: a forked child's exit would flush the open
        # file, and a flush from the only writer hands the grant back.)
        held = used(t)
        assert held > 2 * MIB + len(data)
        m.kill9()
    finally:
        with contextlib.suppress(OSError):  # the connection is gone
            os.close(fd)
    # Nothing reclaims the grant while no daemon runs: the reservation is stale.
    assert pool_show(cli, "tenants")["used_bytes"] == held

    m = mount()
    t = m / "tenants"
    expected = 2 * MIB + len(data)
    assert os.stat(t / "vm" / "live.img").st_size == len(data)
    assert (t / "vm" / "live.img").read_bytes() == data
    assert file_sizes(t) == expected
    assert pool_show(cli, "tenants")["used_bytes"] == expected
    assert catalog.pool("tenants/vm")["used_bytes"] == expected
    assert used(t) == expected
    assert int(vattr(t, "avail_bytes")) == 256 * MIB - expected

    # The room the dead writer reserved can be filled to the byte again.
    fill = 256 * MIB - expected
    fd = os.open(t / "fill.img", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        assert os.write(fd, b"f" * (fill + MIB)) == fill
    finally:
        os.close(fd)
    assert used(t) == 256 * MIB
    m.stop()
    m = mount()
    assert catalog.pool("tenants")["used_bytes"] == 256 * MIB == file_sizes(m / "tenants")
