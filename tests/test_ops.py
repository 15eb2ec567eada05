"""Operating velocityfs (issue 6): the configuration file, the systemd units,
mount(8) and fstab, fsck on a damaged store, ``status``, and the daemon's log.

Catalog-dependent tests run on SQLite and PostgreSQL; the configuration checks
need no catalog and run once.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Iterator
from pathlib import Path

import click
import httpx
import pytest
from sqlalchemy import select, text
from support.admin import (
    MIB,
    fill,
    mountinfo_has,
    pattern,
    service,
    sha256_of,
    velocityfs_argv,
    write_config,
)
from support.fs import sync_dir

from velocityfs.catalog.models import Grant, Holder
from velocityfs.cli.main import main as velocityfs_main
from velocityfs.service.accounts import PERMISSIONS
from velocityfs.service.views import Creator
from velocityfs.store.spares import spare_dirs

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
SYSTEMD_DIR = REPO / "systemd"
INSTALLED = "/usr/local/bin/velocityfs"
HELPER_LINK = Path("/sbin/mount.fuse.velocityfs")


# -- fixtures and helpers ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def wait_for(predicate, timeout: float = 10.0, what: str = "condition") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def no_grants(catalog_url: str, store: Path) -> bool:
    with service(catalog_url, store) as v, v.db.transaction() as s:
        return s.execute(select(Grant.id)).first() is None


# -- the configuration file -----------------------------------------------------------------

# name -> (file contents, the one problem `config check` must report)
CONFIG_PROBLEMS = {
    "unknown-key": ('colour = "blue"\n', "unknown key 'colour'"),
    "wrong-type": ('allow_other = "yes"\n', "'allow_other' must be bool, not str"),
    "wrong-type-int": ("authkey_lifetime_s = 1.5\n", "'authkey_lifetime_s' must be int, not float"),
    "bad-catalog-scheme": (
        'catalog = "mysql://root@localhost/velocity"\n',
        "'catalog' must be a sqlite or postgresql URL, not mysql",
    ),
    "bad-catalog-url": (
        'catalog = "not a url"\n',
        "'catalog' is not a database URL: 'not a url'",
    ),
    "bad-api-listen": (
        'api_listen = "localhost"\n',
        "'api_listen' must be HOST:PORT, not 'localhost'",
    ),
    "bad-api-port": (
        'api_listen = "127.0.0.1:70000"\n',
        "'api_listen' must be HOST:PORT, not '127.0.0.1:70000'",
    ),
    "bad-log-level": (
        'log_level = "LOUD"\n',
        "'log_level' must be DEBUG, INFO, WARNING or ERROR, not 'LOUD'",
    ),
    "negative-timeout": ("attr_timeout_s = -1\n", "'attr_timeout_s' must not be negative"),
    "negative-lifetime": ("authkey_lifetime_s = -5\n", "'authkey_lifetime_s' must not be negative"),
    "zero-upload-idle": (
        "upload_idle_s = 0\n",
        "'upload_idle_s' must be a positive number of seconds",
    ),
    "broken-policy": (
        'volume_policy = "pool tenants :: fast\\nno arrow here"\n',
        "'volume_policy': policy line 2: missing ':: VOLUME' in 'no arrow here'",
    ),
}


@pytest.mark.parametrize("name", list(CONFIG_PROBLEMS))
def test_config_check_reports_the_problem(name, bare_cli, tmp_path):
    body, problem = CONFIG_PROBLEMS[name]
    config = tmp_path / "velocityfs.toml"
    config.write_text('store = "/srv/store"\n' + body)
    res = bare_cli("config", "check", config=config, check=False)
    assert res.code == 1
    assert res.stderr == f"{config}: {problem}\n"
    assert res.stdout == ""


def test_config_check_reports_every_problem_on_its_own_line(bare_cli, tmp_path):
    config = tmp_path / "velocityfs.toml"
    config.write_text(
        "".join(
            body
            for body, _ in CONFIG_PROBLEMS.values()
            if "70000" not in body and "not a url" not in body and "-5" not in body
        )
    )
    res = bare_cli("config", "check", config=config, check=False)
    assert res.code == 1
    expected = [
        f"{config}: {problem}"
        for body, problem in CONFIG_PROBLEMS.values()
        if "70000" not in body and "not a url" not in body and "-5" not in body
    ]
    assert sorted(res.stderr.splitlines()) == sorted(expected)


def test_config_file_errors(bare_cli, tmp_path):
    # Not TOML at all
    config = tmp_path / "broken.toml"
    config.write_text('store = "/srv/store"\nallow_other = \n')
    res = bare_cli("config", "check", config=config, check=False)
    assert res.code == 1
    assert re.fullmatch(
        rf"{re.escape(str(config))}: not valid TOML: .*\(at line 2, column \d+\)\n", res.stderr
    ), res.stderr

    # A file that is not there
    missing = tmp_path / "missing.toml"
    res = bare_cli("config", "check", config=missing, check=False)
    assert res.code == 1
    assert res.stderr == f"{missing}: cannot read: No such file or directory\n"

    # Any other command stops on a bad file with one line and status 1.
    bad = tmp_path / "bad.toml"
    bad.write_text('colour = "blue"\nlog_level = 3\n')
    res = bare_cli("pool", "list", config=bad, check=False)
    assert res.code == 1
    assert res.stderr == (
        f"velocityfs: error: {bad}: unknown key 'colour'; 'log_level' must be str, not int\n"
    )
    res = bare_cli("pool", "list", config=missing, check=False)
    assert res.code == 1
    assert res.stderr == f"velocityfs: error: {missing}: cannot read: No such file or directory\n"


def test_config_example_parses_and_passes_check(bare_cli, tmp_path):
    example = bare_cli("config", "example").stdout
    values = tomllib.loads(example)
    assert {"catalog", "store", "mountpoint", "api_listen", "volume_policy"} <= set(values)
    config = tmp_path / "example.toml"
    config.write_text(example)
    res = bare_cli("config", "check", config=config)
    assert res.stdout == (f"{config}: ok (catalog {values['catalog']}, store {values['store']})\n")
    assert res.stderr == ""


def test_flags_override_the_file(vcli, bare_cli, catalog_url, store_dir, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    wrong_catalog = tmp_path / "wrong.sqlite"
    config = write_config(
        tmp_path / "velocityfs.toml", store=str(elsewhere), catalog=f"sqlite:///{wrong_catalog}"
    )
    # flags win over the file for both the store and the catalog
    vcli("init", config=config)
    vcli("pool", "create", "tenants", "--quota-mib", "10", config=config)
    assert (store_dir / "media").is_dir()
    assert not elsewhere.exists() and not wrong_catalog.exists()
    status = vcli("status", "--json", config=config).json()
    assert status["catalog"]["url"] == catalog_url
    assert {v["name"]: v["path"] for v in status["volumes"]} == {"DEFAULT": str(store_dir)}
    # --store alone beats store = ... (the catalog still comes from the file)
    right = write_config(tmp_path / "right.toml", store=str(elsewhere), catalog=catalog_url)
    res = bare_cli("--store", str(store_dir), "pool", "list", "--json", config=right)
    assert [p["path"] for p in res.json()] == ["tenants"]
    # without the flag the file's store is used, and it has not been initialised
    res = bare_cli("pool", "list", config=right, check=False)
    assert res.code == 1
    assert res.stderr == (
        f"velocityfs: error: store {elsewhere} has no media/: run 'velocityfs init'\n"
    )
    # --catalog alone beats catalog = ...
    res = bare_cli(
        "--catalog",
        catalog_url,
        "pool",
        "list",
        "--json",
        config=write_config(
            tmp_path / "c.toml", store=str(store_dir), catalog=f"sqlite:///{wrong_catalog}"
        ),
    )
    assert [p["path"] for p in res.json()] == ["tenants"]
    assert not wrong_catalog.exists()


# -- systemd --------------------------------------------------------------------------------


def test_systemd_units_verify(tmp_path, bare_cli):
    units = sorted(SYSTEMD_DIR.glob("*.service"))
    assert {u.name for u in units} == {"velocityfs.service", "velocityfs-api.service"}
    velocityfs = VENV_BIN / "velocityfs"
    assert os.access(velocityfs, os.X_OK)
    example = tmp_path / "velocityfs.toml"
    example.write_text(bare_cli("config", "example").stdout)
    for unit in units:
        body = unit.read_text()
        assert INSTALLED in body
        copy = tmp_path / unit.name
        copy.write_text(body.replace(INSTALLED, str(velocityfs)))
        res = subprocess.run(
            ["systemd-analyze", "verify", str(copy)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert res.returncode == 0 and res.stderr == "", f"{unit.name}:\n{res.stdout}{res.stderr}"
        # every command the unit runs is a real velocityfs command line
        for line in body.splitlines():
            key, _, command = line.partition("=")
            if key not in ("ExecStart", "ExecStartPre", "ExecStop", "ExecReload"):
                continue
            argv = shlex.split(command)
            assert argv[0] == INSTALLED and argv[1] == "--config", line
            res = bare_cli(*argv[3:], "--help", config=example, flags=False, check=False)
            assert res.code == 0, f"{unit.name}: {command}\n{res}"


def test_both_units_run_init_before_they_start():
    """As the README says: a unit creates or upgrades the catalog and store, with the
    configuration it then runs on, before every start."""
    for unit in sorted(SYSTEMD_DIR.glob("*.service")):
        commands = [
            (key, shlex.split(command))
            for key, _, command in (line.partition("=") for line in unit.read_text().splitlines())
            if key in ("ExecStartPre", "ExecStart")
        ]
        (start,) = [argv for key, argv in commands if key == "ExecStart"]
        pre = [argv for key, argv in commands if key == "ExecStartPre"]
        assert start[:3] + ["init"] in pre, unit.name
        assert start[3] in ("mount", "serve"), unit.name


# -- mount(8) and fstab ---------------------------------------------------------------------


@pytest.fixture
def mount_helper() -> Iterator[Path]:
    """/sbin/mount.fuse.velocityfs for mount(8): the venv's helper, only for the test."""
    created = False
    if not HELPER_LINK.exists():
        with contextlib.suppress(FileNotFoundError):
            HELPER_LINK.unlink()  # a dangling link
        HELPER_LINK.symlink_to(VENV_BIN / "mount.fuse.velocityfs")
        created = True
    try:
        yield HELPER_LINK
    finally:
        if created:
            with contextlib.suppress(FileNotFoundError):
                HELPER_LINK.unlink()


def daemon_pids(mountpoint: Path) -> list[int]:
    res = subprocess.run(
        ["pgrep", "-f", f"velocityfs --config .* mount {mountpoint}( |$)"],
        capture_output=True,
        text=True,
        check=False,
    )
    return [int(pid) for pid in res.stdout.split()]


def mount_entry(mountpoint: Path) -> list[str] | None:
    target = os.path.realpath(mountpoint)
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            if fields[4] == target:
                return fields
    return None


@pytest.fixture
def system_mounts(fuse_available) -> Iterator[list[Path]]:
    """Mountpoints mounted through mount(8); whatever is left is undone afterwards."""
    mountpoints: list[Path] = []
    try:
        yield mountpoints
    finally:
        for mnt in mountpoints:
            if mountinfo_has(mnt):
                subprocess.run(["umount", str(mnt)], capture_output=True, timeout=30, check=False)
            if mountinfo_has(mnt):
                subprocess.run(
                    ["fusermount3", "-u", "-z", str(mnt)],
                    capture_output=True,
                    timeout=30,
                    check=False,
                )
            for pid in daemon_pids(mnt):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            name = str(mnt).strip("/").replace("/", "-")
            for log in (
                Path("/var/log/velocityfs") / f"{name}.log",
                Path("/tmp") / f"velocityfs-{name}.log",
            ):
                with contextlib.suppress(FileNotFoundError):
                    log.unlink()


def umount_and_check_gone(mnt: Path) -> None:
    res = subprocess.run(
        ["umount", str(mnt)], capture_output=True, text=True, timeout=60, check=False
    )
    assert res.returncode == 0, res.stderr
    wait_for(lambda: not daemon_pids(mnt), 30, "the daemon to exit after umount")
    assert mount_entry(mnt) is None


@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
def test_mount_t_fuse_velocityfs_and_fstab(
    mount_helper, system_mounts, vcli, catalog_url, store_dir, tmp_path
):
    vcli("init")
    vcli("pool", "create", "tenants", "--quota-mib", "100")
    config = write_config(tmp_path / "velocityfs.toml", catalog=catalog_url, store=str(store_dir))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    system_mounts.append(mnt)

    res = subprocess.run(
        ["mount", "-t", "fuse.velocityfs", str(config), str(mnt), "-o", "allow_other"],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    entry = mount_entry(mnt)
    assert entry is not None
    fstype = entry[entry.index("-") + 1]
    assert fstype == "fuse.velocityfs"
    assert "allow_other" in entry[-1].split(",")
    (pid,) = daemon_pids(mnt)
    assert "--allow-other" in Path(f"/proc/{pid}/cmdline").read_text().split("\0")
    data = pattern(3 * MIB)
    (mnt / "tenants" / "disk.img").write_bytes(data)
    assert (mnt / "tenants" / "disk.img").read_bytes() == data
    umount_and_check_gone(mnt)
    assert not (mnt / "tenants").exists()

    fstab = tmp_path / "fstab"
    fstab.write_text(
        "# an fstab line as an operator writes it\n"
        f"{config} {mnt} fuse.velocityfs allow_other,default_permissions,noauto 0 0\n"
    )
    res = subprocess.run(
        ["mount", "-T", str(fstab), str(mnt)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert res.returncode == 0, res.stdout + res.stderr
    entry = mount_entry(mnt)
    assert entry is not None and entry[entry.index("-") + 1] == "fuse.velocityfs"
    assert {"allow_other", "default_permissions"} <= set(entry[-1].split(","))
    assert (mnt / "tenants" / "disk.img").read_bytes() == data
    umount_and_check_gone(mnt)
    assert vcli("fsck").code == 0


# -- fsck -----------------------------------------------------------------------------------


def test_fsck_finds_and_repairs_each_kind_of_damage(vcli, catalog_url, store_dir):
    vcli("init")
    for path, quota in (("tenants", "1000"), ("isos", "100"), ("spare", "10")):
        vcli("pool", "create", path, "--quota-mib", quota)
    vcli("pool", "create", "tenants/acme")
    (store_dir / "vol" / "A").mkdir(parents=True)
    vcli("volume", "add", "A")
    with service(catalog_url, store_dir, "name vol.img :: A") as v:
        tenants = v.pool_by_ref("tenants").id
        grant_media = v.media.create(tenants, "grant.img", size=2 * MIB)
        fill(grant_media.open_path, 2 * MIB, seed=1)
        missing = v.media.create(v.pool_by_ref("tenants/acme").id, "missing.img", size=MIB)
        resized = v.media.create(v.pool_by_ref("isos").id, "size.iso", size=MIB)
        on_a = v.media.create(tenants, "vol.img", size=MIB, creator=Creator("x"))
        fill(on_a.open_path, MIB, seed=2)
        assert on_a.volume == "A"
        intact = v.media.create(tenants, "intact.img", size=MIB)
        want_intact = fill(intact.open_path, MIB, seed=3)

        # 1. a stale grant: a writer that died holding room (and wrote 1 MiB more)
        with v.db.transaction() as s:
            holder = Holder(
                host=socket.gethostname(),
                pid=dead_pid(),
                started_ns=1,
                heartbeat_ns=1,
                expires_ns=time.time_ns() + 60 * 10**9,  # dead by its pid, not its lease
            )
            s.add(holder)
            s.flush()
            dead_holder = holder.id
        v.ledger.reserve(grant_media.id, dead_holder, 4 * MIB)
        with open(grant_media.open_path, "ab") as f:
            f.write(pattern(MIB, seed=4))
        # a live process's lease and upload are left alone
        live_holder = v.ledger.register_holder()
        used_before = {p.name: p.used_bytes for p in v.pools.all()}
    # 2. a missing backing file
    Path(missing.open_path).unlink()
    # 3. an orphan file: bytes without a catalog row
    orphan_id = str(uuid.uuid4())
    orphan = store_dir / "media" / orphan_id[:2] / orphan_id
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"nobody's")
    # 4. a size mismatch
    with open(resized.open_path, "ab") as f:
        f.write(b"x" * 1000)
    # 5. a wrong usage total
    with service(catalog_url, store_dir) as v, v.db.transaction() as s:
        s.execute(text("UPDATE pools SET used_bytes = 777 WHERE name = 'spare'"))
    # 6. a dangling volume symlink
    dflt = Path(on_a.open_path)
    dflt.unlink()
    os.symlink(f"../../vol/gone/media/{on_a.id[:2]}/{on_a.id}", dflt)
    # 7. an unfinished upload of a process that is gone, next to a live one's
    gone = str(uuid.uuid4())
    leftover = store_dir / "media" / ".uploads" / gone / str(uuid.uuid4())
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"partial upload")
    live_upload = store_dir / "media" / ".uploads" / live_holder / str(uuid.uuid4())
    live_upload.parent.mkdir(parents=True)
    live_upload.write_bytes(b"in flight")

    expected = [
        f"stale-grant: 1 grant(s) of dead process {dead_holder}",
        f"missing-file: media {missing.id} (tenants/acme/missing.img): backing file "
        f"{missing.backing_path} is missing",
        f"size: media {resized.id} (isos/size.iso): catalog says {MIB} bytes, "
        f"the file has {MIB + 1000}",
        f"volume-symlink: media {on_a.id} (tenants/vol.img): DEFAULT path {dflt} should link "
        f"to ../../vol/A/media/{on_a.id[:2]}/{on_a.id} "
        f"(-> ../../vol/gone/media/{on_a.id[:2]}/{on_a.id})",
        f"orphan-file: {orphan}: no media {orphan_id} in the catalog",
        f"orphan-upload: {leftover.parent}: unfinished uploads of a process that is gone",
        "usage: pool spare: used 777 bytes recorded, 0 counted",
    ]
    res = vcli("fsck", check=False)
    assert res.code == 1
    lines = res.stdout.splitlines()
    assert sorted(lines[:-1]) == sorted(f"PROBLEM {e}" for e in expected)
    assert lines[-1] == f"0 repaired, {len(expected)} remaining"
    # a report changes nothing
    assert vcli("fsck", check=False).stdout == res.stdout

    res = vcli("fsck", "--repair", check=False)
    assert res.code == 0, res
    lines = res.stdout.splitlines()
    assert sorted(lines[:-1]) == sorted(f"REPAIRED {e}" for e in expected)
    assert lines[-1] == f"{len(expected)} repaired, 0 remaining"
    res = vcli("fsck")
    assert res.stdout == "0 repaired, 0 remaining\n"

    with service(catalog_url, store_dir) as v:
        with v.db.transaction() as s:
            assert s.execute(select(Grant.id)).first() is None
            holders = set(s.execute(select(Holder.id)).scalars())
        assert holders == {live_holder}
        # the dead writer's bytes were kept (2 MiB + the 1 MiB it wrote), the rest returned
        assert v.media.get(grant_media.id).size == 3 * MIB
        assert os.stat(grant_media.open_path).st_size == 3 * MIB
        assert v.media.get(resized.id).size == MIB + 1000
        with pytest.raises(Exception, match="no media"):
            v.media.get(missing.id)
        used = {p.name: p.used_bytes for p in v.pools.all()}
    assert used == {
        "tenants": 3 * MIB + MIB + MIB,
        "acme": 0,
        "isos": MIB + 1000,
        "spare": 0,
    }
    assert used_before["tenants"] > used["tenants"]  # the stale grant's room came back
    assert not orphan.exists()
    assert not leftover.parent.exists()
    assert live_upload.read_bytes() == b"in flight"
    assert os.readlink(dflt) == f"../../vol/A/media/{on_a.id[:2]}/{on_a.id}"
    assert sha256_of(intact.open_path) == want_intact

    # What fsck cannot repair keeps it failing, even with --repair.
    shutil.rmtree(store_dir / "vol" / "A" / "media")
    res = vcli("fsck", "--repair", check=False)
    assert res.code == 1
    assert res.stdout.splitlines() == [
        f"PROBLEM volume-offline: volume 'A' is offline: no media/ directory at "
        f"{store_dir / 'vol' / 'A' / 'media'}: is its disk mounted?",
        f"PROBLEM offline-media: media {on_a.id} (tenants/vol.img) is on volume 'A', "
        "which is offline: kept as it is",
        "0 repaired, 2 remaining",
    ]
    # ... and its media were not "repaired" away
    with service(catalog_url, store_dir) as v:
        assert v.media.get(on_a.id).volume == "A"
        v.ledger.retire_holder(live_holder)
    assert live_upload.read_bytes() == b"in flight"


def test_fsck_reports_pools_over_quota_on_disk_even_while_a_grant_is_held(
    vcli, catalog_url, store_dir
):
    """The size check skips media a live process holds a grant on (its file may be
    growing); the quota's check must not: a writer stays within its grant, so bytes
    on disk past a quota are wrong whoever writes. Nothing is repaired away."""
    vcli("init")
    vcli("pool", "create", "vms", "--quota-mib", "1")
    with service(catalog_url, store_dir) as v:
        media = v.media.create(v.pool_by_ref("vms").id, "disk.img")
        writer = v.ledger.register_holder()
        v.ledger.reserve(media.id, writer, 4096, chunk=4096)
        fill(media.open_path, 2 * MIB, seed=5)
        problem = f"over-quota: pool vms: {2 * MIB} bytes on disk, {MIB} over its quota of {MIB}"
        for args in (("fsck",), ("fsck", "--repair")):
            res = vcli(*args, check=False)
            assert res.code == 1
            assert res.stdout.splitlines() == [f"PROBLEM {problem}", "0 repaired, 1 remaining"]
        assert os.path.getsize(media.open_path) == 2 * MIB
        v.ledger.settle(media.id, writer, 0)
        v.ledger.retire_holder(writer)


# -- the lease ------------------------------------------------------------------------------


def test_the_lease_is_the_catalogs_so_fsck_with_another_config_spares_a_live_mount(
    vcli, catalog_url, store_dir, mount, tmp_path
):
    """fsck once judged holders by its own configuration's ``lease_s``: run with a
    shorter one than the mounts', it took a live mount's spare files for those of a
    gone process (and ``--repair`` would have deleted them under it)."""
    vcli("init", "--lease-s", "30")
    vcli("pool", "create", "tenants", "--quota-mib", "100")
    m = mount()
    (m / "tenants" / "disk.img").write_bytes(b"x")  # the mount now keeps spare files
    wait_for(lambda: any(spare_dirs(store_dir)), what="the mount's spare files")
    short = write_config(tmp_path / "short.toml", lease_s=0.5)
    check = vcli("config", "check", config=short, flags=False)
    assert "warning: 'lease_s' is deprecated: the lease length is the catalog's" in check.stderr
    time.sleep(1.0)  # longer than the configuration's lease, far shorter than the catalog's
    res = vcli("fsck", "--repair", config=short, check=False)
    assert (res.code, res.stdout) == (0, "0 repaired, 0 remaining\n")
    assert any(spare_dirs(store_dir))
    assert vcli("lease", "show").stdout == "30\n"

    vcli("lease", "set", "45")
    assert vcli("lease", "show").stdout == "45\n"
    refused = vcli("lease", "set", "0.01", check=False)
    assert refused.code == 1
    assert "the lease must be 0.2 to 3600 seconds" in refused.stderr
    # A mount takes the new length at its next renewal; it never stops being alive.
    assert vcli("fsck", config=short).stdout == "0 repaired, 0 remaining\n"
    assert (m / "tenants" / "disk.img").read_bytes() == b"x"


# -- status ---------------------------------------------------------------------------------


def test_status(tmpfs, vcli, catalog_url, store_dir, mount):
    vcli("init")
    vcli("pool", "create", "tenants", "--quota-mib", "100")
    vcli("pool", "create", "tenants/acme", "--quota-mib", "50")
    vcli("pool", "create", "isos", "--quota-mib", "20")
    fast = tmpfs(store_dir / "vol" / "fast", "32m")
    vcli("volume", "add", "fast")
    m = mount()
    (m / "tenants" / "acme" / "disk.img").write_bytes(pattern(5 * MIB))
    wait_for(lambda: no_grants(catalog_url, store_dir), what="the writer's lease to go")

    with service(catalog_url, store_dir) as v:
        with v.db.transaction() as s:
            revision = s.execute(text("SELECT version_num FROM alembic_version")).scalar_one()
        pids = {p.name: p.id for p in v.pools.all()}
    info = vcli("status", "--json").json()
    assert set(info) == {"mounts", "catalog", "holders", "volumes", "pools"}
    assert m.realpath in info["mounts"]
    assert info["catalog"] == {"url": catalog_url, "revision": revision}
    (holder,) = info["holders"]
    assert (holder["host"], holder["pid"]) == (socket.gethostname(), m.pid)
    volumes = {v["name"]: v for v in info["volumes"]}
    assert set(volumes) == {"DEFAULT", "fast"}
    assert volumes["fast"]["free_bytes"] == 32 * MIB - 4096  # the volume's marker has a block
    assert volumes["fast"]["online"] is True
    assert volumes["fast"]["path"] == str(fast)
    assert (volumes["DEFAULT"]["media"], volumes["DEFAULT"]["used_bytes"]) == (1, 5 * MIB)
    assert volumes["DEFAULT"]["free_bytes"] > 0
    assert info["pools"] == [
        {"path": "isos", "pid": pids["isos"], "used_bytes": 0, "quota_bytes": 20 * MIB},
        {
            "path": "tenants",
            "pid": pids["tenants"],
            "used_bytes": 5 * MIB,
            "quota_bytes": 100 * MIB,
        },
        {
            "path": "tenants/acme",
            "pid": pids["acme"],
            "used_bytes": 5 * MIB,
            "quota_bytes": 50 * MIB,
        },
    ]

    out = vcli("status").stdout.splitlines()
    assert out[0] == f"catalog: {catalog_url} (schema {revision})"
    assert out[1].startswith("mounts:  ") and m.realpath in out[1][9:].split(", ")
    assert out[2] == f"process: {socket.gethostname()} pid {m.pid} (0 grants)"
    rows = [line.split() for line in out]
    assert ["fast", "online", "0", "0.00", "32.00", str(fast)] in rows
    assert ["tenants", "5.00", "100.00", "5%"] in rows
    assert ["acme", "5.00", "50.00", "10%"] in rows
    assert ["isos", "0.00", "20.00", "0%"] in rows
    acme_line = next(line for line in out if line.split()[:1] == ["acme"])
    assert acme_line.startswith("  acme")  # the tree is indented

    m.stop()
    info = vcli("status", "--json").json()
    assert m.realpath not in info["mounts"]
    assert info["holders"] == []


def test_status_shows_only_this_catalogs_mounts(vcli, catalog_url, store_dir, mount, tmp_path):
    """Two catalogs mounted on one host: each one's status names its own mount only."""
    other_catalog = f"sqlite:///{tmp_path}/other.sqlite"
    other_store = tmp_path / "other-store"
    other_store.mkdir()
    vcli("init")
    vcli("init", catalog=other_catalog, store=other_store)
    mine = mount()
    theirs = mount(catalog=other_catalog, store=other_store)
    # the mount's source names its daemon, which the catalog knows as a holder
    assert mount_entry(mine.path)[-2] == f"velocityfs:{mine.pid}"

    assert vcli("status", "--json").json()["mounts"] == [mine.realpath]
    other = vcli("status", "--json", catalog=other_catalog, store=other_store).json()
    assert other["mounts"] == [theirs.realpath]
    assert vcli("status").stdout.splitlines()[1] == f"mounts:  {mine.realpath}"

    theirs.stop()
    assert vcli("status", "--json").json()["mounts"] == [mine.realpath]
    assert vcli("status", "--json", catalog=other_catalog, store=other_store).json()["mounts"] == []


def test_a_second_mount_on_a_mounted_mountpoint_is_refused(
    system_mounts, vcli, catalog_url, store_dir, mount, tmp_path
):
    vcli("init")
    vcli("pool", "create", "tenants", "--quota-mib", "100")
    m = mount()
    data = pattern(2 * MIB)
    (m / "tenants" / "disk.img").write_bytes(data)
    refusal = (
        f"velocityfs: error: {m.realpath} is already a velocityfs mount served by pid "
        f"{m.pid}: unmount it first (umount {m.realpath})"
    )

    res = subprocess.run(
        velocityfs_argv(catalog_url, str(store_dir), "mount", str(m.path)),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (res.returncode, res.stdout, res.stderr.splitlines()) == (1, "", [refusal])

    # What mount -t fuse.velocityfs runs (its wiring is test_mount_t_fuse_velocityfs_and_fstab's),
    # here without the /sbin link, which every checkout on the host shares.
    config = write_config(tmp_path / "velocityfs.toml", catalog=catalog_url, store=str(store_dir))
    system_mounts.append(m.path)  # should it stack after all, the teardown undoes it
    res = subprocess.run(
        [sys.executable, "-m", "velocityfs.cli.mount_helper", str(config), str(m.path)],
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )
    assert res.returncode != 0
    assert refusal in res.stderr.splitlines(), res.stderr
    assert "mount.fuse.velocityfs: the daemon exited (1)" in res.stderr.splitlines()

    # the first mount goes on alone and unharmed
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        assert [line.split()[4] for line in f].count(m.realpath) == 1
    assert (m / "tenants" / "disk.img").read_bytes() == data
    (m / "tenants" / "more.img").write_bytes(data)
    assert (m / "tenants" / "more.img").read_bytes() == data
    assert [h["pid"] for h in vcli("status", "--json").json()["holders"]] == [m.pid]


# -- --json on every listing command -----------------------------------------------------


def listing_commands() -> set[tuple[str, ...]]:
    """Every command that lists: each ``list``, and ``status`` and ``fsck``."""
    found = {("status",), ("fsck",)}

    def walk(group: click.Group, path: tuple[str, ...]) -> None:
        for name, command in group.commands.items():
            if isinstance(command, click.Group):
                walk(command, (*path, name))
            elif name == "list":
                found.add((*path, name))

    walk(velocityfs_main, ())
    return found


def rows(table: str) -> list[list[str]]:
    """A table's rows (its header left out), split into cells."""
    return [line.split() for line in table.splitlines()[1:]]


def in_mib(nbytes: int | None) -> str:
    return "inherit" if nbytes is None else f"{nbytes / MIB:.2f}"


def test_every_listing_command_has_json_matching_its_table(
    tmpfs, vcli, catalog_url, store_dir, mount
):
    vcli("init")
    vcli("pool", "create", "tenants", "--quota-mib", "100")
    vcli("pool", "create", "tenants/acme")
    vcli("pool", "create", "isos", "--quota-mib", "20")
    vcli("user", "add", "alice", "--password", "secret")
    vcli("group", "add", "ops")
    vcli("member", "add", "ops", "alice")
    tmpfs(store_dir / "vol" / "fast", "32m")
    vcli("volume", "add", "fast")
    m = mount()
    (m / "tenants" / "acme" / "disk.img").write_bytes(pattern(3 * MIB))
    (m / "tenants" / "acme" / "seed.img").write_bytes(pattern(MIB))
    (m / "isos" / "a.iso").write_bytes(pattern(MIB))
    wait_for(lambda: no_grants(catalog_url, store_dir), what="the writer's grants to go")

    def both(*args: str) -> tuple[str, object]:
        plain = vcli(*args, check=False)
        data = vcli(*args, "--json", check=False)
        assert plain.code == data.code, f"{plain}\n{data}"
        return plain.stdout, data.json()

    checked = set()

    out, pools = both("pool", "list")
    assert rows(out) == [
        [p["path"].rsplit("/")[-1], in_mib(p["used_bytes"]), in_mib(p["quota_bytes"]), p["pid"]]
        for p in pools
    ]
    assert [p["path"] for p in pools] == ["isos", "tenants", "tenants/acme"]
    checked.add(("pool", "list"))

    out, users = both("user", "list")
    assert rows(out) == [[u["name"], u["uid"]] for u in users]
    assert [u["name"] for u in users] == ["alice"]
    checked.add(("user", "list"))

    out, groups = both("group", "list")
    assert rows(out) == [
        [g["name"], g["gid"], *([",".join(g["members"])] if g["members"] else [])] for g in groups
    ]
    assert {g["name"]: g["members"] for g in groups} == {"ops": ["alice"], "root": []}
    checked.add(("group", "list"))

    out, volumes = both("volume", "list")
    # the store's own disk is shared, its free space moves between the two calls; fast's
    # is a tmpfs of its own
    table = {r[0]: r for r in rows(out)}
    assert [r[0] for r in rows(out)] == [v["name"] for v in volumes] == ["DEFAULT", "fast"]
    for v in volumes:
        row = table[v["name"]]
        assert row[:4] + row[5:] == [
            v["name"],
            "online" if v["online"] else "offline",
            str(v["media"]),
            in_mib(v["used_bytes"]),
            v["path"],
        ]
        assert abs(float(row[4]) * MIB - v["free_bytes"]) < 64 * MIB
    assert table["fast"][4] == in_mib(volumes[1]["free_bytes"])
    checked.add(("volume", "list"))

    out, media = both("media", "list", "tenants/acme")
    assert rows(out) == [[d["name"], in_mib(d["size_bytes"]), d["volume"], d["mid"]] for d in media]
    assert sorted(d["name"] for d in media) == ["disk.img", "seed.img"]
    checked.add(("media", "list"))

    out, status = both("status")
    lines = out.splitlines()
    revision = status["catalog"]["revision"]
    assert lines[0] == f"catalog: {status['catalog']['url']} (schema {revision})"
    assert lines[1] == f"mounts:  {', '.join(status['mounts'])}" and status["mounts"]
    holders = [
        f"process: {h['host']} pid {h['pid']} ({h['grants']} grants)" for h in status["holders"]
    ]
    assert lines[2 : 2 + len(holders)] == holders and holders
    volume_table, pool_table = "\n".join(lines[3 + len(holders) :]).split("\n\n")
    assert [r[0] for r in rows(volume_table)] == [v["name"] for v in status["volumes"]]
    assert rows(pool_table) == [
        [
            p["path"].rsplit("/")[-1],
            in_mib(p["used_bytes"]),
            in_mib(p["quota_bytes"]),
            f"{100 * p['used_bytes'] / p['quota_bytes']:.0f}%" if p["quota_bytes"] else "-",
        ]
        for p in status["pools"]
    ]
    checked.add(("status",))

    m.stop()
    (lost,) = [d for d in media if d["name"] == "seed.img"]
    Path(lost["backing_path"]).unlink()
    out, fsck = both("fsck")
    assert out.splitlines() == [
        f"PROBLEM {p['kind']}: {p['message']}" for p in fsck["problems"]
    ] + [f"0 repaired, {fsck['remaining']} remaining"]
    assert fsck["remaining"] == len(fsck["problems"]) >= 1
    assert any(lost["mid"] in p["message"] for p in fsck["problems"])
    checked.add(("fsck",))

    assert checked == listing_commands()


# -- the daemon's log -----------------------------------------------------------------------

ACCESS = re.compile(
    r"^INFO velocityfs\.api: (GET|POST|PUT|DELETE|PATCH) (\S+) (\d{3}) (\d+\.\d)ms$"
)


def access_lines(log: str) -> list[tuple[str, str, int]]:
    found = []
    for line in log.splitlines():
        match = ACCESS.match(line)
        if match:
            found.append((match[1], match[2], int(match[3])))
            assert float(match[4]) >= 0
    return found


def api_requests(port: int, pid: str) -> tuple[list[tuple[str, str, int]], str]:
    """A few requests of every kind; returns (method, logged route template, status) each,
    and the key."""
    made = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        res = http.post("/u/auth", json={"name": "alice", "password": "pw"})
        assert res.status_code == 200
        key = res.json()["authkey"]
        made.append(("POST", "/u/auth", 200))
        res = http.request("GET", "/p/media", json={"authkey": key, "pid": pid})
        made.append(("GET", "/p/media", res.status_code))
        res = http.request("GET", "/p/media", json={"authkey": "wrong", "pid": pid})
        made.append(("GET", "/p/media", res.status_code))
        res = http.put(f"/p/media/{key}/{pid}/upload.iso", content=pattern(MIB))
        assert res.status_code == 200, res.text
        made.append(("PUT", "/p/media/{authkey}/{pid}/{filename:path}", 200))
        res = http.put(f"/p/media/{key}/{pid}/upload.iso", content=b"again")
        made.append(("PUT", "/p/media/{authkey}/{pid}/{filename:path}", res.status_code))
        res = http.get("/openapi.json")
        made.append(("GET", "/openapi.json", res.status_code))
        res = http.get("/nowhere")
        made.append(("GET", "(unmatched)", res.status_code))  # its path is not logged
    assert [s for _m, _p, s in made] == [200, 200, 403, 200, 409, 200, 404]
    return made, key


@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
def test_daemon_logs_api_requests(vcli, catalog_url, store_dir, mount):
    vcli("init")
    vcli("pool", "create", "tenants", "--quota-mib", "100")
    with service(catalog_url, store_dir) as v:
        v.accounts.add_user("alice", "pw")
        v.accounts.add_group("ops")
        v.accounts.add_member("ops", "alice")
        pid = v.pool_by_ref("tenants").id
        v.accounts.share(pid, "ops", list(PERMISSIONS))

    port = free_port()
    m = mount("--api", f"127.0.0.1:{port}")
    made, key = api_requests(port, pid)
    wait_for(lambda: len(access_lines(m.log)) >= len(made), what="the access log lines")
    time.sleep(0.2)
    assert access_lines(m.log) == made, m.log
    assert key not in m.log
    assert "INFO " in m.log
    m.stop()

    port = free_port()
    quiet = mount("--api", f"127.0.0.1:{port}", "--log-level", "WARNING")
    (quiet / "tenants" / "upload.iso").unlink()
    made, key = api_requests(port, pid)
    quiet.stop()
    assert access_lines(quiet.log) == []
    assert not [line for line in quiet.log.splitlines() if line.startswith("INFO")], quiet.log
    assert key not in quiet.log
    assert "velocityfs: mounted" in quiet.log


def counts_lines(log: str) -> list[dict[str, int]]:
    """Each ``velocityfs: counts k=v ...`` line of a daemon's log, as a dict."""
    return [
        {key: int(value) for key, value in (pair.split("=") for pair in line.split()[2:])}
        for line in log.splitlines()
        if line.startswith("velocityfs: counts ")
    ]


@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
def test_the_mount_counts_requests_and_transactions_on_sigusr1_and_at_exit(catalog, mount):
    catalog.setup({"tenants": 64})
    m = mount("--log-level", "WARNING")  # the counts are printed whatever the level
    pool = m / "tenants"
    os.kill(m.pid, signal.SIGUSR1)
    wait_for(lambda: len(counts_lines(m.log)) == 1, what="the first counts line")
    for i in range(10):
        (pool / f"vm-{i}.img").write_bytes(b"x" * 4096)
    os.listdir(pool)
    sync_dir(pool)  # the creates' batch commits now, not BATCH_S later
    os.kill(m.pid, signal.SIGUSR1)
    wait_for(lambda: len(counts_lines(m.log)) == 2, what="the second counts line")
    m.stop()
    before, after, at_exit = counts_lines(m.log)
    assert after["create"] - before.get("create", 0) == 10
    assert after["write"] - before.get("write", 0) >= 10
    assert after["release"] - before.get("release", 0) == 10
    assert after["requests"] == sum(
        n for k, n in after.items() if k not in ("requests", "transactions")
    )
    assert after["transactions"] > before["transactions"]
    assert at_exit["requests"] >= after["requests"]
    assert at_exit["transactions"] >= after["transactions"]


@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)
def test_a_4_kib_write_costs_one_request(catalog, mount):
    """No getxattr("security.capability") before each write: the mount takes privilege
    clearing over (FUSE_HANDLE_KILLPRIV_V2), so the kernel asks once per file, not per
    write (tests/test_permissions.py checks what that hands over)."""
    catalog.setup({"tenants": 64})
    m = mount("--log-level", "WARNING")
    fd = os.open(m / "tenants" / "vm.img", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x" * 4096, 0)  # the one time the kernel asks
        os.kill(m.pid, signal.SIGUSR1)
        wait_for(lambda: len(counts_lines(m.log)) == 1, what="the first counts line")
        for i in range(64):
            os.pwrite(fd, b"y" * 4096, (i * 7919 % 256) * 4096)
        os.kill(m.pid, signal.SIGUSR1)
        wait_for(lambda: len(counts_lines(m.log)) == 2, what="the second counts line")
    finally:
        os.close(fd)
    before, after = counts_lines(m.log)
    assert after["write"] - before["write"] == 64
    assert after["requests"] - before["requests"] == 64, (before, after)
