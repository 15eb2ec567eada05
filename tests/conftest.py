"""Shared fixtures: a catalog on each backend, a store, mounted daemons and the CLI.

Every test that takes ``catalog_url`` (directly or through ``mount``/``cli``) runs
once on SQLite and once on PostgreSQL. Missing infrastructure (no PostgreSQL URL,
no /dev/fuse) FAILS those tests instead of skipping them: a skipped quota test on
PostgreSQL looks green in CI and hides exactly the bugs the multi-host setup has.
scripts/test provides a throwaway PostgreSQL server via VELOCITYFS_TEST_PG_URL.

To run a test on one backend only:
``@pytest.mark.parametrize("catalog_url", ["sqlite"], indirect=True)``.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url
from support.admin import InProcessCli, Tmpfs
from support.faultfs import FaultyVolume
from support.fs import Catalog
from support.loopdisk import LoopDisk
from support.mount import Mount, Watchdog

PG_URL_ENV = "VELOCITYFS_TEST_PG_URL"
WATCHDOG_ENV = "VELOCITYFS_TEST_WATCHDOG"
DEFAULT_WATCHDOG_SECONDS = 240.0  # below pytest-timeout's 300 s, so the abort wins


def pytest_configure(config: pytest.Config) -> None:
    """Register our marker so --strict-markers accepts it."""
    config.addinivalue_line(
        "markers",
        "watchdog(seconds): abort this test's FUSE mounts after `seconds` "
        f"(default {DEFAULT_WATCHDOG_SECONDS:.0f}, or ${WATCHDOG_ENV})",
    )


def velocityfs_cmd(catalog: str, store: str | os.PathLike[str], *args: str) -> list[str]:
    """The command line of the velocityfs CLI, run from this interpreter's environment."""
    return [sys.executable, "-m", "velocityfs", "--catalog", catalog, "--store", str(store), *args]


# -- infrastructure checks ------------------------------------------------------------


@pytest.fixture(scope="session")
def pg_server_url() -> str:
    """SQLAlchemy URL of the PostgreSQL server to create test databases on."""
    url = os.environ.get(PG_URL_ENV)
    if not url:
        pytest.fail(
            f"{PG_URL_ENV} is not set, so the PostgreSQL variant of this test cannot run. "
            "Run the suite through scripts/test (it starts a throwaway server), or set it to "
            "e.g. postgresql+psycopg://postgres@127.0.0.1:5432/postgres.",
            pytrace=False,
        )
    return url


@pytest.fixture(scope="session")
def fuse_available() -> None:
    """Fail (never skip) mount tests on a host that cannot mount FUSE."""
    if not Path("/dev/fuse").is_char_device():
        pytest.fail(
            "/dev/fuse is missing: this host cannot run FUSE mounts "
            "(load the fuse module, or give the container --device /dev/fuse).",
            pytrace=False,
        )
    if shutil.which("fusermount3") is None:
        pytest.fail("fusermount3 is not installed (Debian package fuse3).", pytrace=False)


# -- catalog and store ----------------------------------------------------------------


@pytest.fixture(params=["sqlite", "postgresql"], ids=["sqlite", "postgresql"])
def catalog_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """An empty catalog URL: a fresh SQLite file, or a fresh PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/catalog.sqlite"
        return
    if request.param != "postgresql":
        raise ValueError(f"unknown catalog backend {request.param!r}")

    import psycopg
    from psycopg import sql

    server = make_url(request.getfixturevalue("pg_server_url"))
    admin = server.set(drivername="postgresql").render_as_string(hide_password=False)
    name = f"vfs_{secrets.token_hex(8)}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield server.set(database=name).render_as_string(hide_password=False)
    finally:
        # FORCE: a daemon killed by a test may leave sessions the server has not reaped.
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """An empty store (the DEFAULT volume's top directory)."""
    store = tmp_path / "store"
    store.mkdir()
    return store


# -- running velocityfs ---------------------------------------------------------------


class CliError(subprocess.CalledProcessError):
    """A CLI call that had to succeed did not; the message carries its output."""

    def __str__(self) -> str:
        return (
            f"{' '.join(map(str, self.cmd))} exited with {self.returncode}\n"
            f"--- stdout ---\n{self.stdout}--- stderr ---\n{self.stderr}"
        )


@pytest.fixture
def cli(catalog_url: str, store_dir: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run the velocityfs CLI against this test's catalog and store.

    cli(*args, check=False, input=None, timeout=120.0, env=None, catalog=None, store=None)
    returns the CompletedProcess (text mode, output captured); check=True raises
    CliError (a CalledProcessError showing stdout/stderr) on a non-zero exit.
    """

    def run(
        *args: str,
        check: bool = False,
        input: str | None = None,  # same name as subprocess.run's
        timeout: float = 120.0,
        env: dict[str, str] | None = None,
        catalog: str | None = None,
        store: str | os.PathLike[str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        cmd = velocityfs_cmd(catalog or catalog_url, store or store_dir, *map(str, args))
        res = subprocess.run(
            cmd, input=input, capture_output=True, text=True, timeout=timeout, env=env, check=False
        )
        if check and res.returncode != 0:
            raise CliError(res.returncode, cmd, res.stdout, res.stderr)
        return res

    return run


@pytest.fixture
def fuse_watchdog(request: pytest.FixtureRequest) -> Iterator[Watchdog]:
    """Per-test deadline after which this test's FUSE connections are aborted.

    Set with @pytest.mark.watchdog(seconds) or $VELOCITYFS_TEST_WATCHDOG. A test that
    hung in a FUSE syscall then fails with ENOTCONN, and this fixture fails it too so
    the cause is named even if the test swallowed the error.
    """
    marker = request.node.get_closest_marker("watchdog")
    if marker is not None:
        seconds = float(marker.args[0])
    else:
        seconds = float(os.environ.get(WATCHDOG_ENV, DEFAULT_WATCHDOG_SECONDS))
    dog = Watchdog(seconds, request.node.nodeid).start()
    yield dog
    dog.stop()
    if dog.fired:
        pytest.fail(
            f"watchdog: test still running after {seconds:.0f} s; its FUSE mounts were aborted",
            pytrace=False,
        )


@pytest.fixture
def mount(
    tmp_path: Path,
    catalog_url: str,
    store_dir: Path,
    fuse_available: None,
    fuse_watchdog: Watchdog,
) -> Iterator[Callable[..., Mount]]:
    """Factory that mounts velocityfs and unmounts it (always) after the test.

    mount(*extra, mountpoint=None, catalog=None, store=None, env=None, timeout=30.0)
    starts ``velocityfs --catalog C --store S mount MNT *extra`` in a subprocess, waits
    for its ready line and the kernel mount, and returns a Mount. May be called several
    times per test: two mounts on one catalog, or a remount after m.stop()/m.kill9().
    The default mountpoint is tmp_path/"mnt", or "mnt2", "mnt3"... while that is in use.
    Daemon logs go to tmp_path/"mount-N.log" (Mount.log has the text).
    """
    mounts: list[Mount] = []

    def busy(path: Path) -> bool:
        return any(m.path == path and (m.alive or m.is_mounted()) for m in mounts)

    def start(
        *extra: str,
        mountpoint: str | os.PathLike[str] | None = None,
        catalog: str | None = None,
        store: str | os.PathLike[str] | None = None,
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
    ) -> Mount:
        if mountpoint is None:
            mnt, n = tmp_path / "mnt", 1
            while busy(mnt):
                n += 1
                mnt = tmp_path / f"mnt{n}"
        else:
            mnt = Path(mountpoint)
        cmd = velocityfs_cmd(
            catalog or catalog_url, store or store_dir, "mount", str(mnt), *map(str, extra)
        )
        m = Mount(cmd, mnt, tmp_path / f"mount-{len(mounts) + 1}.log", env=env)
        mounts.append(m)
        fuse_watchdog.register(m)
        return m.start(timeout=timeout)

    try:
        yield start
    finally:
        for m in reversed(mounts):
            m.teardown()


@pytest.fixture
def catalog(catalog_url: str, store_dir: Path) -> Iterator[Catalog]:
    """The service on this test's catalog: set-up and reading what it records."""
    c = Catalog(catalog_url, store_dir)
    yield c
    c.close()


@pytest.fixture
def vcli(catalog_url: str, store_dir: Path, monkeypatch: pytest.MonkeyPatch) -> InProcessCli:
    """The CLI run in this process (a separate one costs about a second of imports)."""
    return InProcessCli(catalog_url, store_dir).track(monkeypatch)


@pytest.fixture
def bare_cli(monkeypatch: pytest.MonkeyPatch) -> InProcessCli:
    """The CLI with no --catalog/--store: only what a configuration file says."""
    return InProcessCli(None, None).track(monkeypatch)


@pytest.fixture
def tmpfs() -> Iterator[Tmpfs]:
    """Small tmpfs disks for volumes that fill up; unmounted afterwards."""
    disks = Tmpfs()
    try:
        yield disks
    finally:
        disks.cleanup()


@pytest.fixture
def loop_disk(tmp_path: Path) -> Iterator[Callable[[Path], LoopDisk]]:
    """Factory: loop_disk(MOUNTPOINT) makes a 64 MiB ext4 disk on a loop device and
    mounts it there; afterwards every one is unmounted and detached."""
    disks: list[LoopDisk] = []

    def make(mountpoint: Path) -> LoopDisk:
        disk = LoopDisk(tmp_path / f"disk{len(disks)}.img", mountpoint)
        disks.append(disk)
        disk.mount()
        return disk

    try:
        yield make
    finally:
        for disk in reversed(disks):
            disk.cleanup()


# -- a volume whose disk fails on demand ------------------------------------------------


@pytest.fixture
def faulty_volume(
    tmp_path: Path, store_dir: Path, fuse_available: None, fuse_watchdog: Watchdog
) -> Iterator[Callable[..., FaultyVolume]]:
    """Factory: a volume whose disk fails on demand (tests/support/faultfs.py).

    faulty_volume(name="faulty") mounts faultfs over a fresh directory
    (tmp_path/"NAME-disk") on STORE/vol/NAME and returns a FaultyVolume: ``fail(op,
    errno, path=None)`` and ``clear()`` switch its faults, ``injected(op)`` counts those
    it answered, ``media(mid)`` is a backing file as it lies on the disk. Add it with
    ``velocityfs volume add NAME``. Afterwards its faults are cleared, every other mount
    of the test (the velocityfs daemons holding files open on it) is torn down, and
    only then is faultfs unmounted: it must exit with status 0.
    """
    volumes: list[FaultyVolume] = []

    def start(name: str = "faulty") -> FaultyVolume:
        volume = FaultyVolume(
            tmp_path / f"{name}-disk",
            store_dir / "vol" / name,
            tmp_path / f"{name}-faults.json",
            tmp_path / f"faultfs-{name}.log",
        )
        volumes.append(volume)
        fuse_watchdog.register(volume.mount)
        volume.mount.start()
        return volume

    try:
        yield start
    finally:
        for volume in volumes:
            volume.clear()  # no fault may stand in the way of a teardown
        ours = [volume.mount for volume in volumes]
        for m in reversed(fuse_watchdog.mounts):  # whichever fixture comes first
            if all(m is not mine for mine in ours):
                m.teardown()
        try:
            for volume in reversed(volumes):
                if volume.mount.alive:
                    volume.mount.stop()
        finally:
            for volume in reversed(volumes):
                volume.mount.teardown()
