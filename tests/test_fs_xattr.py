"""Extended attributes: the virtual ``user.velocity.*`` ones (quota, usage, ids,
backing file) and stored ``user.*`` ones on pools and media.
"""

from __future__ import annotations

import errno
import os
import subprocess

import pytest
from support.fs import MIB, VX, avail, getfattr, run, sha256, used, vattr

SQLITE_ONLY = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)


def _setfattr(path, name: str, value: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["setfattr", "-n", name, "-v", value, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def _errno_of(fn, *args) -> int:
    with pytest.raises(OSError) as exc:
        fn(*args)
    return exc.value.errno


def test_quota_xattr_set_and_refused(catalog, mount):
    catalog.setup({"tenants": 100})
    m = mount()
    t = m / "tenants"
    (t / "a" / "b").mkdir(parents=True)
    assert getfattr(t, VX + "quota_mib") == "100"
    assert getfattr(t / "a", VX + "quota_mib") == "inherit"

    run("setfattr", "-n", VX + "quota_mib", "-v", "80", t / "a")
    assert getfattr(t / "a", VX + "quota_mib") == "80"
    assert catalog.pool("tenants/a")["quota_bytes"] == 80 * MIB
    os.setxattr(t / "a" / "b", VX + "quota_mib", b"60")
    assert vattr(t / "a" / "b", "quota_mib") == "60"

    # Above an ancestor's quota (the parent's or the root pool's): EINVAL.
    res = _setfattr(t / "a" / "b", VX + "quota_mib", "90")
    assert res.returncode != 0 and "Invalid argument" in res.stderr, res.stderr
    assert _errno_of(os.setxattr, t / "a" / "b", VX + "quota_mib", b"101") == errno.EINVAL
    # Below a subpool's quota, or below what the pool already uses: EINVAL.
    assert _errno_of(os.setxattr, t / "a", VX + "quota_mib", b"50") == errno.EINVAL
    (t / "a" / "b" / "disk.img").write_bytes(os.urandom(10 * MIB))
    res = _setfattr(t / "a" / "b", VX + "quota_mib", "5")
    assert res.returncode != 0 and "Invalid argument" in res.stderr, res.stderr
    assert _errno_of(os.setxattr, t / "a" / "b", VX + "quota_mib", b"not a number") == (
        errno.EINVAL
    )
    assert vattr(t / "a" / "b", "quota_mib") == "60"
    assert vattr(t / "a", "quota_mib") == "80"
    assert catalog.pool("tenants/a/b")["quota_bytes"] == 60 * MIB

    # Exactly the usage is allowed, and so is going back to inheriting.
    os.setxattr(t / "a" / "b", VX + "quota_mib", b"10")
    assert vattr(t / "a" / "b", "quota_mib") == "10"
    assert avail(t / "a" / "b") == 0
    run("setfattr", "-n", VX + "quota_mib", "-v", "inherit", t / "a" / "b")
    assert vattr(t / "a" / "b", "quota_mib") == "inherit"
    assert catalog.pool("tenants/a/b")["quota_bytes"] is None
    assert avail(t / "a" / "b") == 70 * MIB
    # A root pool needs a quota; a fraction of a MiB is kept to the byte.
    assert _errno_of(os.setxattr, t, VX + "quota_mib", b"inherit") == errno.EINVAL
    os.setxattr(t / "a", VX + "quota_mib", b"12.5")
    assert catalog.pool("tenants/a")["quota_bytes"] == 12 * MIB + MIB // 2
    assert vattr(t / "a", "quota_mib") == "12.5"


def test_usage_avail_and_id_xattrs(catalog, mount):
    catalog.setup({"tenants": 100})
    m = mount()
    t = m / "tenants"
    (t / "a" / "b").mkdir(parents=True)
    (t / "other").mkdir()
    os.setxattr(t / "a", VX + "quota_mib", b"80")
    os.setxattr(t / "a" / "b", VX + "quota_mib", b"60")
    assert avail(t / "a" / "b") == 60 * MIB  # its own quota is the tightest

    (t / "other" / "x.img").write_bytes(os.urandom(50 * MIB))
    assert used(t) == 50 * MIB
    assert used(t / "a") == 0
    assert avail(t / "a" / "b") == 50 * MIB  # now the root pool's room is
    assert avail(t / "a") == 50 * MIB

    data = os.urandom(20 * MIB + 7)
    (t / "a" / "b" / "disk.img").write_bytes(data)
    assert int(getfattr(t / "a" / "b", VX + "used_bytes")) == len(data)
    assert int(getfattr(t / "a", VX + "used_bytes")) == len(data)
    assert used(t) == 50 * MIB + len(data)
    assert int(getfattr(t / "a" / "b", VX + "avail_bytes")) == 30 * MIB - 7
    assert avail(t / "other") == 30 * MIB - 7
    shown = catalog.pool("tenants/a/b")
    assert shown["avail_bytes"] == 30 * MIB - 7
    assert shown["used_bytes"] == len(data)
    # df on the mount: the root pools' quotas, and what is left of them.
    st = os.statvfs(m.path)
    assert st.f_blocks * st.f_frsize == 100 * MIB
    assert st.f_bavail * st.f_frsize == (30 * MIB - 7) // st.f_frsize * st.f_frsize

    # Identity: pool ids match the catalog; media ids and the backing file.
    assert getfattr(t, VX + "pid") == catalog.pool("tenants")["pid"]
    assert vattr(t / "a" / "b", "pid") == shown["pid"]
    disk = t / "a" / "b" / "disk.img"
    mid = getfattr(disk, VX + "mid")
    assert len(mid) == 36
    backing = getfattr(disk, VX + "backing_path")
    assert mid in backing
    assert os.path.isfile(backing)
    assert os.stat(backing).st_size == len(data)
    assert sha256(backing) == sha256(disk)
    assert getfattr(disk, VX + "volume") == "DEFAULT"

    # What does not apply is absent; the virtual attributes are read-only.
    assert _errno_of(os.getxattr, disk, VX + "quota_mib") == errno.ENODATA
    assert _errno_of(os.getxattr, t, VX + "mid") == errno.ENODATA
    assert _errno_of(os.getxattr, m.path, VX + "pid") == errno.ENODATA
    assert _errno_of(os.setxattr, t, VX + "used_bytes", b"0") == errno.EPERM
    assert _errno_of(os.setxattr, disk, VX + "mid", b"x") == errno.EPERM
    assert _errno_of(os.removexattr, t / "a", VX + "quota_mib") == errno.EPERM
    assert used(t) == 50 * MIB + len(data)


@SQLITE_ONLY
def test_user_xattrs_stored_listed_removed_and_kept_across_remount(catalog, mount):
    catalog.setup({"tenants": 100})
    m = mount()
    t = m / "tenants"
    (t / "vm").mkdir()
    disk = t / "vm" / "disk.img"
    disk.write_bytes(b"disk")
    blob = bytes(range(256)) * 4

    run("setfattr", "-n", "user.os", "-v", "debian 12", disk)
    os.setxattr(disk, "user.blob", blob)
    os.setxattr(t / "vm", "user.owner", "équipe".encode())
    os.setxattr(t, "user.tier", b"gold")
    assert getfattr(disk, "user.os") == "debian 12"
    assert os.getxattr(disk, "user.blob") == blob
    assert sorted(os.listxattr(disk)) == ["user.blob", "user.os"]
    assert os.listxattr(t / "vm") == ["user.owner"]

    os.setxattr(disk, "user.os", b"debian 13")  # replace
    os.setxattr(disk, "user.gone", b"soon")
    os.removexattr(disk, "user.gone")
    assert _errno_of(os.getxattr, disk, "user.gone") == errno.ENODATA
    assert _errno_of(os.removexattr, disk, "user.gone") == errno.ENODATA
    # Only the user namespace is stored; nothing at the mount root.
    assert _errno_of(os.setxattr, disk, "trusted.x", b"1") == errno.EOPNOTSUPP
    assert _errno_of(os.setxattr, m.path, "user.x", b"1") == errno.EPERM

    m.stop()
    m = mount()
    t = m / "tenants"
    disk = t / "vm" / "disk.img"
    assert sorted(os.listxattr(disk)) == ["user.blob", "user.os"]
    assert os.getxattr(disk, "user.os") == b"debian 13"
    assert os.getxattr(disk, "user.blob") == blob
    assert os.getxattr(t / "vm", "user.owner") == "équipe".encode()
    assert os.getxattr(t, "user.tier") == b"gold"

    # They follow renames, and go with the media.
    os.rename(disk, t / "moved.img")
    assert os.getxattr(t / "moved.img", "user.os") == b"debian 13"
    os.unlink(t / "moved.img")
    (t / "moved.img").write_bytes(b"new")
    assert os.listxattr(t / "moved.img") == []
