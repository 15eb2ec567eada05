"""Volumes the Koji way (issue 5): the registry, the volume policy, where bytes
land, moves between volumes, a disk that fills before a quota, and fsck after
a move that was killed.

A volume NAME is the directory STORE/vol/NAME (a disk mounted there); a media's
bytes are STORE/vol/NAME/media/<2 hex>/<mid>, with a relative symlink at its
DEFAULT path STORE/media/<2 hex>/<mid>. Service and CLI tests run on both
catalogs; tests that need a mount run on SQLite only.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select
from support.admin import (
    MIB,
    InProcessCli,
    copies_of,
    default_path,
    fill,
    pattern,
    service,
    sha256_bytes,
    sha256_of,
    velocityfs_argv,
    volume_file,
    write_config,
)
from support.fs import sync_dir

from velocityfs.catalog.models import Grant, Media
from velocityfs.service.accounts import PERMISSIONS
from velocityfs.service.velocity import Velocity
from velocityfs.service.views import Creator

SQLITE_ONLY = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
VX = "user.velocity."


# -- fixtures and helpers ------------------------------------------------------------------


def setup_store(vcli: InProcessCli, store: Path, pools: dict[str, int], volumes=()) -> None:
    """init, root pools (MiB) and volumes (their directories are made here)."""
    vcli("init")
    for name, quota in pools.items():
        vcli("pool", "create", name, "--quota-mib", str(quota))
    for name in volumes:
        (store / "vol" / name).mkdir(parents=True, exist_ok=True)
        vcli("volume", "add", name)


def assert_on_volume(store: Path, mid: str, volume: str) -> None:
    """The bytes are on ``volume`` and nowhere else; DEFAULT has a relative symlink to them."""
    real = volume_file(store, volume, mid)
    dflt = default_path(store, mid)
    assert real.is_file() and not real.is_symlink(), f"{real} is not a regular file"
    expected = {str(real.relative_to(store)): "file"}
    if volume != "DEFAULT":
        assert dflt.is_symlink(), f"{dflt} should be a symlink to {real}"
        assert os.readlink(dflt) == f"../../vol/{volume}/media/{mid[:2]}/{mid}"
        assert os.path.samefile(dflt, real)
        expected[str(dflt.relative_to(store))] = "link"
    assert copies_of(store, mid) == expected


def catalog_volume(v: Velocity, mid: str) -> str:
    return v.media.get(mid).volume


def grants_on(v: Velocity, mid: str) -> int:
    with v.db.transaction() as s:
        return s.execute(
            select(func.count()).select_from(Grant).where(Grant.media_id == mid)
        ).scalar_one()


def wait_lease_gone(catalog_url: str, store: Path, mid: str, timeout: float = 10.0) -> None:
    """close() returns before FUSE's RELEASE (it is asynchronous); the lease goes with it."""
    with service(catalog_url, store) as v:
        deadline = time.monotonic() + timeout
        while grants_on(v, mid):
            assert time.monotonic() < deadline, "the writer's lease outlived its close()"
            time.sleep(0.02)


def wait_no_grants(catalog_url: str, store: Path, timeout: float = 10.0) -> None:
    """Every writer's RELEASE has been handled: no grant or lease is left."""
    with service(catalog_url, store) as v:
        deadline = time.monotonic() + timeout
        while True:
            with v.db.transaction() as s:
                if not s.execute(select(func.count()).select_from(Grant)).scalar_one():
                    return
            assert time.monotonic() < deadline, "grants outlived their writers' close()"
            time.sleep(0.02)


def make_media(
    v: Velocity, pool: str, name: str, size: int, seed: int = 0, creator: Creator | None = None
) -> tuple[str, str]:
    """Media of ``size`` real (not sparse) bytes through the service: (mid, sha256)."""
    view = v.media.create(v.pool_by_ref(pool).id, name, size=size, creator=creator)
    return view.id, fill(view.open_path, size, seed)


def mid_of(path: Path) -> str:
    return os.getxattr(path, VX + "mid").decode()


def config_env(config: Path) -> dict[str, str]:
    return {**os.environ, "VELOCITYFS_CONFIG": str(config)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the registry ---------------------------------------------------------------------------


def test_volume_add_list_rm(vcli, store_dir, catalog_url, tmpfs):
    vcli("init")
    vcli("pool", "create", "tenants", "--quota-mib", "1000")

    # The directory must exist: the operator mounts the volume's disk there first.
    res = vcli("volume", "add", "fast", check=False)
    assert res.code == 1
    assert res.stderr == (
        f"velocityfs: error: {store_dir / 'vol' / 'fast'} does not exist: "
        "mount the volume's disk there first\n"
    )
    assert [v["name"] for v in vcli("volume", "list", "--json").json()] == ["DEFAULT"]

    disk = tmpfs(store_dir / "vol" / "fast", "64m")
    res = vcli("volume", "add", "fast")
    assert res.stdout == f"added volume 'fast' at {disk}\n"
    assert (disk / "media").is_dir()  # made when missing

    res = vcli("volume", "add", "fast", check=False)
    assert res.code == 1 and res.stderr == "velocityfs: error: volume 'fast' exists\n"
    res = vcli("volume", "add", "DEFAULT", check=False)
    assert res.code == 1 and "DEFAULT" in res.stderr
    for bad in ("a/b", "..", ""):
        res = vcli("volume", "add", bad, check=False)
        assert res.code == 1 and res.stderr.startswith("velocityfs: error: "), res

    # An existing media/ is kept as it is.
    (store_dir / "vol" / "slow" / "media").mkdir(parents=True)
    (store_dir / "vol" / "slow" / "media" / "keep").write_text("x")
    vcli("volume", "add", "slow")
    assert (store_dir / "vol" / "slow" / "media" / "keep").read_text() == "x"

    with service(catalog_url, store_dir, "name *.fast :: fast\nall :: DEFAULT") as v:
        make_media(v, "tenants", "a.fast", 3 * MIB)
        v.media.create(v.pool_by_ref("tenants").id, "sparse.fast", size=5 * MIB)
        make_media(v, "tenants", "b.img", 1 * MIB)

    listed = {v["name"]: v for v in vcli("volume", "list", "--json").json()}
    assert set(listed) == {"DEFAULT", "fast", "slow"}
    for info in listed.values():
        assert set(info) == {
            "name",
            "path",
            "online",
            "offline_reason",
            "media",
            "used_bytes",
            "free_bytes",
        }
        assert (info["online"], info["offline_reason"]) == (True, None)
    fast = listed["fast"]
    # Apparent sizes count (the sparse one in full); free space is its own disk's (less
    # the block of the volume's marker).
    assert (fast["media"], fast["used_bytes"]) == (2, 8 * MIB)
    assert fast["path"] == str(disk)
    st = os.statvfs(disk)
    assert fast["free_bytes"] == st.f_bavail * st.f_frsize == 61 * MIB - 4096
    assert (listed["DEFAULT"]["media"], listed["DEFAULT"]["used_bytes"]) == (1, MIB)
    assert listed["DEFAULT"]["path"] == str(store_dir)
    top = os.statvfs(store_dir)
    assert 0 < listed["DEFAULT"]["free_bytes"] <= top.f_blocks * top.f_frsize
    assert (listed["slow"]["media"], listed["slow"]["used_bytes"]) == (0, 0)

    table = vcli("volume", "list").stdout.splitlines()
    assert table[0].split() == ["VOLUME", "STATE", "MEDIA", "USED", "MiB", "FREE", "MiB", "PATH"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    assert rows["fast"] == ["fast", "online", "2", "8.00", "61.00", str(disk)]
    assert rows["slow"][:4] == ["slow", "online", "0", "0.00"]
    assert rows["DEFAULT"][:4] == ["DEFAULT", "online", "1", "1.00"]

    # Not while media lives there; DEFAULT never; an empty one goes.
    res = vcli("volume", "rm", "fast", check=False)
    assert res.code == 1
    assert res.stderr == "velocityfs: error: volume 'fast' still holds 2 media: move them first\n"
    res = vcli("volume", "rm", "DEFAULT", check=False)
    assert res.code == 1 and res.stderr == "velocityfs: error: DEFAULT cannot be removed\n"
    res = vcli("volume", "rm", "nosuch", check=False)
    assert res.code == 1 and res.stderr == "velocityfs: error: no volume 'nosuch'\n"
    assert vcli("volume", "rm", "slow").stdout == "removed volume 'slow'\n"

    for m in vcli("media", "list", "tenants", "--json").json():
        if m["volume"] == "fast":
            vcli("media", "set-volume", m["mid"], "DEFAULT")
    vcli("volume", "rm", "fast")
    listed = {v["name"]: v for v in vcli("volume", "list", "--json").json()}
    assert set(listed) == {"DEFAULT"}
    assert (listed["DEFAULT"]["media"], listed["DEFAULT"]["used_bytes"]) == (3, 9 * MIB)
    assert vcli("fsck").code == 0


# -- the policy -----------------------------------------------------------------------------

POLICY = """\
# placement rules: first match wins
user alice :: userv
group ops admins :: groupv                # any of these groups
pool isos && name *.iso :: isov           # both must hold
pool tenants/* && !name *.tmp :: tenantv  # negation
! pool tenants* && name scratch-* :: scratchv
all :: bulk
"""
POLICY_VOLUMES = ("userv", "groupv", "isov", "tenantv", "scratchv", "bulk")

# (pool, name, user, groups) -> volume
PLACEMENTS = [
    (("tenants/acme", "disk.img", "alice", ["ops"]), "userv"),
    (("tenants/acme", "disk.img", "bob", ["admins"]), "groupv"),
    (("tenants/acme", "disk.img", "bob", ["guests", "ops"]), "groupv"),
    (("isos", "debian.iso", "bob", []), "isov"),
    (("isos", "debian.img", "bob", []), "bulk"),  # && needs both
    (("labs", "debian.iso", "bob", []), "bulk"),
    (("tenants/acme", "disk.img", "bob", []), "tenantv"),
    (("tenants/acme/dev", "disk.img", None, []), "tenantv"),
    (("tenants/acme", "disk.tmp", "bob", []), "bulk"),  # negated name test
    (("tenants", "disk.img", "bob", []), "bulk"),  # tenants/* wants a subpool
    (("labs", "scratch-1.img", "bob", []), "scratchv"),
    (("tenants", "scratch-1.img", "bob", []), "bulk"),  # ! pool tenants*
    (("tenants/acme", "scratch-1.img", "bob", []), "tenantv"),  # first match wins
    (("labs", "x.img", None, []), "bulk"),
]


def test_policy_check_through_config_file(vcli, store_dir, catalog_url, tmp_path):
    config = write_config(
        tmp_path / "velocityfs.toml",
        store=str(store_dir),
        catalog=catalog_url,
        volume_policy=POLICY,
    )
    vcli("init", config=config, flags=False)
    for name in POLICY_VOLUMES:
        (store_dir / "vol" / name).mkdir(parents=True)
        vcli("volume", "add", name, config=config, flags=False)
    assert vcli("config", "check", config=config, flags=False).code == 0

    for (pool, name, user, groups), volume in PLACEMENTS:
        args = ["volume", "policy", "check", "--pool", pool, "--name", name]
        if user:
            args += ["--user", user]
        for group in groups:
            args += ["--group", group]
        res = vcli(*args, config=config, flags=False)
        assert res.stdout.split()[0] == volume, (pool, name, user, groups, res.stdout)
        assert res.stderr == ""
    # The reason names the rule that matched (lines count from the policy's first).
    res = vcli(
        "volume", "policy", "check", "--pool", "isos", "--name", "a.iso", config=config, flags=False
    )
    assert res.stdout == "isov  (line 4: pool isos && name *.iso :: isov)\n"
    res = vcli(
        "volume",
        "policy",
        "check",
        "--pool",
        "tenants/a",
        "--name",
        "x",
        "--user",
        "bob",
        config=config,
        flags=False,
    )
    assert res.stdout == "tenantv  (line 5: pool tenants/* && !name *.tmp :: tenantv)\n"

    # The default policy without a configuration file: everything on DEFAULT.
    res = vcli("volume", "policy", "check", "--pool", "isos", "--name", "a.iso")
    assert res.stdout == "DEFAULT  (line 1: all :: DEFAULT)\n"


def test_policy_places_media_created_through_the_service(vcli, store_dir, catalog_url):
    setup_store(vcli, store_dir, {"tenants": 1000, "isos": 1000, "labs": 1000}, POLICY_VOLUMES)
    vcli("pool", "create", "tenants/acme")
    vcli("pool", "create", "tenants/acme/dev")
    with service(catalog_url, store_dir, POLICY) as v:
        assert v.policy.error is None
        for (pool, name, user, groups), volume in PLACEMENTS:
            view = v.media.create(
                v.pool_by_ref(pool).id, name, size=MIB, creator=Creator(user, frozenset(groups))
            )
            assert view.volume == volume, (pool, name, user, groups)
            assert catalog_volume(v, view.id) == volume
            assert_on_volume(store_dir, view.id, volume)
            assert view.backing_path == str(volume_file(store_dir, volume, view.id))
            assert view.open_path == str(default_path(store_dir, view.id))
            with open(view.open_path, "r+b") as f:  # the DEFAULT path reaches the bytes
                f.write(b"hello")
            assert volume_file(store_dir, volume, view.id).read_bytes()[:5] == b"hello"
            # removal takes the file and its symlink (the next row reuses the name)
            v.media.remove(view.id)
            assert copies_of(store_dir, view.id) == {}
        kept = v.media.create(
            v.pool_by_ref("isos").id,
            "keep.iso",
            size=MIB,
            creator=Creator("carol", frozenset({"staff"})),
        )
        assert_on_volume(store_dir, kept.id, "isov")
    listed = {v["name"]: v["media"] for v in vcli("volume", "list", "--json").json()}
    assert listed == {"DEFAULT": 0, **dict.fromkeys(POLICY_VOLUMES, 0), "isov": 1}
    assert vcli("fsck").code == 0


@SQLITE_ONLY
def test_a_writers_creates_placed_by_policy_stay_in_one_batch(vcli, store_dir, catalog_url):
    """Asking the policy reads the catalog (pool paths, the volume list). Read in a unit
    of work of its own it committed the batch on every create; now it is read inside
    the create's unit, and every placement of the table shares one commit."""
    setup_store(vcli, store_dir, {"tenants": 1000, "isos": 1000, "labs": 1000}, POLICY_VOLUMES)
    vcli("pool", "create", "tenants/acme")
    vcli("pool", "create", "tenants/acme/dev")
    with service(catalog_url, store_dir, POLICY) as v:
        pools = {pool: v.pool_by_ref(pool).id for (pool, *_), _volume in PLACEMENTS}
        holder = v.register_writer()
        try:
            commits = v.db.commits
            made = []
            for i, ((pool, name, user, groups), volume) in enumerate(PLACEMENTS):
                stem, ext = os.path.splitext(name)  # names repeat in the table
                view, _granted = v.media.create_open(
                    pools[pool],
                    f"{stem}-{i}{ext}",
                    holder_id=holder,
                    creator=Creator(user, frozenset(groups)),
                )
                assert view.volume == volume, (pool, name, user, groups)
                assert v.media.batch_pending
                made.append((view.id, volume))
            assert v.db.commits == commits
            v.media.commit_batch()
            assert v.db.commits == commits + 1
        finally:
            v.media.end_creates()
        for mid, volume in made:
            assert catalog_volume(v, mid) == volume
            assert_on_volume(store_dir, mid, volume)
    assert vcli("fsck").code == 0


# policy -> (the service's warning, the reason `volume policy check` gives)
BROKEN_POLICIES = {
    "unparsable": (
        "pool tenants/* :: fast\nthis line has no arrow\n",
        "volume policy is broken (policy line 2: missing ':: VOLUME'",
        "policy is broken (policy line 2: missing ':: VOLUME'",
    ),
    "unknown-volume": (
        "pool tenants :: nosuch\nall :: fast\n",
        "volume policy line 1 names unknown volume 'nosuch': DEFAULT used",
        "line 1 (pool tenants :: nosuch) names unknown volume 'nosuch': DEFAULT",
    ),
    "matches-nothing": (
        "user alice :: fast\n",
        "volume policy matched nothing",
        "no rule matched: DEFAULT",
    ),
}


@pytest.mark.parametrize("kind", list(BROKEN_POLICIES))
def test_broken_policy_puts_media_on_default(kind, vcli, store_dir, catalog_url, tmp_path, caplog):
    text, warning, reason = BROKEN_POLICIES[kind]
    setup_store(vcli, store_dir, {"tenants": 100}, ["fast"])
    caplog.set_level(logging.WARNING, logger="velocityfs.service.policy")
    with service(catalog_url, store_dir, text) as v:
        view = v.media.create(
            v.pool_by_ref("tenants").id,
            "disk.img",
            size=MIB,
            creator=Creator("bob", frozenset({"ops"})),
        )
    assert view.volume == "DEFAULT"
    assert_on_volume(store_dir, view.id, "DEFAULT")
    assert any(
        r.levelno == logging.WARNING and warning in r.getMessage() for r in caplog.records
    ), caplog.text

    config = write_config(tmp_path / "broken.toml", volume_policy=text)
    res = vcli("volume", "policy", "check", "--pool", "tenants", "--name", "x.img", config=config)
    assert res.stdout.startswith("DEFAULT  (") and reason in res.stdout, res
    if kind == "unparsable":
        assert res.stderr.startswith("warning: policy line 2: missing ':: VOLUME'")
        # config check still says what is wrong with it
        res = vcli("config", "check", config=config, check=False)
        assert res.code == 1
        assert res.stderr == (
            f"{config}: 'volume_policy': policy line 2: missing ':: VOLUME' in "
            "'this line has no arrow'\n"
        )


# -- creations through the mount, and where media shows it lives ----------------------------

MOUNT_POLICY = """\
user alice :: slow
user nobody && group nogroup :: fast
user root && pool tenants/* && !name *.iso :: fast
group root && name *.iso :: isov
pool scratch :: DEFAULT
all :: slow
"""


@SQLITE_ONLY
def test_mount_creations_follow_policy_and_show_their_volume(
    vcli, store_dir, catalog_url, tmp_path, mount
):
    config = write_config(tmp_path / "velocityfs.toml", volume_policy=MOUNT_POLICY)
    setup_store(vcli, store_dir, {"tenants": 1000, "scratch": 100}, ["fast", "slow", "isov"])
    with service(catalog_url, store_dir) as v:
        v.accounts.add_user("alice", "pw")
        v.accounts.add_group("ops")
        v.accounts.add_member("ops", "alice")
        for pool in ("tenants", "scratch"):
            v.accounts.share(v.pool_by_ref(pool).id, "ops", list(PERMISSIONS))
    port = free_port()
    m = mount("--api", f"127.0.0.1:{port}", "--allow-other", env=config_env(config))
    (m / "tenants" / "acme").mkdir()
    files = {  # created by root (uid 0, group root) through the mount
        "tenants/acme/disk.img": "fast",
        "tenants/acme/debian.iso": "isov",
        "scratch/debian.iso": "isov",
        "scratch/a.img": "DEFAULT",
        "tenants/top.img": "slow",
    }
    data = {}
    for n, rel in enumerate(files):
        data[rel] = pattern(MIB + 4096 * n, seed=n)
        (m / rel).write_bytes(data[rel])
    for rel, volume in files.items():
        path = m / rel
        sync_dir(path.parent)  # asked by mid below, the CLI cannot tell the mount to commit
        mid = mid_of(path)
        assert_on_volume(store_dir, mid, volume)
        assert os.getxattr(path, VX + "volume").decode() == volume
        backing = os.getxattr(path, VX + "backing_path").decode()
        assert backing == str(volume_file(store_dir, volume, mid))
        assert Path(backing).read_bytes() == data[rel] == path.read_bytes()
        assert default_path(store_dir, mid).read_bytes() == data[rel]

        # media show, by mid and by mount path, as a table and as JSON
        by_mid = vcli("media", "show", mid, "--json").json()
        by_path = vcli("media", "show", str(path), "--json").json()
        assert (
            by_mid
            == by_path
            == {
                "mid": mid,
                "name": path.name,
                "pool": str(Path(rel).parent),
                "pid": os.getxattr(path.parent, VX + "pid").decode(),
                "size_bytes": len(data[rel]),
                "volume": volume,
                "backing_path": backing,
                "default_path": str(default_path(store_dir, mid)),
            }
        )
        table = dict(
            line.strip().split(": ", 1)
            for line in vcli("media", "show", str(path)).stdout.splitlines()
        )
        assert table["volume"] == volume and table["backing_path"] == backing
        assert table["mid"] == mid
    # Another Unix user creating through the mount is whom the policy sees (in pools
    # whose modes let it: the kernel checks them).
    for pool in ("tenants/acme", "scratch"):
        os.chmod(m / pool, 0o777)
    for rel in ("tenants/acme/nobody.iso", "scratch/nobody.img"):
        path = m / rel
        res = subprocess.run(
            ["/bin/sh", "-c", f"printf nobody > {path.name}"],
            cwd=path.parent,  # entered as root, before the switch to nobody
            user="nobody",
            group="nogroup",
            extra_groups=[],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert res.returncode == 0, res.stderr
        assert (os.stat(path).st_uid, os.stat(path).st_gid) == (65534, 65534)
        assert_on_volume(store_dir, mid_of(path), "fast")
        assert path.read_bytes() == b"nobody"
    res = vcli("media", "show", str(m / "tenants"), check=False)
    assert res.code == 1 and "is not media in a velocityfs mount" in res.stderr
    res = vcli("media", "show", "00000000-0000-0000-0000-000000000000", check=False)
    assert res.code == 1 and res.stderr.startswith("velocityfs: error: no media")

    # The API's listing says the same.
    base = f"http://127.0.0.1:{port}"
    with httpx.Client(base_url=base, timeout=30) as http:
        key = http.post("/u/auth", json={"name": "alice", "password": "pw"}).json()["authkey"]
        for pool in ("tenants/acme", "scratch"):
            pid = os.getxattr(m / pool, VX + "pid").decode()
            res = http.request("GET", "/p/media", json={"authkey": key, "pid": pid})
            assert res.status_code == 200, res.text
            listed = {e["filename"]: e for e in res.json()["media"]}
            for rel, volume in files.items():
                if str(Path(rel).parent) != pool:
                    continue
                entry = listed[Path(rel).name]
                assert entry["volume"] == volume
                assert entry["backing_path"] == str(volume_file(store_dir, volume, entry["mid"]))
        # alice creates through the API: her own rule sends it to slow
        pid = os.getxattr(m / "tenants" / "acme", VX + "pid").decode()
        res = http.put(
            "/p/media", json={"authkey": key, "pid": pid, "filename": "api.iso", "size_mib": 1}
        )
        assert res.status_code == 200, res.text
        assert_on_volume(store_dir, res.json()["mid"], "slow")
        assert os.getxattr(m / "tenants" / "acme" / "api.iso", VX + "volume") == b"slow"
        # ... and so does her upload, streamed on the volume's own disk
        body = pattern(3 * MIB + 1, seed=21)
        res = http.put(f"/p/media/{key}/{pid}/upload.img", content=body)
        assert res.status_code == 200, res.text
        mid = res.json()["mid"]
        assert_on_volume(store_dir, mid, "slow")
        assert volume_file(store_dir, "slow", mid).read_bytes() == body
        assert (m / "tenants" / "acme" / "upload.img").read_bytes() == body
        assert not list(store_dir.rglob(".uploads/*/*"))
    assert "WARNING" not in m.log, m.log


@SQLITE_ONLY
def test_broken_policy_in_the_mount_warns_and_uses_default(vcli, store_dir, tmp_path, mount):
    setup_store(vcli, store_dir, {"tenants": 100, "other": 100}, ["fast"])
    broken = write_config(tmp_path / "broken.toml", volume_policy="all :: fast\nnot a rule\n")
    m = mount(env=config_env(broken))
    (m / "tenants" / "a.img").write_bytes(b"a" * 1000)
    assert_on_volume(store_dir, mid_of(m / "tenants" / "a.img"), "DEFAULT")
    assert os.getxattr(m / "tenants" / "a.img", VX + "volume") == b"DEFAULT"
    assert "WARNING velocityfs.service.policy: volume policy is broken (policy line 2" in m.log
    m.stop()

    odd = write_config(
        tmp_path / "odd.toml", volume_policy="pool tenants :: gone\npool nothing :: fast\n"
    )
    m = mount(env=config_env(odd))
    (m / "tenants" / "b.img").write_bytes(b"b" * 1000)
    (m / "other" / "c.img").write_bytes(b"c" * 1000)
    assert_on_volume(store_dir, mid_of(m / "tenants" / "b.img"), "DEFAULT")
    assert_on_volume(store_dir, mid_of(m / "other" / "c.img"), "DEFAULT")
    assert "volume policy line 1 names unknown volume 'gone': DEFAULT used" in m.log
    assert "volume policy matched nothing" in m.log
    assert vcli("fsck").code == 0


# -- moves ----------------------------------------------------------------------------------


@SQLITE_ONLY
def test_move_to_volumes_and_back_to_default(vcli, store_dir, catalog_url, mount):
    setup_store(vcli, store_dir, {"tenants": 1000}, ["fast", "slow"])
    m = mount()
    disk = m / "tenants" / "disk.img"
    data = pattern(24 * MIB + 123, seed=7)
    disk.write_bytes(data)
    want = sha256_bytes(data)
    mid = mid_of(disk)
    dflt = default_path(store_dir, mid)
    assert_on_volume(store_dir, mid, "DEFAULT")

    steps = [("fast", str(disk)), ("slow", mid), ("DEFAULT", str(disk)), ("slow", mid)]
    previous = "DEFAULT"
    for target, ref in steps:
        res = vcli("media", "set-volume", ref, target)
        assert res.stdout.splitlines()[-1] == (
            f"moved {mid} from {previous} to {target}: {volume_file(store_dir, target, mid)}"
        )
        assert_on_volume(store_dir, mid, target)  # old copy gone, symlink as Koji has it
        assert sha256_of(disk) == want  # through the mount
        assert sha256_of(dflt) == want  # through the DEFAULT path
        assert sha256_of(volume_file(store_dir, target, mid)) == want
        assert os.getxattr(disk, VX + "volume").decode() == target
        assert os.getxattr(disk, VX + "backing_path").decode() == str(
            volume_file(store_dir, target, mid)
        )
        assert vcli("media", "show", mid, "--json").json()["volume"] == target
        previous = target
    # back to DEFAULT: the symlink is replaced by the file itself
    vcli("media", "set-volume", mid, "DEFAULT")
    assert_on_volume(store_dir, mid, "DEFAULT")
    assert not dflt.is_symlink() and sha256_of(dflt) == want
    assert not list((store_dir / "vol").glob("*/media/*/*"))

    # a move to where it already is changes nothing; unknown targets are refused
    res = vcli("media", "set-volume", mid, "DEFAULT")
    assert_on_volume(store_dir, mid, "DEFAULT")
    res = vcli("media", "set-volume", mid, "nosuch", check=False)
    assert res.code == 1 and res.stderr == "velocityfs: error: no volume 'nosuch'\n"
    # usage did not change along the way; the mount still writes to it
    with open(disk, "r+b") as f:
        f.seek(0, os.SEEK_END)
        f.write(b"tail")
    assert disk.read_bytes() == data + b"tail"
    sync_dir(disk.parent)
    pools = {p["path"]: p for p in vcli("pool", "list", "--json").json()}
    assert pools["tenants"]["used_bytes"] == len(data) + 4
    assert vcli("fsck").code == 0


@SQLITE_ONLY
def test_move_while_open_for_reading(vcli, store_dir, mount):
    setup_store(vcli, store_dir, {"tenants": 1000}, ["fast"])
    m = mount()
    disk = m / "tenants" / "disk.img"
    data = pattern(48 * MIB, seed=3)
    disk.write_bytes(data)
    mid = mid_of(disk)
    errors: list[str] = []
    reads = {"during": 0}
    moving = threading.Event()
    stop = threading.Event()

    fd = os.open(disk, os.O_RDONLY)
    try:

        def reader() -> None:
            rnd = random.Random(1)
            while not stop.is_set():
                off = rnd.randrange(0, len(data) - MIB)
                chunk = os.pread(fd, MIB, off)
                if chunk != data[off : off + MIB]:
                    errors.append(f"wrong bytes at {off}")
                if moving.is_set():
                    reads["during"] += 1

        thread = threading.Thread(target=reader)
        thread.start()
        try:
            for target in ("fast", "DEFAULT", "fast"):
                moving.set()
                vcli("media", "set-volume", mid, target)
                moving.clear()
                assert_on_volume(store_dir, mid, target)
        finally:
            stop.set()
            thread.join(60)
        assert not errors, errors[:5]
        assert reads["during"] > 0
        # the same descriptor still reads every byte after the moves
        whole = b"".join(os.pread(fd, 4 * MIB, off) for off in range(0, len(data), 4 * MIB))
        assert sha256_bytes(whole) == sha256_bytes(data)
    finally:
        os.close(fd)
    assert sha256_of(disk) == sha256_bytes(data)
    assert sha256_of(default_path(store_dir, mid)) == sha256_bytes(data)


@SQLITE_ONLY
def test_move_while_open_for_writing_is_refused_until_closed(vcli, store_dir, catalog_url, mount):
    setup_store(vcli, store_dir, {"tenants": 1000}, ["fast"])
    m = mount()
    disk = m / "tenants" / "disk.img"
    data = pattern(20 * MIB + 5, seed=11)
    fd = os.open(disk, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.write(fd, data[: 8 * MIB])
        mid = mid_of(disk)
        for ref in (mid, str(disk)):
            res = vcli("media", "set-volume", ref, "fast", "--wait", "0.3", check=False)
            assert res.code == 1
            assert res.stderr == (
                "velocityfs: error: the media is open for writing: close it and try again\n"
            )
        assert_on_volume(store_dir, mid, "DEFAULT")
        view = memoryview(data)
        off = 8 * MIB
        while off < len(data):
            off += os.write(fd, view[off : off + MIB])
        # a read-only opener next to the writer changes nothing
        with open(disk, "rb") as f:
            assert f.read(MIB) == data[:MIB]
        res = vcli("media", "set-volume", mid, "fast", "--wait", "0.3", check=False)
        assert res.code == 1 and "open for writing" in res.stderr
    finally:
        os.close(fd)
    wait_lease_gone(catalog_url, store_dir, mid)
    vcli("media", "set-volume", str(disk), "fast")
    assert_on_volume(store_dir, mid, "fast")
    assert sha256_of(disk) == sha256_bytes(data)
    assert sha256_of(default_path(store_dir, mid)) == sha256_bytes(data)
    shown = vcli("media", "show", mid, "--json").json()
    assert (shown["size_bytes"], shown["volume"]) == (len(data), "fast")
    assert vcli("fsck").code == 0


def test_move_refused_when_the_target_disk_lacks_room(vcli, store_dir, catalog_url, tmpfs):
    setup_store(vcli, store_dir, {"tenants": 2000})
    small = tmpfs(store_dir / "vol" / "small", "8m")
    vcli("volume", "add", "small")
    with service(catalog_url, store_dir) as v:
        mid, want = make_media(v, "tenants", "big.img", 20 * MIB)
        sparse = v.media.create(v.pool_by_ref("tenants").id, "sparse.img", size=1 << 30)
    res = vcli("media", "set-volume", mid, "small", check=False)
    assert res.code == 1
    free = os.statvfs(small).f_bavail * os.statvfs(small).f_frsize
    found = re.fullmatch(
        r"velocityfs: error: volume 'small' has (\d+) bytes free, (\d+) needed\n", res.stderr
    )
    assert found, res.stderr
    assert int(found[1]) == free and int(found[2]) >= 20 * MIB
    assert_on_volume(store_dir, mid, "DEFAULT")
    assert not list((small / "media").rglob("*.moving"))
    assert sha256_of(default_path(store_dir, mid)) == want
    # Holes are no bytes: a 1 GiB sparse disk fits on 8 MiB, and stays sparse.
    vcli("media", "set-volume", sparse.id, "small")
    assert_on_volume(store_dir, sparse.id, "small")
    st = os.stat(volume_file(store_dir, "small", sparse.id))
    assert st.st_size == 1 << 30 and st.st_blocks == 0
    assert vcli("fsck").code == 0


# -- disks and df ---------------------------------------------------------------------------


@SQLITE_ONLY
def test_volume_disk_fills_before_the_quota(tmpfs, vcli, store_dir, catalog_url, tmp_path, mount):
    setup_store(vcli, store_dir, {"tenants": 1000})
    tmpfs(store_dir / "vol" / "small", "8m")
    vcli("volume", "add", "small")
    config = write_config(tmp_path / "velocityfs.toml", volume_policy="name *.img :: small")
    m = mount(env=config_env(config))
    disk = m / "tenants" / "disk.img"
    data = pattern(20 * MIB, seed=5)
    written, failure = 0, None
    fd = os.open(disk, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while written < len(data):
            try:
                written += os.write(fd, data[written : written + MIB])
            except OSError as exc:
                failure = exc
                break
    finally:
        os.close(fd)
    assert failure is not None and failure.errno == errno.ENOSPC, failure
    assert 4 * MIB < written <= 8 * MIB
    mid = mid_of(disk)
    assert os.getxattr(disk, VX + "volume") == b"small"
    assert os.stat(disk).st_size == written
    assert disk.read_bytes() == data[:written]
    assert volume_file(store_dir, "small", mid).read_bytes() == data[:written]
    wait_lease_gone(catalog_url, store_dir, mid)
    pools = {p["path"]: p for p in vcli("pool", "list", "--json").json()}
    assert pools["tenants"]["used_bytes"] == written
    assert int(os.getxattr(m / "tenants", VX + "used_bytes")) == written
    res = vcli("fsck")
    assert res.stdout.splitlines()[-1] == "0 repaired, 0 remaining"
    # room comes back when the file goes
    disk.unlink()
    (m / "tenants" / "again.img").write_bytes(data[: 2 * MIB])
    assert (m / "tenants" / "again.img").read_bytes() == data[: 2 * MIB]


def df_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def disk_free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@SQLITE_ONLY
def test_df_on_the_mount_reflects_room(tmpfs, vcli, store_dir, tmp_path, mount):
    setup_store(vcli, store_dir, {"tenants": 100, "isos": 50})
    vcli("pool", "create", "tenants/acme", "--quota-mib", "80")
    m = mount()
    assert df_bytes(m.path) == 150 * MIB
    (m / "tenants" / "acme" / "a.img").write_bytes(pattern(10 * MIB))
    (m / "isos" / "b.iso").write_bytes(pattern(30 * MIB + 5))
    wait_no_grants(vcli.catalog, store_dir)
    rooms = {
        p["path"]: (p["quota_bytes"], p["used_bytes"])
        for p in vcli("pool", "list", "--json").json()
    }
    room = sum(q - u for path, (q, u) in rooms.items() if "/" not in path)
    shown = df_bytes(m.path)
    assert shown <= room and shown <= disk_free(store_dir)
    assert shown == room // 4096 * 4096 == (150 - 40) * MIB - 4096
    st = os.statvfs(m.path)
    assert st.f_blocks * st.f_frsize == 150 * MIB
    m.stop()

    # A store whose disk is smaller than its quotas: df shows the disk's room.
    small_store = tmpfs(tmp_path / "small-store", "16m")
    small_catalog = f"sqlite:///{tmp_path}/small.sqlite"
    vcli("init", catalog=small_catalog, store=small_store)
    vcli(
        "pool", "create", "tenants", "--quota-mib", "100", catalog=small_catalog, store=small_store
    )
    m = mount(catalog=small_catalog, store=small_store)
    assert df_bytes(m.path) <= disk_free(small_store) <= 16 * MIB
    assert df_bytes(m.path) >= 15 * MIB
    (m / "tenants" / "x.img").write_bytes(pattern(6 * MIB))
    shown = df_bytes(m.path)
    assert shown <= disk_free(small_store) and shown <= 94 * MIB
    assert shown <= 10 * MIB


# -- fsck after an interrupted move ---------------------------------------------------------


def fsck_lines(vcli: InProcessCli, *args: str) -> tuple[int, list[str]]:
    res = vcli("fsck", *args, check=False)
    return res.code, res.stdout.splitlines()


@pytest.mark.parametrize("state", ["a-staging-left", "b-default-linked", "c-linked-not-committed"])
def test_fsck_repairs_an_interrupted_move(state, vcli, store_dir, catalog_url):
    setup_store(vcli, store_dir, {"tenants": 1000}, ["A", "B"])
    policy = "all :: A" if state.startswith("c") else "all :: DEFAULT"
    with service(catalog_url, store_dir, policy) as v:
        mid, want = make_media(v, "tenants", "disk.img", 6 * MIB + 17, seed=2)
    source = "A" if state.startswith("c") else "DEFAULT"
    assert_on_volume(store_dir, mid, source)
    src = volume_file(store_dir, source, mid)
    final_b = volume_file(store_dir, "B", mid)
    dflt = default_path(store_dir, mid)
    final_b.parent.mkdir(parents=True, exist_ok=True)

    def link_default_to_b() -> None:
        staging = dflt.with_suffix(".tmp-link")
        os.symlink(f"../../vol/B/media/{mid[:2]}/{mid}", staging)
        os.replace(staging, dflt)

    if state.startswith("a"):
        # killed during the copy: half a staging file on the target
        moving = final_b.with_suffix(".moving")
        moving.write_bytes(src.read_bytes()[: 3 * MIB])
        code, lines = fsck_lines(vcli)
        assert code == 1
        assert lines[:-1] == [
            f"PROBLEM orphan-file: {moving}: leftover of an interrupted move or link"
        ]
        assert lines[-1] == "0 repaired, 1 remaining"
        code, lines = fsck_lines(vcli, "--repair")
        assert code == 0 and lines[-1] == "1 repaired, 0 remaining"
        assert not moving.exists()
        expected = source
    elif state.startswith("b"):
        # copy renamed into place, DEFAULT path already a symlink, catalog not switched
        shutil.copyfile(src, final_b)
        link_default_to_b()
        code, lines = fsck_lines(vcli)
        assert code == 1
        assert lines[:-1] == [
            f"PROBLEM interrupted-move: media {mid} (tenants/disk.img): catalog says volume "
            "DEFAULT, the bytes are on B"
        ]
        # While a live writer holds the media, fsck leaves it alone: B's file is the
        # only copy, not a stray one to delete.
        with service(catalog_url, store_dir) as v:
            writer = v.ledger.register_holder()
            v.ledger.hold(mid, writer)
            code, lines = fsck_lines(vcli, "--repair")
            assert lines == ["0 repaired, 0 remaining"]
            assert sha256_of(final_b) == want
            v.ledger.settle(mid, writer, 6 * MIB + 17)
            v.ledger.retire_holder(writer)
        code, lines = fsck_lines(vcli, "--repair")
        assert code == 0 and lines[-1] == "1 repaired, 0 remaining"
        expected = "B"  # the one authoritative copy is finished, not rolled back
    else:
        # A -> B: renamed and linked, then killed before the commit
        shutil.copyfile(src, final_b)
        link_default_to_b()
        code, lines = fsck_lines(vcli)
        assert code == 1
        assert sorted(lines[:-1]) == sorted(
            [
                f"PROBLEM volume-symlink: media {mid} (tenants/disk.img): DEFAULT path {dflt} "
                f"should link to ../../vol/A/media/{mid[:2]}/{mid} "
                f"(-> ../../vol/B/media/{mid[:2]}/{mid})",
                f"PROBLEM stray-copy: {final_b}: a second copy of media {mid}, which lives on A "
                "(a move was interrupted)",
            ]
        )
        code, lines = fsck_lines(vcli, "--repair")
        assert code == 0 and lines[-1] == "2 repaired, 0 remaining"
        expected = "A"  # rolled back
    with service(catalog_url, store_dir) as v:
        assert catalog_volume(v, mid) == expected
    assert_on_volume(store_dir, mid, expected)
    assert sha256_of(dflt) == want
    assert sha256_of(volume_file(store_dir, expected, mid)) == want
    code, lines = fsck_lines(vcli)
    assert code == 0 and lines == ["0 repaired, 0 remaining"]
    pools = {p["path"]: p for p in vcli("pool", "list", "--json").json()}
    assert pools["tenants"]["used_bytes"] == 6 * MIB + 17
    # and the media moves on normally afterwards
    vcli("media", "set-volume", mid, "B" if expected != "B" else "DEFAULT")
    assert sha256_of(dflt) == want


def test_killed_move_then_fsck_leaves_one_copy(vcli, store_dir, catalog_url):
    setup_store(vcli, store_dir, {"tenants": 1000}, ["B"])
    size = 300 * MIB
    with service(catalog_url, store_dir) as v:
        mid, want = make_media(v, "tenants", "big.img", size, seed=9)
    assert os.stat(default_path(store_dir, mid)).st_blocks * 512 >= size  # no holes
    staging = volume_file(store_dir, "B", mid).with_suffix(".moving")
    proc = subprocess.Popen(
        velocityfs_argv(catalog_url, store_dir, "media", "set-volume", mid, "B"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        seen = 0
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                seen = staging.stat().st_size
                if 0 < seen < size:
                    break
            time.sleep(0.001)
        assert 0 < seen < size, f"never caught the copy in progress ({seen} bytes)"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert staging.exists()  # what a crash mid-copy leaves

    code, lines = fsck_lines(vcli)
    assert code == 1 and lines[-1].endswith("remaining") and not lines[-1].endswith(" 0 remaining")
    assert any("orphan-file" in line and str(staging) in line for line in lines), lines
    code, lines = fsck_lines(vcli, "--repair")
    assert code == 0, lines
    with service(catalog_url, store_dir) as v:
        volume = catalog_volume(v, mid)
        with v.db.transaction() as s:
            size_in_catalog = s.execute(select(Media.size).where(Media.id == mid)).scalar_one()
    assert volume == "DEFAULT"  # killed before the switch: nothing moved
    assert_on_volume(store_dir, mid, volume)  # exactly one copy, no staging left
    assert size_in_catalog == size
    assert sha256_of(default_path(store_dir, mid)) == want
    code, lines = fsck_lines(vcli)
    assert code == 0 and lines == ["0 repaired, 0 remaining"]
    # the move can simply be run again
    vcli("media", "set-volume", mid, "B")
    assert_on_volume(store_dir, mid, "B")
    assert sha256_of(default_path(store_dir, mid)) == want
    assert json.loads(vcli("media", "show", mid, "--json").stdout)["volume"] == "B"
