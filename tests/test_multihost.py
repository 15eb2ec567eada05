"""Several hosts on one catalog (issue 7): two real mounts, one PostgreSQL, one store.

Each mount runs as its own daemon in its own UTS namespace with its own host name
(``unshare --uts``), so the two behave like two hypervisor hosts: a holder of grants
is only judged dead by its lease, never by a process check on "the same host"
(ledger.dead_holders trusts a pid only on the holder's own host). Mounts use a
configuration file (through ``VELOCITYFS_CONFIG``) with a short attribute timeout, so
other hosts' changes show within half a second; the killed host's test sets a short
lease in the catalog (``velocityfs lease set``), so it expires in seconds.

What is checked:

- the parent quota holds while writers on both hosts fill sibling pools, and usage
  equals the bytes written, to the byte, once they close; either host alone fills a
  pool to the byte;
- a host killed with SIGKILL keeps its room only until its lease expires; the other
  host then reclaims it, keeping the bytes the dead host really wrote;
- files created, changed and deleted on one host, and pools deleted through the API,
  show on the other within the attribute timeout;
- a catalog server stopped and restarted under a running mount: memory-served
  requests and writes within a grant go on, catalog changes fail with EIO after
  ``catalog_timeout_s``, and everything works again after the restart without a remount.

Every test runs on PostgreSQL only (SQLite cannot be shared between hosts) and fails,
never skips, without it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select
from support.fs import sync_dir, vattr
from support.mount import Mount, Watchdog
from support.pgserver import PrivatePostgres

from velocityfs.catalog.models import Holder
from velocityfs.service.velocity import Velocity

pytestmark = pytest.mark.parametrize("catalog_url", ["postgresql"], indirect=True)

MIB = 1 << 20
ATTR_TIMEOUT_S = 0.5
LEASE_S = 3.0
# How late a change may show on the other host: one refresh period (the attribute
# timeout) plus a transaction, the kernel's cached attributes and a loaded CI box.
VISIBLE_WITHIN_S = ATTR_TIMEOUT_S + 2.0
# Not a multiple of anything the kernel or the ledger rounds to.
CHUNK = MIB + 4099


# -- helpers ----------------------------------------------------------------------------


def write_config(path: Path, **values: float | str) -> dict[str, str]:
    """Write a velocityfs TOML configuration; return the environment that selects it."""
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return {**os.environ, "VELOCITYFS_CONFIG": str(path)}


def wait_for(
    predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05
) -> float:
    """Poll until ``predicate()`` is true; return the seconds it took, fail after ``timeout``."""
    started = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            pytest.fail(f"not within {timeout:.1f} s: {what}")
        time.sleep(interval)


def fill(path: Path, chunk: int = CHUNK, *, limit: int | None = None) -> int:
    """Create ``path`` and write ``chunk``-sized buffers until ENOSPC (or ``limit`` bytes).

    Returns the bytes written; short writes are expected near a quota.
    """
    buf = bytes([0xA5]) * chunk
    total = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        while limit is None or total < limit:
            want = chunk if limit is None else min(chunk, limit - total)
            try:
                total += os.write(fd, buf[:want])
            except OSError as exc:
                if exc.errno == errno.ENOSPC:
                    break
                raise
    finally:
        os.close(fd)
    return total


def size_of(path: Path) -> int | None:
    try:
        return os.stat(path).st_size
    except FileNotFoundError:
        return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    def answers() -> bool:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return True
        except OSError:
            return False

    wait_for(answers, timeout, f"the API listening on 127.0.0.1:{port}")


class Catalog:
    """The test's own view of the catalog, for facts no mount may fake."""

    def __init__(self, url: str, store: Path) -> None:
        self.v = Velocity(url, store)

    def pool(self, path: str):  # type: ignore[no-untyped-def]
        return self.v.pools.resolve(path)

    def used(self, path: str) -> int:
        return self.pool(path).used_bytes

    def quota(self, path: str) -> int:
        quota = self.pool(path).quota_bytes
        assert quota is not None
        return quota

    def grants(self) -> int:
        """Grant rows left. A writer's 0-byte lease row goes at FUSE RELEASE, which the
        kernel sends after close() has returned: wait for 0, do not assert it at once."""
        return sum(int(h["grants"]) for h in self.v.ledger.holders())

    def lease_expiry_ns(self, host: str) -> int:
        """When the lease of ``host``'s only holder runs out (the catalog's clock, ns)."""
        with self.v.db.transaction() as s:
            (expires,) = s.execute(select(Holder.expires_ns).where(Holder.host == host)).one()
        return int(expires)

    def holder_of(self, host: str) -> str:
        """The id of ``host``'s only holder."""
        with self.v.db.transaction() as s:
            return s.execute(select(Holder.id).where(Holder.host == host)).scalar_one()

    def reclaim_begun(self, holder_id: str) -> bool:
        """Whether a reclaim of the holder has begun: it is fenced, or already gone."""
        with self.v.db.transaction() as s:
            holder = s.get(Holder, holder_id)
            return holder is None or holder.fenced

    def holder_gone(self, holder_id: str) -> bool:
        with self.v.db.transaction() as s:
            return s.get(Holder, holder_id) is None

    def media_sizes(self, path: str) -> dict[str, int]:
        return {m.name: m.size for m in self.v.media.in_pool(self.pool(path).id)}

    def close(self) -> None:
        self.v.close()


@dataclass
class UsagePoller:
    """Samples pools' ``used_bytes`` from the catalog in a thread while writers run."""

    catalog: Catalog
    paths: list[str]
    samples: list[dict[str, int]] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._ids = {p: self.catalog.pool(p).id for p in self.paths}

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                by_id = {p.id: p.used_bytes for p in self.catalog.v.pools.all()}
                self.samples.append({path: by_id[pid] for path, pid in self._ids.items()})
            except BaseException as exc:  # reported by stop()
                self.errors.append(exc)
                return
            time.sleep(0.01)

    def __enter__(self) -> UsagePoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def peak(self, path: str) -> int:
        return max(s[path] for s in self.samples)


# -- fixtures ---------------------------------------------------------------------------


@pytest.fixture
def catalog(catalog_url: str, store_dir: Path, cli) -> Iterator[Catalog]:  # type: ignore[no-untyped-def]
    """The shared catalog, initialised, as the test sees it."""
    cli("init", check=True)
    c = Catalog(catalog_url, store_dir)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def host_mount(
    tmp_path: Path,
    catalog_url: str,
    store_dir: Path,
    fuse_available: None,
    fuse_watchdog: Watchdog,
) -> Iterator[Callable[..., Mount]]:
    """Factory: host_mount(host, *extra, env=None, catalog=None) mounts velocityfs as if on
    host ``host`` (its own UTS namespace and host name), on tmp_path/"mnt-HOST"; every
    mount is torn down after the test, whatever state it is in.
    """
    mounts: list[Mount] = []

    def start(
        host: str,
        *extra: str,
        env: dict[str, str] | None = None,
        catalog: str | None = None,
        timeout: float = 30.0,
    ) -> Mount:
        mnt = tmp_path / f"mnt-{host}"
        daemon = [
            sys.executable, "-m", "velocityfs", "--catalog", catalog or catalog_url,
            "--store", str(store_dir), "mount", str(mnt), *extra,
        ]  # fmt: skip
        # sh execs the daemon, so the Mount's pid (and process group) is the daemon's.
        cmd = ["unshare", "--uts", "--", "sh", "-c", 'hostname "$0" && exec "$@"', host, *daemon]
        m = Mount(cmd, mnt, tmp_path / f"mount-{host}-{len(mounts) + 1}.log", env=env)
        mounts.append(m)
        fuse_watchdog.register(m)
        return m.start(timeout=timeout)

    try:
        yield start
    finally:
        for m in reversed(mounts):
            m.teardown()


# -- quotas across hosts ----------------------------------------------------------------


def test_siblings_fill_parent_to_the_byte_from_both_hosts(
    cli, catalog: Catalog, host_mount, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    cli("pool", "create", "vms", "--quota-mib", "192.0001", check=True)
    cli("pool", "create", "vms/a", "--quota-mib", "160.0003", check=True)
    cli("pool", "create", "vms/b", "--quota-mib", "160", check=True)
    env = write_config(tmp_path / "velocityfs.toml", attr_timeout_s=ATTR_TIMEOUT_S)
    hosts = {"A": host_mount("host-a", env=env), "B": host_mount("host-b", env=env)}
    quota = catalog.quota("vms")
    assert catalog.quota("vms/a") + catalog.quota("vms/b") > quota

    # Two writers per host, one in each sibling: four writers race for the parent's room.
    jobs = [(h, child, i) for h in hosts for i, child in enumerate(("a", "b", "a", "b"))]
    written: dict[tuple[str, str, int], int] = {}
    failures: list[BaseException] = []

    def writer(job: tuple[str, str, int]) -> None:
        h, child, i = job
        try:
            written[job] = fill(hosts[h] / "vms" / child / f"{h}{i}.img")
        except BaseException as exc:
            failures.append(exc)

    with UsagePoller(catalog, ["vms", "vms/a", "vms/b"]) as poller:
        threads = [threading.Thread(target=writer, args=(job,)) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert not failures, failures
    assert not poller.errors, poller.errors
    print(f"{len(poller.samples)} usage samples while the writers ran")
    assert len(poller.samples) >= 5, "the poller saw too little of the run"
    assert poller.peak("vms") <= quota
    assert poller.peak("vms/a") <= catalog.quota("vms/a")
    assert poller.peak("vms/b") <= catalog.quota("vms/b")

    total = sum(written.values())
    assert total == quota, f"writers stopped at {total} bytes of {quota}"
    for mnt in hosts.values():
        for child in ("a", "b"):
            sync_dir(mnt / "vms" / child)
    assert catalog.used("vms") == total
    for child in ("a", "b"):
        expected = {f"{h}{i}.img": n for (h, c, i), n in written.items() if c == child}
        assert catalog.media_sizes(f"vms/{child}") == expected
        assert catalog.used(f"vms/{child}") == sum(expected.values())
    wait_for(lambda: catalog.grants() == 0, 5.0, "no grants left")

    # Both hosts see every file at its real size (the other host's ones after a refresh).
    for m in hosts.values():
        for (h, child, i), n in written.items():
            path = m / "vms" / child / f"{h}{i}.img"
            wait_for(lambda p=path, n=n: size_of(p) == n, VISIBLE_WITHIN_S, f"{path} is {n} B")

    # Either host alone fills a pool to the byte (quota of vms/a is not a whole MiB).
    quota_a = catalog.quota("vms/a")
    for name, m in hosts.items():
        for child in ("a", "b"):
            # Delete what the catalog has, once this host has learnt of all of it.
            names = sorted(catalog.media_sizes(f"vms/{child}"))
            wait_for(
                lambda d=m / "vms" / child, n=names: sorted(os.listdir(d)) == n,
                VISIBLE_WITHIN_S,
                f"host {name} lists the media of vms/{child}",
            )
            for entry in os.listdir(m / "vms" / child):
                os.unlink(m / "vms" / child / entry)
            sync_dir(m / "vms" / child)
        assert catalog.used("vms") == 0
        for other in hosts.values():
            wait_for(lambda o=other: not os.listdir(o / "vms" / "a"), VISIBLE_WITHIN_S, "empty")
        assert fill(m / "vms" / "a" / f"alone-{name}.img") == quota_a
        sync_dir(m / "vms" / "a")
        assert catalog.used("vms/a") == quota_a
        assert catalog.used("vms") == quota_a
        assert catalog.media_sizes("vms/a") == {f"alone-{name}.img": quota_a}
        wait_for(lambda: catalog.grants() == 0, 5.0, "no grants left")
        assert fill(m / "vms" / "a" / "over.img", limit=1) == 0  # not one byte more
        assert catalog.used("vms/a") == quota_a


# -- a crashed host -----------------------------------------------------------------------

HOLDER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
want, done = int(sys.argv[2]), 0
while done < want:
    done += os.write(fd, b"\x5a" * min(1 << 20, want - done))
print("written", done, flush=True)
sys.stdin.read()  # keep the file open until the test lets go
"""


def test_killed_host_room_is_reclaimed_after_its_lease(
    cli, catalog: Catalog, host_mount, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    cli("pool", "create", "vms", "--quota-mib", "32", check=True)
    cli("lease", "set", str(LEASE_S), check=True)
    env = write_config(tmp_path / "velocityfs.toml", attr_timeout_s=ATTR_TIMEOUT_S)
    a = host_mount("host-a", env=env)
    b = host_mount("host-b", env=env)
    quota = catalog.quota("vms")

    # A process on host A writes 4 MiB and keeps the file open: A holds a grant beyond it.
    a_bytes = 4 * MIB
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(a / "vms" / "crashed.img"), str(a_bytes)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        line = holder.stdout.readline()
        assert line.split() == ["written", str(a_bytes)], line + holder.stderr.read()
        held = catalog.used("vms")
        assert held > a_bytes, "host A should hold a grant beyond what it wrote"
        a.kill9()
    finally:
        holder.kill()
        holder.communicate(timeout=30)
    # A is dead: its last heartbeat is final, and so is the moment its lease runs out.
    expires_ns = catalog.lease_expiry_ns("host-a")

    # Until then A's room is not B's.
    first = fill(b / "vms" / "b1.img")
    left_ns = expires_ns - time.time_ns()
    assert left_ns > 0, f"B filled the pool {-left_ns / 1e9:.1f} s after A's lease ran out"
    assert first == quota - held, "host B got room host A still held (or less than was free)"
    assert catalog.used("vms") == quota

    # After the lease (and at most one reclaim period more) B gets A's unused room.
    buf = b"\xb2" * CHUNK
    fd = os.open(b / "vms" / "b2.img", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        second = 0
        deadline = time.monotonic() + 3 * LEASE_S + 10
        while True:
            try:
                second += os.write(fd, buf)
                break
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                if time.monotonic() > deadline:
                    pytest.fail(f"host A's room not reclaimed in time\n{b.log}")
                time.sleep(0.1)
        late_ns = time.time_ns() - expires_ns
        while True:
            try:
                second += os.write(fd, buf)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    finally:
        os.close(fd)
    print(f"B was refused the room A held {left_ns / 1e9:.2f} s before A's lease ran out")
    print(f"room reclaimed {late_ns / 1e9:.2f} s after the lease ran out")
    assert late_ns >= 0, f"room reclaimed {-late_ns / 1e9:.2f} s before A's lease ran out"
    assert "reclaimed 1 grant(s)" in b.log

    # The 4 MiB A really wrote stay charged; the rest of its grant went to B.
    assert second == held - a_bytes
    sync_dir(b / "vms")
    assert catalog.media_sizes("vms") == {"crashed.img": a_bytes, "b1.img": first, "b2.img": second}
    assert catalog.used("vms") == a_bytes + first + second == quota
    wait_for(lambda: catalog.grants() == 0, 5.0, "no grants left")
    wait_for(
        lambda: size_of(b / "vms" / "crashed.img") == a_bytes,
        VISIBLE_WITHIN_S,
        "host B sees the crashed writer's file at the size it reached",
    )
    with open(b / "vms" / "crashed.img", "rb") as f:
        assert f.read() == b"\x5a" * a_bytes


def test_a_file_unlinked_open_on_one_host_is_gone_on_the_other_and_reclaimed(
    cli, catalog: Catalog, host_mount, tmp_path: Path, store_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    """Issue 17 across hosts: a file unlinked while open on host A is gone from host B
    (listing, API view, name free) while A keeps writing it, charged to its pool; A
    is then killed, and B's reclaim after A's lease removes it and returns its room."""
    cli("pool", "create", "vms", "--quota-mib", "32", check=True)
    cli("lease", "set", str(LEASE_S), check=True)
    env = write_config(tmp_path / "velocityfs.toml", attr_timeout_s=ATTR_TIMEOUT_S)
    a = host_mount("host-a", env=env)
    b = host_mount("host-b", env=env)
    path = a / "vms" / "scratch.img"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"a" * (3 * MIB))
        os.fsync(fd)  # the size reaches the catalog
        sync_dir(a / "vms")  # and so does the create
        wait_for(lambda: size_of(b / "vms" / "scratch.img") == 3 * MIB, VISIBLE_WITHIN_S, "on B")
        backing = Path(vattr(path, "backing_path"))
        os.unlink(path)
        sync_dir(a / "vms")
        os.write(fd, b"b" * (2 * MIB))  # grows it past its first grant
        wait_for(lambda: not os.listdir(b / "vms"), VISIBLE_WITHIN_S, "gone from host B")
        assert catalog.media_sizes("vms") == {}
        (b / "vms" / "scratch.img").write_bytes(b"new\n")  # its name is free
        sync_dir(b / "vms")
        assert catalog.media_sizes("vms") == {"scratch.img": 4}
        assert catalog.used("vms") >= 5 * MIB + 4  # still charged for A's open file
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 6 * MIB, 0) == b"a" * (3 * MIB) + b"b" * (2 * MIB)
        a.kill9()
    finally:
        with contextlib.suppress(OSError):  # the connection is gone
            os.close(fd)
    wait_for(
        lambda: catalog.used("vms") == 4,
        3 * LEASE_S + 10,
        "host B's reclaim returns the room of A's unlinked open file",
    )
    assert not backing.exists()
    assert catalog.media_sizes("vms") == {"scratch.img": 4}
    assert sorted(os.listdir(b / "vms")) == ["scratch.img"]
    assert (b / "vms" / "scratch.img").read_bytes() == b"new\n"


# Opens every file named on the command line for writing (a lease each) until stdin closes.
OPEN_MANY = r"""
import os, sys
fds = [os.open(path, os.O_WRONLY) for path in sys.argv[1:]]
print("open", len(fds), flush=True)
sys.stdin.read()
"""


def bytes_on_disk(store: Path) -> int:
    """The apparent size of every backing file of the DEFAULT volume."""
    total = 0
    for path in (store / "media").glob("[0-9a-f][0-9a-f]/*"):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size
    return total


def test_a_host_stopped_past_its_lease_and_resumed_during_reclaim_loses_nothing(
    cli, catalog: Catalog, host_mount, tmp_path: Path, store_dir: Path
) -> None:  # type: ignore[no-untyped-def]
    """Issue 16 on real daemons: B holds 101 grants and appends to a file every 50 ms;
    B's daemon gets SIGSTOP; the moment A's reclaim has fenced it, SIGCONT; then A
    fills the pool. No pool passes its quota (in the catalog or on disk) at any
    sample, every acknowledged byte is kept, and B unmounts cleanly."""
    cli("pool", "create", "vms", "--quota-mib", "32", check=True)
    cli("lease", "set", str(LEASE_S), check=True)
    env = write_config(tmp_path / "velocityfs.toml", attr_timeout_s=ATTR_TIMEOUT_S)
    vms = catalog.pool("vms").id
    for i in range(100):
        catalog.v.media.create(vms, f"idle-{i:03}.img")
    a = host_mount("host-a", env=env)
    b = host_mount("host-b", env=env)
    quota = catalog.quota("vms")
    idle = subprocess.Popen(
        [
            sys.executable,
            "-c",
            OPEN_MANY,
            *(str(b / "vms" / f"idle-{i:03}.img") for i in range(100)),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    writer = RemoteWriter(b / "vms" / "log.img")
    acked = bytearray()
    refused: dict[int, int] = {}
    stop = threading.Event()

    def append() -> None:
        step = 0
        while not stop.is_set():
            data = bytes([step % 251 + 1]) * (64 * 1024 + 3)
            try:
                written = writer.pwrite(len(acked), len(data), data[0])
                acked.extend(data[:written])
                step += 1
            except OSError as exc:
                refused[exc.errno] = refused.get(exc.errno, 0) + 1
            time.sleep(0.05)

    disk: list[int] = []

    def sample_disk() -> None:
        while not stop.is_set():
            disk.append(bytes_on_disk(store_dir))
            time.sleep(0.02)

    try:
        assert idle.stdout is not None
        assert idle.stdout.readline().split() == ["open", "100"]
        with UsagePoller(catalog, ["vms"]) as poller:
            threads = [threading.Thread(target=f, daemon=True) for f in (append, sample_disk)]
            for thread in threads:
                thread.start()
            time.sleep(1.0)
            stalled = catalog.holder_of("host-b")
            before_stall = len(acked)
            os.kill(b.pid, signal.SIGSTOP)
            try:
                wait_for(
                    lambda: catalog.reclaim_begun(stalled),
                    3 * LEASE_S + 10,
                    "host A fencing host B's holder",
                    interval=0.005,
                )
            finally:
                os.kill(b.pid, signal.SIGCONT)
            wait_for(lambda: catalog.holder_gone(stalled), 3 * LEASE_S + 10, "the reclaim done")
            filled = fill(a / "vms" / "fill.img", MIB)
            time.sleep(2.0)
            stop.set()
            for thread in threads:
                thread.join(timeout=30)
        writer.close()
    finally:
        stop.set()
        writer.kill()
        idle.kill()
        idle.communicate(timeout=30)
    b.stop()
    print(
        f"samples {len(poller.samples)} (catalog) and {len(disk)} (disk); peak usage "
        f"{poller.peak('vms')} and bytes on disk {max(disk)} against a quota of {quota}; "
        f"acknowledged {len(acked)} bytes ({before_stall} before the stall), A filled "
        f"{filled}; B's writes refused: {refused}"
    )
    assert poller.peak("vms") <= quota
    assert max(disk) <= quota, f"bytes on disk passed the quota by {max(disk) - quota}"
    assert len(acked) > before_stall
    sync_dir(a / "vms")
    wait_for(lambda: size_of(a / "vms" / "log.img") == len(acked), VISIBLE_WITHIN_S, "log.img on A")
    assert (a / "vms" / "log.img").read_bytes() == bytes(acked)
    sizes = catalog.media_sizes("vms")
    assert sizes["log.img"] == len(acked)
    assert catalog.used("vms") == sum(sizes.values()) == bytes_on_disk(store_dir) <= quota
    wait_for(lambda: catalog.grants() == 0, 5.0, "no grants left")


# -- changes seen by the other host -------------------------------------------------------


def test_changes_on_one_host_show_on_the_other(
    cli, catalog: Catalog, host_mount, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    cli("pool", "create", "vms", "--quota-mib", "64", check=True)
    cli("pool", "create", "scratch", "--quota-mib", "16", check=True)
    cli("pool", "create", "scratch/sub", check=True)
    cli("user", "add", "alice", "--password-stdin", input="s3cret pw\n", check=True)
    cli("group", "add", "ops", check=True)
    cli("member", "add", "ops", "alice", check=True)
    cli("share", "scratch", "ops", "--all", check=True)
    env = write_config(tmp_path / "velocityfs.toml", attr_timeout_s=ATTR_TIMEOUT_S)
    port = free_port()
    a = host_mount("host-a", "--api", f"127.0.0.1:{port}", env=env)
    b = host_mount("host-b", env=env)

    # Created on A: on B within the attribute timeout, bytes and all.
    data = os.urandom(3 * MIB + 17)
    (a / "vms" / "disk.img").write_bytes(data)
    took = wait_for(lambda: size_of(b / "vms" / "disk.img") == len(data), VISIBLE_WITHIN_S, "new")
    print(f"new media visible on the other host after {took:.2f} s")
    assert (b / "vms" / "disk.img").read_bytes() == data
    assert "disk.img" in os.listdir(b / "vms")

    # Changed on B (A has its pages cached): A sees the new size and the new bytes.
    assert (a / "vms" / "disk.img").read_bytes() == data
    more = os.urandom(MIB + 3)
    with open(b / "vms" / "disk.img", "r+b") as f:
        f.seek(MIB)
        f.write(more)
    changed = data[:MIB] + more + data[MIB + len(more) :]
    wait_for(lambda: size_of(a / "vms" / "disk.img") == len(changed), VISIBLE_WITHIN_S, "size")
    wait_for(
        lambda: (a / "vms" / "disk.img").read_bytes() == changed,
        VISIBLE_WITHIN_S,
        "host A reads the bytes host B wrote",
    )

    # Deleted on B: gone from A within the attribute timeout.
    os.unlink(b / "vms" / "disk.img")
    took = wait_for(lambda: size_of(a / "vms" / "disk.img") is None, VISIBLE_WITHIN_S, "gone")
    print(f"removed media gone from the other host after {took:.2f} s")
    assert "disk.img" not in os.listdir(a / "vms")
    assert catalog.used("vms") == 0

    # A pool with a subpool and media, deleted through A's API: gone from both mounts.
    (b / "scratch" / "sub" / "x.img").write_bytes(b"x" * 1000)
    wait_for(lambda: size_of(a / "scratch" / "sub" / "x.img") == 1000, VISIBLE_WITHIN_S, "x")
    wait_port(port)
    base = f"http://127.0.0.1:{port}"
    auth = httpx.post(f"{base}/u/auth", json={"name": "alice", "password": "s3cret pw"})
    assert auth.status_code == 200, auth.text
    pid = catalog.pool("scratch").id
    assert os.getxattr(a / "scratch", "user.velocity.pid").decode() == pid
    gone = httpx.request(
        "DELETE", f"{base}/p", json={"authkey": auth.json()["authkey"], "pid": pid}
    )
    assert gone.status_code == 200, gone.text
    wait_for(lambda: not (a / "scratch").exists(), 1.0, "the pool gone from host A")
    took = wait_for(lambda: not (b / "scratch").exists(), VISIBLE_WITHIN_S, "pool gone from B")
    print(f"removed pool gone from the other host after {took:.2f} s")
    for m in (a, b):
        assert sorted(os.listdir(m)) == ["vms"]
        assert not (m / "scratch" / "sub" / "x.img").exists()
    assert [p.name for p in catalog.v.pools.all() if p.parent_id is None] == ["vms"]



def test_with_a_long_attribute_timeout_other_hosts_changes_still_show_within_a_refresh(
    cli, catalog: Catalog, host_mount, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    """The kernel may cache names and attributes for a minute: the follower still reads
    the catalog every second (fs.follow.REFRESH_MAX_S) and drops what another host
    changed from the kernel's caches, after the kernel had it cached here."""
    cli("pool", "create", "vms", "--quota-mib", "64", check=True)
    cli("pool", "create", "vms/sub", check=True)
    env = write_config(tmp_path / "velocityfs.toml", attr_timeout_s=60.0)
    a = host_mount("host-a", env=env)
    b = host_mount("host-b", env=env)
    within = 1.0 + 2.0  # a refresh period, a transaction, a loaded box
    (a / "vms" / "disk.img").write_bytes(b"x" * 4096)
    (a / "vms" / "old.img").write_bytes(b"o" * 100)
    sync_dir(a / "vms")
    wait_for(lambda: size_of(b / "vms" / "disk.img") == 4096, within, "the media on B")
    wait_for(lambda: size_of(b / "vms" / "old.img") == 100, within, "old.img on B")
    media, pool = b / "vms" / "disk.img", b / "vms" / "sub"
    assert stat.S_IMODE(os.stat(media).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(pool).st_mode) == 0o755

    os.chmod(a / "vms" / "disk.img", 0o600)
    os.chown(a / "vms" / "disk.img", 1234, 5678)
    os.chmod(a / "vms" / "sub", 0o700)
    os.utime(a / "vms" / "sub", ns=(10**18, 10**18))
    wait_for(lambda: stat.S_IMODE(os.stat(media).st_mode) == 0o600, within, "the mode on B")
    wait_for(lambda: os.stat(media).st_uid == 1234, within, "the owner on B")
    assert os.stat(media).st_gid == 5678
    wait_for(lambda: stat.S_IMODE(os.stat(pool).st_mode) == 0o700, within, "the pool's mode")
    wait_for(lambda: os.stat(pool).st_mtime_ns == 10**18, within, "the pool's times")

    with open(a / "vms" / "disk.img", "r+b") as f:
        f.truncate(3 * 4096)
    sync_dir(a / "vms")
    wait_for(lambda: size_of(media) == 3 * 4096, within, "the new size on B")
    os.rename(a / "vms" / "old.img", a / "vms" / "new.img")
    wait_for(lambda: size_of(b / "vms" / "old.img") is None, within, "the old name gone on B")
    assert size_of(b / "vms" / "new.img") == 100


# -- the catalog server goes away and comes back ------------------------------------------


@pytest.fixture
def private_pg() -> Iterator[PrivatePostgres]:
    """A PostgreSQL server of this test's own, which it may stop and start at will."""
    server = PrivatePostgres()
    try:
        server.init()
        yield server
    finally:
        server.close()


# FUSE sends FLUSH on every close() of a descriptor, including the close-on-exec copies
# in any child the test process forks (pg_ctl, fusermount3), and a flush by the last
# writer settles and returns its grant. So the long-lived writer runs in a process of
# its own, as a VM would, and keeps its grant while the test forks what it likes.
WRITER = r"""
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
print("open", flush=True)
for line in sys.stdin:
    words = line.split()
    try:
        if words[0] == "close":
            os.close(fd)
            print("ok 0", flush=True)
            break
        off, n, byte = map(int, words)
        print("ok", os.pwrite(fd, bytes([byte]) * n, off), flush=True)
    except OSError as exc:
        print("err", exc.errno, flush=True)
"""


class RemoteWriter:
    """A file open for writing in another process; pwrite() and close() run there."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._reply() == "open"

    def _reply(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        assert line, "the writer process died"
        return line

    def _call(self, command: str) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        status, value = self._reply().split()
        if status == "err":
            raise OSError(int(value), os.strerror(int(value)))
        return int(value)

    def pwrite(self, off: int, n: int, byte: int) -> int:
        return self._call(f"{off} {n} {byte}")

    def close(self) -> None:
        self._call("close")
        self.proc.wait(timeout=30)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=30)


def test_catalog_outage_under_a_running_mount(
    cli, private_pg: PrivatePostgres, store_dir: Path, host_mount, tmp_path: Path
) -> None:  # type: ignore[no-untyped-def]
    timeout_s = 2.0
    url = private_pg.create_database("velocityfs")
    cli("init", catalog=url, check=True)
    cli("pool", "create", "vms", "--quota-mib", "256", catalog=url, check=True)
    env = write_config(
        tmp_path / "velocityfs.toml",
        attr_timeout_s=ATTR_TIMEOUT_S,
        catalog_timeout_s=timeout_s,
    )
    m = host_mount("host-a", env=env, catalog=url)
    pool = m / "vms"

    def expect_eio(action: Callable[[], object], what: str) -> None:
        started = time.monotonic()
        with pytest.raises(OSError) as failed:
            action()
        waited = time.monotonic() - started
        assert failed.value.errno == errno.EIO, f"{what}: {failed.value}"
        assert timeout_s * 0.75 <= waited <= timeout_s + 10, f"{what}: EIO after {waited:.1f} s"
        assert m.alive, f"the daemon died on {what}\n{m.log}"

    kept = os.urandom(MIB + 5)
    (pool / "kept.img").write_bytes(kept)
    reader = os.open(pool / "kept.img", os.O_RDONLY)
    mid_of_kept = vattr(pool / "kept.img", "mid")
    writer = RemoteWriter(pool / "growing.img")
    try:
        assert writer.pwrite(0, MIB, 1) == MIB
        assert writer.pwrite(MIB, MIB, 1) == MIB
        # What the mount holds beyond the bytes written is its grant; the catalog knows it.
        c = Catalog(url, store_dir)
        try:
            room = c.used("vms") - len(kept) - 2 * MIB
        finally:
            c.close()
        assert room >= MIB, f"no grant left to write into: {room} bytes"
        kept_writer = os.open(pool / "kept.img", os.O_WRONLY)

        private_pg.stop("fast")
        try:
            # A close only queues its settlement; the batch waits for the catalog.
            os.close(kept_writer)
            # Served from memory: reads, attributes, listings.
            assert vattr(pool / "kept.img", "mid") == mid_of_kept
            assert os.pread(reader, len(kept) + 10, 0) == kept
            assert os.stat(pool / "kept.img").st_size == len(kept)
            assert os.stat(pool / "growing.img").st_size == 2 * MIB
            assert sorted(os.listdir(pool)) == ["growing.img", "kept.img"]
            assert (pool / "kept.img").read_bytes() == kept  # a new open for reading
            # A write within the grant needs no catalog.
            assert writer.pwrite(2 * MIB, MIB, 2) == MIB
            assert os.stat(pool / "growing.img").st_size == 3 * MIB

            # Whatever needs the catalog fails with EIO once catalog_timeout_s has passed,
            # and the mount lives on: a new file, a write far past the grant.
            expect_eio(
                lambda: os.open(pool / "lost.img", os.O_WRONLY | os.O_CREAT, 0o644), "create"
            )
            assert not (pool / "lost.img").exists()
            expect_eio(lambda: writer.pwrite(512 * MIB, 1, 9), "a write past the grant")
            assert os.stat(pool / "growing.img").st_size == 3 * MIB
        finally:
            private_pg.start()

        # Back without a remount: new files and writes work within a few seconds.
        deadline = time.monotonic() + 10.0
        while True:
            try:
                fd = os.open(pool / "after.img", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                break
            except OSError as exc:
                if exc.errno != errno.EIO or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        try:
            assert os.write(fd, b"\x03" * (3 * MIB + 1)) == 3 * MIB + 1
        finally:
            os.close(fd)
        assert writer.pwrite(3 * MIB, 7, 4) == 7
        writer.close()
        sync_dir(pool)  # the closes reach the catalog: it must be back
    finally:
        writer.kill()
        os.close(reader)

    sizes = {"kept.img": len(kept), "growing.img": 3 * MIB + 7, "after.img": 3 * MIB + 1}
    assert {name: size_of(pool / name) for name in sizes} == sizes
    grown = b"\x01" * (2 * MIB) + b"\x02" * MIB + b"\x04" * 7
    assert (pool / "growing.img").read_bytes() == grown
    c = Catalog(url, store_dir)
    try:
        assert c.media_sizes("vms") == sizes
        assert c.used("vms") == sum(sizes.values())
        wait_for(lambda: c.grants() == 0, 5.0, "no grants left")
        # No backing file was left behind by the create that failed.
        backing = [p for p in (store_dir / "media").glob("[0-9a-f][0-9a-f]/*") if p.is_file()]
        assert len(backing) == len(sizes)
    finally:
        c.close()
    m.stop()
