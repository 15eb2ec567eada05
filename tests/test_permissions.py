"""Who may do what with the media: through the mount, and in the store.

A. The kernel checks modes, owners and groups on the mount (FUSE's
``default_permissions``, always on; the daemon checks none itself). As another
uid on an ``allow_other`` mount, whatever root's modes refuse is refused, with
the errno ext4 gives for the same uid and modes (a plain directory of the host
is the reference), and nothing changes; what the modes allow works. The option
cannot be turned off any more, by flag, configuration key or fstab.

B. Backing files are 0600 however they were made: a create on the mount (its
own file, or a spare renamed into place), an upload or a create through the
API, a move between volumes, a journal replayed after kill -9, fsck --repair.
The umask is 0 while they are made, so it cannot hide a mode left to it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from support.admin import write_config
from support.api import free_port
from support.fs import MIB, sync_dir, vattr

from velocityfs.cli.mount_helper import daemon_command
from velocityfs.service.accounts import PERMISSIONS
from velocityfs.store.backing import BackingStore
from velocityfs.store.journal import journals, read_journal

SQLITE_ONLY = pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
NOBODY = 65534
ALWAYS_CHECKED = "the kernel always checks modes, owners and groups on the mount"


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user can reach (tmp_path's parents are root's, 0700).

    Request it before ``mount``: it is then removed after the mounts in it are gone,
    and never while anything is mounted in it.
    """
    path = Path(tempfile.mkdtemp(prefix="velocityfs-perm-"))
    path.chmod(0o755)
    yield path
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        if any(line.split()[4].startswith(f"{path}/") for line in f):
            return
    shutil.rmtree(path)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def super_options(path: Path) -> set[str]:
    """The FUSE options of the mount on ``path``, from /proc/self/mountinfo."""
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if left.split()[4] == os.path.realpath(path):
                found = set(right.split()[2].split(","))
    assert found is not None, f"nothing mounted on {path}"
    return found


# -- A: the kernel checks modes and owners -----------------------------------------------

# Run by a child that starts as root (so it may run this interpreter) and becomes
# nobody before doing anything; prints {operation: errno, 0 if it succeeded}.
AS_NOBODY = r"""
import json, os, sys
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
root = sys.argv[1]

VX = "user.velocity."

def p(rel):
    return os.path.join(root, rel)

def read(rel):
    with open(p(rel), "rb") as f:
        return f.read()

def append(rel):
    fd = os.open(p(rel), os.O_WRONLY | os.O_APPEND)
    try:
        os.write(fd, b"+nobody")
    finally:
        os.close(fd)

def create(rel):
    fd = os.open(p(rel), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        os.write(fd, b"nobody's")
    finally:
        os.close(fd)

def open_truncating(rel):
    os.close(os.open(p(rel), os.O_WRONLY | os.O_TRUNC))

results = {}
for name, code in json.load(sys.stdin):
    try:
        eval(code)
        results[name] = 0
    except OSError as exc:
        results[name] = exc.errno
json.dump(results, sys.stdout)
"""

# private/ is root's 0700 pool, shared/ root's 0755 pool, public/ a 0777 pool; in them
# root's media private/disk.img and shared/disk.img (0600), shared/open.img (0644).
REFUSED = {
    "read root's 0600 media": "read('shared/disk.img')",
    "read in root's 0700 pool": "read('private/disk.img')",
    "append to root's 0600 media": "append('shared/disk.img')",
    "append to root's 0644 media": "append('shared/open.img')",
    "open root's 0600 media with O_TRUNC": "open_truncating('shared/disk.img')",
    "truncate root's 0600 media": "os.truncate(p('shared/disk.img'), 0)",
    "truncate root's 0644 media": "os.truncate(p('shared/open.img'), 0)",
    "create in root's 0700 pool": "create('private/new.img')",
    "create in root's 0755 pool": "create('shared/new.img')",
    "mkdir in root's 0700 pool": "os.mkdir(p('private/sub'))",
    "mkdir at the mount root": "os.mkdir(p('newpool'))",
    "list root's 0700 pool": "os.listdir(p('private'))",
    "rename root's media in its pool": "os.rename(p('shared/disk.img'), p('shared/x.img'))",
    "rename root's media into a 0777 pool": (
        "os.rename(p('shared/disk.img'), p('public/stolen.img'))"
    ),
    "rename in root's 0700 pool": "os.rename(p('private/disk.img'), p('private/x.img'))",
    "rename root's pool": "os.rename(p('private'), p('public/private'))",
    "unlink root's media": "os.unlink(p('shared/disk.img'))",
    "unlink in root's 0700 pool": "os.unlink(p('private/disk.img'))",
    "rmdir root's pool": "os.rmdir(p('private'))",
    "chmod root's media": "os.chmod(p('shared/disk.img'), 0o666)",
    "chown root's media": "os.chown(p('shared/disk.img'), 65534, 65534)",
    "chgrp root's media": "os.chown(p('shared/disk.img'), -1, 65534)",
    "set the times of root's media": "os.utime(p('shared/disk.img'), ns=(1, 1))",
    "touch root's media": "os.utime(p('shared/disk.img'))",
    "chmod root's pool": "os.chmod(p('private'), 0o777)",
    "chown root's pool": "os.chown(p('private'), 65534, 65534)",
    "set the times of root's pool": "os.utime(p('private'), ns=(1, 1))",
    "chmod the mount root": "os.chmod(p('.'), 0o777)",
    "set an attribute of root's media": "os.setxattr(p('shared/disk.img'), 'user.x', b'1')",
    "set the quota of root's pool": "os.setxattr(p('shared'), VX + 'quota_mib', b'1')",
}
ALLOWED = {
    "stat root's 0600 media": "os.stat(p('shared/disk.img'))",
    "list root's 0755 pool": "os.listdir(p('shared'))",
    "read root's 0644 media": "read('shared/open.img')",
    "create in a 0777 pool": "create('public/mine.img')",
    "append to its own media": "append('public/mine.img')",
    "chmod its own media": "os.chmod(p('public/mine.img'), 0o600)",
    "mkdir in a 0777 pool": "os.mkdir(p('public/mine'))",
}


def as_nobody(root: Path) -> dict[str, int]:
    ops = [*REFUSED.items(), *ALLOWED.items()]
    res = subprocess.run(
        [sys.executable, "-I", "-c", AS_NOBODY, str(root)],
        input=json.dumps(ops),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert res.returncode == 0, res.stderr
    results: dict[str, int] = json.loads(res.stdout)
    return results


def root_owned_tree(root: Path) -> None:
    """The pools and media, as root; ``root`` is a host directory or a mount."""
    modes = {"private": 0o700, "shared": 0o755, "public": 0o777}
    for pool, mode in modes.items():
        (root / pool).mkdir(exist_ok=True)
        os.chmod(root / pool, mode)
    for rel, mode in (
        ("private/disk.img", 0o600),
        ("shared/disk.img", 0o600),
        ("shared/open.img", 0o644),
    ):
        (root / rel).write_bytes(f"root's {rel}\n".encode() * 1000)
        os.chmod(root / rel, mode)


def state(root: Path) -> dict[str, object]:
    """What nobody must not change, read by root."""
    seen: dict[str, object] = {}
    for rel in ("private", "shared", "private/disk.img", "shared/disk.img", "shared/open.img"):
        st = os.stat(root / rel)
        seen[rel] = (stat.filemode(st.st_mode), st.st_uid, st.st_gid, st.st_size, st.st_mtime_ns)
        if stat.S_ISREG(st.st_mode):
            seen[rel + " bytes"] = (root / rel).read_bytes()
            seen[rel + " attributes"] = os.listxattr(root / rel)
    for rel in (".", "private", "shared"):
        seen[rel + " names"] = sorted(os.listdir(root / rel))
    return seen


@SQLITE_ONLY
def test_another_user_gets_what_the_modes_allow_and_nothing_more(public_dir, catalog, mount):
    # The reference: the same tree in a plain directory of the host (ext4 here).
    host = public_dir / "host"
    host.mkdir(mode=0o755)
    root_owned_tree(host)
    expected = as_nobody(host)
    assert {name: expected[name] for name in ALLOWED} == dict.fromkeys(ALLOWED, 0)
    assert {name for name in REFUSED if expected[name] in (errno.EACCES, errno.EPERM)} == set(
        REFUSED
    ), expected

    catalog.setup({"private": 64, "shared": 64, "public": 64})
    m = mount("--allow-other", mountpoint=public_dir / "mnt")
    root_owned_tree(m.path)
    assert stat.S_IMODE(os.stat(m.path).st_mode) == 0o755 and os.stat(m.path).st_uid == 0
    before = state(m.path)
    used = {pool: vattr(m / pool, "used_bytes") for pool in ("private", "shared")}
    quota = vattr(m / "shared", "quota_mib")

    got = as_nobody(m.path)
    assert got == expected, {
        name: (os.strerror(got[name]), os.strerror(expected[name]))
        for name in expected
        if got[name] != expected[name]
    }
    # Nothing root's changed: contents, names, modes, owners, times, usage, quota.
    assert state(m.path) == before
    assert {pool: vattr(m / pool, "used_bytes") for pool in ("private", "shared")} == used
    assert vattr(m / "shared", "quota_mib") == quota
    # What nobody was allowed to make is nobody's.
    mine = os.stat(m / "public" / "mine.img")
    assert (mine.st_uid, mine.st_gid, stat.S_IMODE(mine.st_mode)) == (NOBODY, NOBODY, 0o600)
    assert (m / "public" / "mine.img").read_bytes() == b"nobody's+nobody"
    assert os.stat(m / "public" / "mine").st_uid == NOBODY
    assert sorted(os.listdir(m / "public")) == ["mine", "mine.img"]
    assert {"allow_other", "default_permissions"} <= super_options(m.path)
    m.stop()


@SQLITE_ONLY
def test_default_permissions_of_earlier_versions_works_with_a_warning(
    catalog, mount, bare_cli, tmp_path
):
    catalog.setup({"tenants": 64})
    config = write_config(tmp_path / "velocityfs.toml", default_permissions=True)
    res = bare_cli("config", "check", config=config)
    assert res.stderr == (
        f"{config}: warning: 'default_permissions' is deprecated: {ALWAYS_CHECKED} "
        "(remove the key)\n"
    )
    m = mount(env={**os.environ, "VELOCITYFS_CONFIG": str(config)})
    assert "default_permissions" in super_options(m.path)
    assert "'default_permissions' is deprecated" in m.log
    m.stop()
    m = mount("--default-permissions")
    assert "default_permissions" in super_options(m.path)
    assert "--default-permissions is deprecated" in m.log
    m.stop()


def test_default_permissions_cannot_be_turned_off(bare_cli, tmp_path):
    config = write_config(tmp_path / "velocityfs.toml", default_permissions=False)
    res = bare_cli("config", "check", config=config, check=False)
    assert res.code == 1
    assert res.stderr == (
        f"{config}: 'default_permissions' can no longer be turned off: {ALWAYS_CHECKED} "
        "(remove the key)\n"
    )
    # Refused before anything else (an uninitialised catalog would be the next error).
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    catalog = f"sqlite:///{tmp_path}/empty.sqlite"
    flags = ["--catalog", catalog, "--store", tmp_path]
    res = bare_cli(*flags, "mount", mnt, "--no-default-permissions", check=False)
    assert res.code == 1
    assert res.stderr == f"velocityfs: error: --no-default-permissions is gone: {ALWAYS_CHECKED}\n"
    # mount(8)'s helper: an fstab line that still lists it mounts as before.
    command = daemon_command("/etc/v.toml", "/srv/v", ["allow_other", "default_permissions"])
    assert command[-3:] == ["mount", "/srv/v", "--allow-other"]


# -- A': setuid and setgid -----------------------------------------------------------------

# Run by a child that becomes nobody: writes into or truncates the file argv[2].
NOBODY_CHANGES = r"""
import os, sys
os.setgroups([])
os.setgid(65534)
os.setuid(65534)
what, path = sys.argv[1:]
if what == "write":
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, b"nobody", 0)
    finally:
        os.close(fd)
else:
    os.truncate(path, 1)
"""


def setuid_steps(top: Path) -> list[tuple[str, int, int]]:
    """For a write and a truncate by nobody and a chown by root of a root's 06777 file
    in ``top`` (a host directory or a pool), the mode that chmod left and the one after;
    last a directory's mode after chmod 02775 (both modes the same)."""
    path = top / "disk.img"
    path.write_bytes(b"x" * 4096)
    steps = []
    for step in ("write", "truncate", "chown"):
        os.chown(path, 0, 0)
        os.chmod(path, 0o6777)
        set_mode = stat.S_IMODE(os.stat(path).st_mode)
        if step == "chown":
            os.chown(path, NOBODY, NOBODY)
        else:
            res = subprocess.run(
                [sys.executable, "-I", "-c", NOBODY_CHANGES, step, str(path)],
                capture_output=True,
                text=True,
                timeout=60,
                check=False,
            )
            assert res.returncode == 0, res.stderr
        steps.append((step, set_mode, stat.S_IMODE(os.stat(path).st_mode)))
    (top / "sub").mkdir()
    os.chmod(top / "sub", 0o2775)
    dir_mode = stat.S_IMODE(os.stat(top / "sub").st_mode)
    steps.append(("directory", dir_mode, dir_mode))
    return steps


@SQLITE_ONLY
def test_media_never_carry_setuid_or_setgid_so_none_is_left_to_clear(public_dir, catalog, mount):
    """The mount takes clearing setuid and setgid over from the kernel
    (FUSE_HANDLE_KILLPRIV_V2, one request per write), and has none to clear: a media
    never carries them. What a write or truncate by another user and a chown leave is
    what ext4 leaves; the one difference is that chmod does not set them on a media.
    Pools keep setgid, as directories do."""
    host = public_dir / "host"
    host.mkdir()
    os.chmod(host, 0o777)
    expected = setuid_steps(host)
    assert [set_mode for _, set_mode, _ in expected] == [0o6777, 0o6777, 0o6777, 0o2775]

    catalog.setup({"public": 64})
    m = mount("--allow-other", mountpoint=public_dir / "mnt")
    os.chmod(m / "public", 0o777)
    got = setuid_steps(m / "public")
    assert [(step, after) for step, _, after in got] == [
        (step, after) for step, _, after in expected
    ]
    assert [set_mode for _, set_mode, _ in got] == [0o777, 0o777, 0o777, 0o2775]
    m.stop()
    m = mount("--allow-other", mountpoint=public_dir / "mnt")
    assert stat.S_IMODE(os.stat(m / "public" / "disk.img").st_mode) == 0o777
    assert stat.S_IMODE(os.stat(m / "public" / "sub").st_mode) == 0o2775


# -- B: backing files are 0600 -------------------------------------------------------------


def assert_private(store: Path, path: str | os.PathLike[str], how: str) -> None:
    """A backing file is 0600, and no directory of the store above it is writable to
    other users (who could swap it)."""
    path = Path(path)
    mode = stat.S_IMODE(path.stat().st_mode)
    assert mode == 0o600, f"{how}: backing file {path} has mode {mode:04o}"
    for directory in (path.parent, path.parent.parent):  # media/<2 hex>, media
        assert directory.name == "media" or directory.parent.name == "media", directory
        dmode = stat.S_IMODE(directory.stat().st_mode)
        assert not dmode & 0o022, f"{how}: {directory} has mode {dmode:04o}"
    assert path.is_relative_to(store)


def backing_of(vcli, mid: str) -> str:
    path: str = vcli("media", "show", mid, "--json").json()["backing_path"]
    return path


def spares_handed_out(store: Path) -> set[str]:
    """The media ids of a mount's first chunk of spare files, once it hands them out
    (store.spares: a chunk is handed out whole, before the next one is begun)."""
    deadline = time.monotonic() + 30
    while not (begun := list((store / "media" / ".spare").glob("*/1"))):
        assert time.monotonic() < deadline, "the mount made no spare files"
        time.sleep(0.02)
    return {p.name for p in (begun[0].parent / "0").iterdir()}


def journaled(store: Path) -> set[str]:
    return {r["id"] for holder in journals(store) for r in read_journal(store, holder)}


@SQLITE_ONLY
def test_backing_files_are_0600_however_they_were_made(catalog, store_dir, vcli, mount):
    with umask(0):
        catalog.setup({"tenants": 256})
        (store_dir / "vol" / "fast").mkdir(parents=True)  # the operator's disk
        vcli("volume", "add", "fast")
        v = catalog.v
        pid = v.pool_by_ref("tenants").id
        v.accounts.add_user("alice", "pw")
        v.accounts.add_group("ops")
        v.accounts.add_member("ops", "alice")
        v.accounts.share(pid, "ops", list(PERMISSIONS))
        port = free_port()
        m = mount("--api", f"127.0.0.1:{port}")
        pool = m / "tenants"
        made: dict[str, str] = {}

        # Creates on the mount: the first makes its file, later ones take a spare.
        (pool / "made.img").write_bytes(b"m" * 1000)
        made["mount create"] = vattr(pool / "made.img", "mid")
        spares = spares_handed_out(store_dir)
        (pool / "spare.img").write_bytes(b"s" * 1000)
        made["mount create on a spare"] = vattr(pool / "spare.img", "mid")
        assert made["mount create on a spare"] in spares
        for name in ("made.img", "spare.img"):
            assert_private(store_dir, vattr(pool / name, "backing_path"), name)

        # Through the API: an upload and a create.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            res = http.post("/u/auth", json={"name": "alice", "password": "pw"})
            key = res.json()["authkey"]
            res = http.put(f"/p/media/{key}/{pid}/upload.img", content=b"u" * (2 * MIB + 1))
            assert res.status_code == 200, res.text
            made["API upload"] = res.json()["mid"]
            body = {"authkey": key, "pid": pid, "filename": "api.img", "size_mib": 1}
            res = http.put("/p/media", json=body)
            assert res.status_code == 200, res.text
            made["API create"] = res.json()["mid"]
        uploads = store_dir / "media" / ".uploads"
        for directory in (uploads, *uploads.iterdir()):  # where uploads stream
            dmode = stat.S_IMODE(directory.stat().st_mode)
            assert not dmode & 0o022, f"upload directory {directory} has mode {dmode:04o}"
        sync_dir(pool)  # the mount's creates are in the catalog for the CLI
        for how, mid in made.items():
            assert_private(store_dir, backing_of(vcli, mid), how)

        # Moves to another volume and back.
        for how in ("mount create", "API upload"):
            for target in ("fast", "DEFAULT"):
                vcli("media", "set-volume", made[how], target)
                assert_private(store_dir, backing_of(vcli, made[how]), f"{how} moved to {target}")

        # Creates a kill -9 caught before their batch committed: replayed at the next start.
        for i in range(200):
            (pool / f"vm-{i:03d}.img").write_bytes(b"v" * (1000 + i))
            if i >= 20 and journaled(store_dir):
                break
        lost = journaled(store_dir)
        assert lost, "every batch had committed: nothing to replay"
        m.kill9()
        m = mount()
        assert not journaled(store_dir)
        for mid in lost:
            assert_private(store_dir, backing_of(vcli, mid), "replayed create")
        m.stop()
    assert vcli("fsck").stdout == "0 repaired, 0 remaining\n"


def test_set_volume_writes_a_0600_copy(catalog, store_dir, vcli):
    catalog.setup({"tenants": 64})
    (store_dir / "vol" / "fast").mkdir(parents=True)
    vcli("volume", "add", "fast")
    mid = catalog.v.media.create(catalog.v.pool_by_ref("tenants").id, "disk.img", size=MIB).id
    with umask(0):
        for target in ("fast", "DEFAULT"):
            vcli("media", "set-volume", mid, target)
            assert_private(store_dir, backing_of(vcli, mid), f"moved to {target}")
        # A staging copy a killed move of an earlier version left, readable by all: the
        # next move writes over it, and it does not keep that mode.
        staging = BackingStore(store_dir).moving_path("fast", mid)
        staging.parent.mkdir(parents=True, exist_ok=True)
        staging.write_bytes(b"half a copy")
        staging.chmod(0o644)
        vcli("media", "set-volume", mid, "fast")
        assert_private(store_dir, backing_of(vcli, mid), "moved over a staging copy")
    assert vcli("fsck").stdout == "0 repaired, 0 remaining\n"


def test_fsck_repairs_backing_files_other_users_may_open(catalog, store_dir, vcli):
    catalog.setup({"tenants": 64})
    view = catalog.v.media.create(catalog.v.pool_by_ref("tenants").id, "disk.img", size=MIB)
    path = Path(view.backing_path)
    path.chmod(0o644)  # as set-volume of earlier versions left every media it moved
    problem = (
        f"PROBLEM backing-mode: media {view.id} (tenants/disk.img): backing file {path} has "
        "mode 0644: other users may open it (backing files are 0600)"
    )
    res = vcli("fsck", check=False)
    assert res.code == 1 and res.stdout.splitlines() == [problem, "0 repaired, 1 remaining"]
    res = vcli("fsck", "--repair")
    assert res.stdout.splitlines()[-1] == "1 repaired, 0 remaining"
    assert_private(store_dir, path, "repaired")
    assert vcli("fsck").stdout == "0 repaired, 0 remaining\n"
