#!/usr/bin/env python3
"""Benchmark: velocityfs writes on SQLite vs PostgreSQL, and two mounts on one catalog.

Rows, all measured in one run on the same disk (one work directory):

* ``native``: a plain directory on that disk (the ceiling, for the ratios);
* ``SQLite, 1 mount``: a fresh store with its SQLite catalog, one mount;
* ``PostgreSQL, 1 mount``: a fresh database on a private PostgreSQL server, one mount;
* ``PostgreSQL, 2 mounts``: two mounts of one store on one database (two "hosts" on one
  machine) writing the same amount at the same time: each mount's throughput, and the
  aggregate (all bytes over the time from the first start to the last finish).

Every write is a sequential ``os.write`` of ``--write-kib`` buffers (1 MiB) into a fresh
file, ``close()`` included, no fsync, after ``sync``; each row writes ``--size-mib`` per
run and mount, ``--runs`` times (the file is deleted between runs), and shows the
median throughput.

Catalog transactions: at a clean unmount each daemon logs ``unmounted; N catalog
transactions committed``. Mounts are stopped with ``fusermount3 -u`` and waited for, the
line is parsed, and N is shown per GiB written through that mount. N is the daemon's
whole life: start-up (load, holder registration), the grants and settlements of the
writes, and the background loops (a change-feed read every attribute timeout, a
heartbeat every lease/3, a reclaim every lease), so the ``mount s`` column gives the
lifetime it was counted over.

The PostgreSQL server is private to the run (initdb in /tmp, 127.0.0.1 on a free port,
trust auth, fsync=off, as scripts/test starts its own); mounts, servers and temporary
directories are all removed in ``finally``, Ctrl-C included. Run as root from the
repository: ``.venv/bin/python scripts/bench/multihost.py --size-mib 1024``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests"))

from support.pgserver import PrivatePostgres  # noqa: E402  (tests/support, no pytest)

MIB = 1 << 20
GIB = 1 << 30
READY_LINE = "velocityfs: mounted"
COMMITS = re.compile(r"unmounted; (\d+) catalog transactions committed")
MOUNT_TIMEOUT = 60.0
UNMOUNT_TIMEOUT = 120.0


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def mounted(path: Path) -> bool:
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == str(path) for line in f)


# velocityfs --------------------------------------------------------------------------


def velocityfs(catalog: str, store: Path, *args: str) -> None:
    cmd = [sys.executable, "-m", "velocityfs", "--catalog", catalog, "--store", str(store), *args]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stdout}{res.stderr}")


@dataclass
class Mount:
    """One ``velocityfs mount`` daemon in its own session, and its log."""

    catalog: str
    store: Path
    path: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    lifetime_s: float = 0.0
    commits: int | None = None

    def start(self) -> Mount:
        self.path.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable, "-m", "velocityfs", "--catalog", self.catalog,
            "--store", str(self.store), "mount", str(self.path),
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )
        self.started = time.monotonic()
        deadline = self.started + MOUNT_TIMEOUT
        while not (READY_LINE in self.log() and mounted(self.path)):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"velocityfs did not mount {self.path}:\n{self.log()}")
            time.sleep(0.05)
        return self

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """Unmount cleanly, wait for the daemon, read its transaction count."""
        assert self.proc is not None
        subprocess.run(["fusermount3", "-u", str(self.path)], check=True)
        try:
            code = self.proc.wait(timeout=UNMOUNT_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"velocityfs did not exit after unmounting:\n{self.log()}") from exc
        self.lifetime_s = time.monotonic() - self.started
        found = COMMITS.search(self.log())
        if code != 0 or found is None:
            raise RuntimeError(f"velocityfs exited with {code} (no commit count):\n{self.log()}")
        self.commits = int(found.group(1))

    def cleanup(self) -> None:
        """Whatever state it is in: no daemon, no mount left. Never raises."""
        with contextlib.suppress(Exception):
            if mounted(self.path):
                subprocess.run(["fusermount3", "-u", str(self.path)], capture_output=True)
            if self.proc is not None and self.proc.poll() is None:
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGTERM)
                    try:
                        self.proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        os.killpg(self.proc.pid, signal.SIGKILL)
                        self.proc.wait(timeout=10)
            if mounted(self.path):
                subprocess.run(["fusermount3", "-u", "-z", str(self.path)], capture_output=True)


# writing -------------------------------------------------------------------------------


@dataclass
class Timed:
    start: float
    end: float
    nbytes: int

    @property
    def mib_s(self) -> float:
        return self.nbytes / MIB / (self.end - self.start)


def write_file(path: Path, size: int, block: bytes) -> Timed:
    """Sequential writes of ``block`` into a fresh file, close included."""
    start = time.monotonic()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        left = size
        while left:
            left -= os.write(fd, block[: min(len(block), left)])
    finally:
        os.close(fd)
    return Timed(start, time.monotonic(), size)


def write_together(paths: list[Path], size: int, block: bytes) -> list[Timed]:
    """The same write into every path at once, one thread each (os.write drops the GIL)."""
    results: list[Timed | BaseException | None] = [None] * len(paths)
    barrier = threading.Barrier(len(paths))

    def run(i: int) -> None:
        try:
            barrier.wait()
            results[i] = write_file(paths[i], size, block)
        except BaseException as exc:
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(paths))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        if not isinstance(r, Timed):
            raise RuntimeError(f"a writer failed: {r!r}")
    return results  # type: ignore[return-value]


@dataclass
class Row:
    name: str
    mib_s: list[float] = field(default_factory=list)
    commits: int | None = None
    gib: float = 0.0
    lifetime_s: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.mib_s)


def runs_of(args: argparse.Namespace, dirs: list[Path], block: bytes) -> list[list[Timed]]:
    """``args.runs`` rounds of writing ``size`` into each dir at once; files deleted after."""
    size = args.size_mib * MIB
    rounds = []
    for n in range(args.runs):
        os.sync()
        paths = [d / f"bench-{n}-{i}.img" for i, d in enumerate(dirs)]
        rounds.append(write_together(paths, size, block))
        for p in paths:
            p.unlink()
    return rounds


def velocityfs_rows(
    args: argparse.Namespace,
    label: str,
    catalog: str | None,
    work: Path,
    mounts_n: int,
    block: bytes,
    live: list[Mount],
) -> list[Row]:
    key = f"{label}-{mounts_n}"
    store = work / f"store-{key}"
    store.mkdir()
    catalog = catalog or f"sqlite:///{store}/catalog.sqlite"
    quota_mib = args.size_mib * mounts_n * 4
    velocityfs(catalog, store, "init")
    velocityfs(catalog, store, "pool", "create", "bench", "--quota-mib", str(quota_mib))
    mounts = []
    for i in range(mounts_n):
        m = Mount(catalog, store, work / f"mnt-{key}-{i}", work / f"mount-{key}-{i}.log")
        live.append(m)
        mounts.append(m.start())
    rounds = runs_of(args, [m.path / "bench" for m in mounts], block)
    for m in mounts:
        m.stop()
    gib = args.size_mib * args.runs / 1024
    rows = []
    for i, m in enumerate(mounts):
        name = f"{label}, 1 mount" if mounts_n == 1 else f"{label}, mount {i + 1} of {mounts_n}"
        rows.append(Row(name, [r[i].mib_s for r in rounds], m.commits, gib, m.lifetime_s))
    if mounts_n > 1:
        aggregate = [
            sum(t.nbytes for t in r) / MIB / (max(t.end for t in r) - min(t.start for t in r))
            for r in rounds
        ]
        commits = sum(m.commits or 0 for m in mounts)
        rows.append(Row(f"{label}, {mounts_n} mounts aggregate", aggregate, commits, gib * 2))
    return rows


# output --------------------------------------------------------------------------------


def table(rows: list[Row], native: float) -> str:
    head = f"{'target':<40} {'MiB/s':>8} {'x native':>9} {'catalog tx':>11} {'tx/GiB':>8}"
    head += f" {'mount s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        tx = "" if r.commits is None else str(r.commits)
        per = "" if r.commits is None or not r.gib else f"{r.commits / r.gib:.1f}"
        life = "" if r.lifetime_s is None else f"{r.lifetime_s:.1f}"
        lines.append(
            f"{r.name:<40} {r.median:>8.0f} {r.median / native:>9.2f} {tx:>11} {per:>8} {life:>8}"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="per run and mount")
    parser.add_argument("--write-kib", type=int, default=1024, help="size of each write()")
    parser.add_argument("--runs", type=int, default=3, help="rounds per row (median shown)")
    parser.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()), help="work directory parent"
    )
    args = parser.parse_args()
    if os.geteuid() != 0:
        log("run as root (FUSE mounts, PostgreSQL as user postgres)")
        return 2
    block = bytes(range(256)) * (args.write_kib * 1024 // 256)

    work = Path(tempfile.mkdtemp(prefix="velocityfs-bench-", dir=args.dir))
    live: list[Mount] = []
    pg: PrivatePostgres | None = None
    try:
        log(f"work directory {work}")
        native_dir = work / "native"
        native_dir.mkdir()
        log("native")
        native = Row("native disk", [r[0].mib_s for r in runs_of(args, [native_dir], block)])
        rows = [native]
        log("SQLite, 1 mount")
        rows += velocityfs_rows(args, "SQLite", None, work, 1, block, live)
        log("starting a private PostgreSQL")
        pg = PrivatePostgres().init()
        log("PostgreSQL, 1 mount")
        url = pg.create_database("bench1")
        rows += velocityfs_rows(args, "PostgreSQL", url, work, 1, block, live)
        log("PostgreSQL, 2 mounts")
        url = pg.create_database("bench2")
        rows += velocityfs_rows(args, "PostgreSQL", url, work, 2, block, live)
    finally:
        for m in live:
            m.cleanup()
        if pg is not None:
            pg.close()
        shutil.rmtree(work, ignore_errors=True)

    disk = subprocess.run(
        ["stat", "-f", "-c", "%T", str(args.dir)], capture_output=True, text=True, check=False
    ).stdout.strip()
    print(
        f"velocityfs multi-host write benchmark: {args.size_mib} MiB per mount and run, "
        f"{args.write_kib} KiB writes, median of {args.runs} run(s); "
        f"{platform.node()} {platform.release()}, {os.cpu_count()} CPUs, work dir on {disk}"
    )
    print(table(rows, native.median))
    return 0


if __name__ == "__main__":
    sys.exit(main())
