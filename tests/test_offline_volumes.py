"""A volume whose disk is not mounted (issue 16, item 2): it takes no bytes and loses none.

Each volume here is a real ext4 disk on a loop device (support/loopdisk.py),
unmounted at each step the way an operator or a failed boot leaves it: the
directory STORE/vol/NAME is then an empty directory on the store's own disk.
Whatever lands there is lost when the disk comes back, so nothing may: new
media goes by the policy's next rule, moves onto and off the volume are
refused, ``volume list`` says it is offline, fsck reports its media as
offline and ``--repair`` keeps them; once the disk is back all of it is there.
"""

from __future__ import annotations

import errno
import os
import time
import uuid
from pathlib import Path

import httpx
import pytest
from support.admin import (
    MIB,
    default_path,
    fill,
    pattern,
    service,
    sha256_of,
    volume_file,
    write_config,
)
from support.api import free_port
from support.fs import sync_dir

from velocityfs.errors import VelocityError
from velocityfs.service.accounts import PERMISSIONS
from velocityfs.service.presence import CHECK_S
from velocityfs.store.journal import CreateJournal

SQLITE_ONLY = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
POLICY = "name *.ext :: ext\nall :: DEFAULT"
MARKER = ".velocityfs-volume"
# Long enough for a mount to stop believing what it last saw of a volume.
MARKER_CHECK_S = 2 * CHECK_S


def written(path: Path) -> list[str]:
    """Everything under a directory, as paths relative to it."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def test_a_volume_whose_disk_is_not_mounted_takes_nothing_and_loses_nothing(
    loop_disk, vcli, store_dir, catalog_url, tmp_path
):
    vcli("init")
    vcli("pool", "create", "tenants", "--quota-mib", "100")
    ext = store_dir / "vol" / "ext"
    disk = loop_disk(ext)
    vcli("volume", "add", "ext")
    with service(catalog_url, store_dir, POLICY) as v:
        tenants = v.pool_by_ref("tenants").id
        on_ext = v.media.create(tenants, "a.ext", size=3 * MIB)
        on_default = v.media.create(tenants, "b.img", size=2 * MIB)
    assert on_ext.volume == "ext"
    want_ext = fill(on_ext.open_path, 3 * MIB, seed=1)
    want_default = fill(on_default.open_path, 2 * MIB, seed=2)
    assert vcli("fsck").code == 0

    disk.unmount()
    assert written(ext) == []

    # New media goes by the policy's next rule; with none left, a clear refusal.
    with service(catalog_url, store_dir, POLICY) as v:
        assert v.media.create(tenants, "c.ext", size=MIB).volume == "DEFAULT"
    with service(catalog_url, store_dir, "name *.ext :: ext") as v:
        with pytest.raises(VelocityError, match="volume 'ext' is offline") as refused:
            v.media.create(tenants, "d.ext", size=MIB)
        assert "is its disk mounted" in str(refused.value)
        assert [m.name for m in v.media.in_pool(tenants)] == ["a.ext", "b.img", "c.ext"]
    config = write_config(tmp_path / "velocityfs.toml", volume_policy=POLICY)
    check = vcli("volume", "policy", "check", "--pool", "tenants", "--name", "e.ext", config=config)
    assert check.stdout.startswith("DEFAULT  (line 2: all :: DEFAULT")
    assert "volume 'ext' is offline" in check.stdout
    assert written(ext) == []

    # Moves onto the volume and off it are refused; nothing is written under the mountpoint.
    for mid, target in ((on_default.id, "ext"), (on_ext.id, "DEFAULT")):
        res = vcli("media", "set-volume", mid, target, check=False)
        assert res.code == 1, res
        assert "volume 'ext' is offline" in res.stderr, res
        assert written(ext) == []
    with service(catalog_url, store_dir) as v:
        assert (v.media.get(on_ext.id).volume, v.media.get(on_default.id).volume) == (
            "ext",
            "DEFAULT",
        )
    assert sha256_of(default_path(store_dir, on_default.id)) == want_default

    # volume list: offline, and no free space read off the filesystem under the mountpoint.
    listed = {info["name"]: info for info in vcli("volume", "list", "--json").json()}
    assert (listed["ext"]["online"], listed["ext"]["free_bytes"]) == (False, None)
    assert (listed["ext"]["media"], listed["ext"]["used_bytes"]) == (1, 3 * MIB)
    assert listed["DEFAULT"]["online"] is True
    rows = {line.split()[0]: line.split() for line in vcli("volume", "list").stdout.splitlines()}
    assert rows["ext"][:5] == ["ext", "offline", "1", "3.00", "-"]
    assert rows["DEFAULT"][1] == "online"

    # fsck reports the volume and its media as offline, and --repair keeps them.
    for args in (("fsck",), ("fsck", "--repair")):
        res = vcli(*args, check=False)
        assert res.code == 1, res
        problems = [line for line in res.stdout.splitlines() if line.startswith("PROBLEM")]
        assert problems == [
            f"PROBLEM volume-offline: volume 'ext' is offline: no volume marker at "
            f"{ext / MARKER}: is its disk mounted at {ext}?",
            f"PROBLEM offline-media: media {on_ext.id} (tenants/a.ext) is on volume 'ext', "
            "which is offline: kept as it is",
        ], res
    with service(catalog_url, store_dir) as v:
        assert v.media.get(on_ext.id).size == 3 * MIB
    assert written(ext) == []

    # The disk comes back: everything is there, readable, and the volume takes bytes again.
    disk.mount()
    listed = {info["name"]: info for info in vcli("volume", "list", "--json").json()}
    assert listed["ext"]["online"] is True and listed["ext"]["free_bytes"] > 0
    assert vcli("fsck").code == 0
    assert sha256_of(default_path(store_dir, on_ext.id)) == want_ext
    vcli("media", "set-volume", on_default.id, "ext")
    assert sha256_of(volume_file(store_dir, "ext", on_default.id)) == want_default
    with service(catalog_url, store_dir, "name *.ext :: ext") as v:
        assert v.media.create(tenants, "d.ext", size=MIB).volume == "ext"
    assert vcli("fsck").code == 0


@SQLITE_ONLY
def test_the_mount_keeps_off_a_volume_whose_disk_is_not_mounted(
    loop_disk, vcli, store_dir, catalog_url, tmp_path, mount
):
    # *.only may go to ext alone: no later rule takes it.
    policy = "name *.ext *.only :: ext\n!name *.only :: DEFAULT"
    config = write_config(tmp_path / "velocityfs.toml", volume_policy=policy)
    vcli("init")
    vcli("pool", "create", "tenants", "--quota-mib", "100")
    ext = store_dir / "vol" / "ext"
    disk = loop_disk(ext)
    vcli("volume", "add", "ext")
    with service(catalog_url, store_dir) as v:
        v.accounts.add_user("alice", "pw")
        v.accounts.add_group("ops")
        v.accounts.add_member("ops", "alice")
        pid = v.pool_by_ref("tenants").id
        v.accounts.share(pid, "ops", list(PERMISSIONS))
    port = free_port()
    m = mount("--api", f"127.0.0.1:{port}", env={**os.environ, "VELOCITYFS_CONFIG": str(config)})
    data = pattern(MIB, 1)
    (m / "tenants" / "a.ext").write_bytes(data)
    assert os.getxattr(m / "tenants" / "a.ext", "user.velocity.volume") == b"ext"
    sync_dir(m / "tenants")

    disk.unmount()
    time.sleep(MARKER_CHECK_S)
    with pytest.raises(OSError) as opened:
        (m / "tenants" / "a.ext").open("rb")
    assert opened.value.errno == errno.ENODEV
    (m / "tenants" / "b.ext").write_bytes(pattern(MIB, 2))
    assert os.getxattr(m / "tenants" / "b.ext", "user.velocity.volume") == b"DEFAULT"
    with pytest.raises(OSError) as created:
        (m / "tenants" / "c.only").write_bytes(b"x")
    assert created.value.errno == errno.ENODEV
    assert not (m / "tenants" / "c.only").exists()
    assert os.statvfs(m).f_bavail > 0
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        key = http.post("/u/auth", json={"name": "alice", "password": "pw"}).json()["authkey"]
        res = http.put(f"/p/media/{key}/{pid}/d.only", content=b"refused before the body")
        assert res.status_code == 503, res.text
        assert "volume 'ext' is offline" in res.json()["error"]
        res = http.put(f"/p/media/{key}/{pid}/e.ext", content=pattern(MIB, 5))
        assert res.status_code == 200, res.text
    sync_dir(m / "tenants")
    assert os.getxattr(m / "tenants" / "e.ext", "user.velocity.volume") == b"DEFAULT"
    assert written(ext) == []
    assert sorted(os.listdir(m / "tenants")) == ["a.ext", "b.ext", "e.ext"]

    disk.mount()
    time.sleep(MARKER_CHECK_S)
    assert (m / "tenants" / "a.ext").read_bytes() == data
    (m / "tenants" / "c.only").write_bytes(pattern(MIB, 3))
    assert os.getxattr(m / "tenants" / "c.only", "user.velocity.volume") == b"ext"


def test_a_store_made_before_markers_gets_them_from_init(
    loop_disk, vcli, store_dir, catalog_url, tmp_path
):
    vcli("init")
    vcli("pool", "create", "tenants", "--quota-mib", "100")
    ext = store_dir / "vol" / "ext"
    disk = loop_disk(ext)
    vcli("volume", "add", "ext")
    with service(catalog_url, store_dir, POLICY) as v:
        tenants = v.pool_by_ref("tenants").id
        on_ext = v.media.create(tenants, "a.ext", size=MIB)
        v.media.create(tenants, "b.img", size=MIB)
    want = fill(on_ext.open_path, MIB, seed=1)
    # As an earlier version left the store: no marker anywhere.
    (store_dir / MARKER).unlink()
    (ext / MARKER).unlink()

    res = vcli("volume", "list", check=False)
    assert res.code == 1 and "has no marker" in res.stderr and "velocityfs init" in res.stderr

    # init while the volume's disk is away: the store is marked, the volume is not.
    disk.unmount()
    res = vcli("init")
    assert "warning: volume 'ext' left offline" in res.stderr, res
    assert written(ext) == []
    res = vcli("volume", "mark", "ext", check=False)
    assert res.code == 1 and "mount volume 'ext''s disk there first" in res.stderr, res
    assert written(ext) == []
    listed = {info["name"]: info for info in vcli("volume", "list", "--json").json()}
    assert listed["ext"]["online"] is False

    # With the disk back, init marks it (every media of the volume is on it).
    disk.mount()
    (ext / MARKER).unlink(missing_ok=True)
    res = vcli("init")
    assert "marked volume 'ext' (1 media on its disk)" in res.stdout, res
    assert oct((ext / MARKER).stat().st_mode & 0o777) == oct(0o600)
    listed = {info["name"]: info for info in vcli("volume", "list", "--json").json()}
    assert listed["ext"]["online"] is True
    assert sha256_of(default_path(store_dir, on_ext.id)) == want
    assert vcli("fsck").code == 0

    # A directory that is not this store's top (its disk not mounted) is never marked.
    empty = tmp_path / "empty-store"
    res = vcli("init", store=empty, check=False)
    assert res.code == 1, res
    assert "none of the 1 media the catalog has on DEFAULT" in res.stderr, res
    assert not (empty / MARKER).exists()


def test_creates_journaled_on_a_volume_whose_disk_is_away_wait_for_it(
    loop_disk, vcli, store_dir, catalog_url
):
    vcli("init")
    vcli("pool", "create", "tenants", "--quota-mib", "100")
    ext = store_dir / "vol" / "ext"
    disk = loop_disk(ext)
    vcli("volume", "add", "ext")
    # A mount journaled a create on ext and died before its batch committed.
    gone = str(uuid.uuid4())
    mid = str(uuid.uuid4())
    with service(catalog_url, store_dir) as v:
        tenants = v.pool_by_ref("tenants").id
        v.backing.create("ext", mid, MIB)
        now = time.time_ns()
        journal = CreateJournal(v.backing.top, gone)
        journal.append(
            {
                "id": mid,
                "pool_id": tenants,
                "name": "j.ext",
                "size": MIB,
                "volume": "ext",
                "mode": 0o644,
                "uid": 0,
                "gid": 0,
                "atime_ns": now,
                "mtime_ns": now,
                "ctime_ns": now,
                "changed_ns": now,
                "granted": MIB,
            }
        )
        journal.close(keep=True)
    want = fill(volume_file(store_dir, "ext", mid), MIB, seed=7)

    # The next start replays the journal while ext's disk is away: the create waits.
    disk.unmount()
    with service(catalog_url, store_dir) as v:
        v.reclaim_dead_holders()
        assert v.media.in_pool(tenants) == []
    res = vcli("fsck", "--repair", check=False)
    assert res.code == 1, res
    assert (
        f"PROBLEM unreplayed-journal: creates journaled by process {gone}, which is gone, "
        "wait for offline volume(s) ext"
    ) in res.stdout.splitlines(), res

    disk.mount()
    with service(catalog_url, store_dir) as v:
        assert v.reclaim_dead_holders() == 0
        (media,) = v.media.in_pool(tenants)
        assert (media.id, media.name, media.volume, media.size) == (mid, "j.ext", "ext", MIB)
    assert sha256_of(default_path(store_dir, mid)) == want
    assert vcli("fsck").code == 0
