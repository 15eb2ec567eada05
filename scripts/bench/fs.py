#!/usr/bin/env python3
"""Filesystem benchmark: velocityfs against the bare disk, mergerfs and pyfuse3's example.

What it measures, on three targets that all live on the same disk (one work directory):

* ``native``: a plain directory on that disk (the ceiling);
* ``velocityfs``: a fresh SQLite catalog and store in the work directory, pool ``bench``,
  mounted with ``velocityfs mount`` in a subprocess; the benchmark runs in ``MNT/bench``;
* ``mergerfs``: mergerfs with the native directory as its only branch, i.e. a FUSE
  pass-through written in C. It is the "what FUSE itself costs" baseline.
* ``passthrough``: ``examples/passthroughfs.py`` of the installed pyfuse3 release, run
  as it ships (fetched from that release's source on PyPI) over a native directory:
  what a pyfuse3 filesystem costs with no catalog at all, the issue's bar. It sets its
  entry and attribute timeouts to 0, so it asks the kernel for more round trips than
  the others (every stat is one anyway, see below).

Rows: sequential write (``os.write`` of 1 MiB buffers into a fresh file, close included,
no fsync), sequential read of that file in 1 MiB reads after dropping the page cache,
``cp`` of a file from the native disk into the target, create / stat / unlink of many
4 KiB files (stat after the FUSE attribute caches have expired, so each stat is a round
trip), and ``ls -l`` of a large directory (once right after creating it, once again).
Then the users' own workloads (scripts/bench/workloads.py): ``rsync -a`` of a media tree
(small files in subdirectories and one large image), fio 4 KiB random write and read
(psync, iodepth 1) on a VM disk file, and ``qemu-img convert`` of a sparse raw image
into the target and back out.

For every velocityfs row it also prints the kernel requests and catalog transactions per
operation (``req/op``, ``txn/op``; the operation is named in the last column), taken from
the daemon's own counts (``kill -USR1``) around each measurement. Those two do not depend
on noise: steer by them.

Why ratios: absolute numbers depend on the machine and on whatever else runs on it (a
shared 2-core box is noisy). Every target is measured in the same run on the same disk,
interleaved row by row, so ``target / native`` (for throughputs and op rates) or
``native_seconds / target_seconds`` (for times) is comparable across machines and runs:
1.0 means as fast as the bare disk, above 1 faster, below 1 slower. Comparing the
velocityfs ratio with the mergerfs ratio separates what any FUSE filesystem pays (the
kernel round trips) from what velocityfs itself adds (Python, trio, the catalog).

mergerfs runs with the same kernel caching contract as velocityfs by default: pyfuse3
replies to open() with keep_cache and without direct_io, which is mergerfs'
``cache.files=full``; attribute and entry timeouts are both 1 s; and the mount's
``read_ahead_kb`` is raised to the value velocityfs sets on its own mount. Use
``--mergerfs-cache off`` for mergerfs' direct-I/O mode instead.

A row whose samples spread widely (on this kind of machine: create, and the sequential
rows) can be measured on its own more often, e.g. ``--only files --repeat 9``; the
medians then rest on more samples in the same time.

Caches: every timed write starts after ``sync``; every read pass starts after ``sync`` and
``echo 3 > /proc/sys/vm/drop_caches`` (root), falling back to ``posix_fadvise(DONTNEED)``
on the file and its backing file. The ``cp`` source is read once before each copy, so
the copy measures the destination's write path, not the source disk.

Run as root (FUSE mounts, drop_caches), from the repository:
``.venv/bin/python scripts/bench/fs.py --size-mib 1024 --files 5000 --entries 20000``.
To compare two builds, measure software only: ``--memory`` puts every target on a
tmpfs, where the disk's write-back (3x between samples here) cannot move the rows,
and run the two builds alternately, several times each.
Nothing is left mounted on exit, Ctrl-C included; the work directory is removed unless
``--keep``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import workloads

MIB = 1 << 20
SMALL_FILE = 4096
REPO = Path(__file__).resolve().parents[2]
TARGETS = ("native", "velocityfs", "mergerfs", "passthrough")
# Rows measured together, selectable with --only.
GROUPS = ("sequential", "cp", "files", "ls", "rsync", "fio", "qemu")
MEMORY_FILESYSTEMS = {"tmpfs", "ramfs", "ramfs/tmpfs"}
VELOCITYFS_READY = "velocityfs: mounted"
VELOCITYFS_COUNTS = "velocityfs: counts "
MOUNT_TIMEOUT = 60.0
ATTR_TIMEOUT = 1  # seconds, velocityfs' default --attr-timeout; mergerfs gets the same
CACHE_EXPIRY_WAIT = ATTR_TIMEOUT + 0.5


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


# mounts -------------------------------------------------------------------------------


def _unescape(field_: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field_)


def mounts() -> dict[str, str]:
    """Mount point -> ``major:minor`` of the mounted filesystem, from our mount table."""
    table: dict[str, str] = {}
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            table[_unescape(parts[4])] = parts[2]
    return table


def is_mounted(path: Path) -> bool:
    return str(path) in mounts()


def fs_type(path: Path) -> str:
    out = subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


class FuseMount:
    """A FUSE daemon run in the foreground as a child, and its mount.

    The child gets its own session, so a Ctrl-C on the terminal reaches only this
    script, which then unmounts in order instead of racing the daemon's own handler.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        mountpoint: Path,
        log_path: Path,
        ready_line: str | None = None,
    ) -> None:
        self.name = name
        self.argv = argv
        self.mountpoint = mountpoint
        self.log_path = log_path
        self.ready_line = ready_line
        self.proc: subprocess.Popen[bytes] | None = None
        self.device: str | None = None

    def start(self) -> None:
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        if is_mounted(self.mountpoint):
            raise RuntimeError(f"{self.mountpoint} is already mounted")
        with open(self.log_path, "wb") as log_file:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + MOUNT_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with status {self.proc.returncode} before mounting:\n"
                    + self.log_tail()
                )
            ready = self.ready_line is None or self.ready_line in self.log_path.read_text(
                errors="replace"
            )
            table = mounts()
            if ready and str(self.mountpoint) in table:
                self.device = table[str(self.mountpoint)]
                return
            time.sleep(0.05)
        raise RuntimeError(
            f"{self.name} did not mount within {MOUNT_TIMEOUT:.0f} s:\n" + self.log_tail()
        )

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def bdi(self) -> Path | None:
        if self.device is None:
            return None
        return Path(f"/sys/class/bdi/{self.device}")

    def read_ahead_kb(self) -> int | None:
        bdi = self.bdi()
        try:
            return int((bdi / "read_ahead_kb").read_text()) if bdi else None
        except OSError:
            return None

    def set_read_ahead_kb(self, kb: int) -> None:
        bdi = self.bdi()
        if bdi is not None:
            with contextlib.suppress(OSError):
                (bdi / "read_ahead_kb").write_text(str(kb))

    def peak_rss_mib(self) -> float | None:
        if self.proc is None or self.proc.poll() is not None:
            return None
        try:
            status = Path(f"/proc/{self.proc.pid}/status").read_text()
        except OSError:
            return None
        match = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
        return int(match.group(1)) / 1024 if match else None

    def counts(self) -> dict[str, int]:
        """The daemon's counts so far (velocityfs prints them on SIGUSR1): kernel requests
        by kind and catalog transactions."""
        assert self.proc is not None
        seen = self.log_path.read_text(errors="replace").count(VELOCITYFS_COUNTS)
        self.proc.send_signal(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            text = self.log_path.read_text(errors="replace")
            lines = [line for line in text.splitlines() if line.startswith(VELOCITYFS_COUNTS)]
            if len(lines) > seen:
                pairs = (pair.split("=") for pair in lines[-1].split()[2:])
                return {key: int(value) for key, value in pairs}
            time.sleep(0.01)
        raise RuntimeError(f"{self.name} printed no counts within 10 s:\n" + self.log_tail())

    def _abort_connection(self) -> None:
        """Last resort for a hung daemon: abort our own FUSE connection via fusectl."""
        if self.device is None:
            return
        minor = self.device.split(":")[1]
        with contextlib.suppress(OSError):
            Path(f"/sys/fs/fuse/connections/{minor}/abort").write_text("1")

    def stop(self) -> None:
        """Unmount (``fusermount3 -u``, then ``-u -z``) and make sure the daemon is gone."""
        mp = str(self.mountpoint)
        if is_mounted(self.mountpoint):
            done = subprocess.run(["fusermount3", "-u", mp], capture_output=True)
            if done.returncode != 0 and is_mounted(self.mountpoint):
                log(f"{self.name}: fusermount3 -u failed ({done.stderr.decode().strip()}); -u -z")
                subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                log(f"{self.name}: daemon still running after unmount; SIGTERM")
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    log(f"{self.name}: SIGKILL")
                    self._abort_connection()
                    self.proc.kill()
                    self.proc.wait(timeout=30)
        if is_mounted(self.mountpoint):
            self._abort_connection()
            subprocess.run(["fusermount3", "-u", "-z", mp], capture_output=True)
        if is_mounted(self.mountpoint):
            log(f"WARNING: {mp} is still mounted")


def velocityfs_command() -> list[str]:
    beside_python = Path(sys.executable).parent / "velocityfs"
    for candidate in (REPO / ".venv" / "bin" / "velocityfs", beside_python):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return [str(candidate)]
    found = shutil.which("velocityfs")
    return [found] if found else [sys.executable, "-m", "velocityfs"]


# caches -------------------------------------------------------------------------------


class Caches:
    """Make the next read cold: drop_caches when writable, else fadvise(DONTNEED)."""

    def __init__(self) -> None:
        self.methods: set[str] = set()

    def drop(self, *paths: Path) -> None:
        os.sync()
        try:
            Path("/proc/sys/vm/drop_caches").write_text("3\n")
        except OSError:
            pass
        else:
            self.methods.add("drop_caches")
            return
        for path in paths:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            except OSError:
                pass
            finally:
                os.close(fd)
        self.methods.add("fadvise" if paths else "none")

    @property
    def description(self) -> str:
        return "+".join(sorted(self.methods)) or "not needed"


# measurements -------------------------------------------------------------------------


def _write_all(fd: int, buf: bytes | memoryview) -> None:
    view = memoryview(buf)
    while view:
        view = view[os.write(fd, view) :]


def seq_write(path: Path, size_mib: int, block: bytes) -> float:
    """Seconds to create ``path`` and write ``size_mib`` 1 MiB buffers into it, close included."""
    start = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        for _ in range(size_mib):
            _write_all(fd, block)
    finally:
        os.close(fd)
    return time.perf_counter() - start


def seq_read(path: Path, expected: int, buf: bytearray) -> float:
    """Seconds to open and read ``path`` to its end in 1 MiB reads."""
    start = time.perf_counter()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    total = 0
    try:
        while n := os.readv(fd, [buf]):
            total += n
    finally:
        os.close(fd)
    elapsed = time.perf_counter() - start
    if total != expected:
        raise RuntimeError(f"read {total} bytes from {path}, expected {expected}")
    return elapsed


def read_through(path: Path, buf: bytearray) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)


def timed_cp(source: Path, dest: Path) -> float:
    start = time.perf_counter()
    subprocess.run(["cp", str(source), str(dest)], check=True)
    return time.perf_counter() - start


def small_files(
    directory: Path, count: int, phase_done: Callable[[str], None]
) -> tuple[float, float, float]:
    """Seconds to create (4 KiB each), stat and unlink ``count`` files in a new directory;
    ``phase_done`` is told the end of each (create, stat, unlink), outside the timings."""
    directory.mkdir()
    names = [str(directory / f"f{i:06d}") for i in range(count)]
    payload = b"v" * SMALL_FILE
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    os.sync()
    t0 = time.perf_counter()
    for name in names:
        fd = os.open(name, flags, 0o644)
        try:
            _write_all(fd, payload)
        finally:
            os.close(fd)
    t1 = time.perf_counter()
    phase_done("create")
    # Let the FUSE targets' name and attribute caches expire (1 s on both), so that every
    # stat is a round trip on each of them; otherwise the target that created its files
    # fastest would find more of them still cached.
    time.sleep(CACHE_EXPIRY_WAIT)
    t2 = time.perf_counter()
    sizes = [os.stat(name).st_size for name in names]
    t3 = time.perf_counter()
    phase_done("stat")
    for name in names:
        os.unlink(name)
    t4 = time.perf_counter()
    phase_done("unlink")
    directory.rmdir()
    if any(size != SMALL_FILE for size in sizes):
        raise RuntimeError(f"{directory}: a small file did not read back as {SMALL_FILE} bytes")
    return t1 - t0, t3 - t2, t4 - t3


def populate(directory: Path, count: int) -> None:
    directory.mkdir()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC
    for i in range(count):
        os.close(os.open(directory / f"e{i:06d}", flags, 0o644))


def timed_ls(directory: Path) -> float:
    start = time.perf_counter()
    subprocess.run(
        ["ls", "-l", str(directory)],
        check=True,
        stdout=subprocess.DEVNULL,
        env={**os.environ, "LC_ALL": "C"},
    )
    return time.perf_counter() - start


# results ------------------------------------------------------------------------------


@dataclass
class Row:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    per: str  # the operation velocityfs' requests and transactions are counted per
    samples: dict[str, list[float]] = field(default_factory=lambda: {t: [] for t in TARGETS})
    # velocityfs' (kernel requests, catalog transactions) per operation, each sample
    counts: list[tuple[float, float]] = field(default_factory=list)

    def add(self, target: str, value: float) -> None:
        self.samples[target].append(value)

    def per_op(self, which: int) -> float | None:
        """Median requests (0) or transactions (1) per operation of velocityfs."""
        values = [c[which] for c in self.counts]
        return statistics.median(values) if values else None

    def median(self, target: str) -> float | None:
        values = self.samples[target]
        return statistics.median(values) if values else None

    def ratio(self, target: str, baseline: str = "native") -> float | None:
        """>1 means ``target`` is faster than ``baseline``."""
        value, base = self.median(target), self.median(baseline)
        if value is None or base is None or value == 0 or base == 0:
            return None
        return value / base if self.higher_is_better else base / value

    def as_dict(self) -> dict[str, Any]:
        return {
            "row": self.key,
            "label": self.label,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            **{t: {"median": self.median(t), "samples": self.samples[t]} for t in TARGETS},
            "ratio_to_native": {t: self.ratio(t) for t in TARGETS[1:]},
            "velocityfs_to_mergerfs": self.ratio("velocityfs", "mergerfs"),
            "velocityfs_to_passthrough": self.ratio("velocityfs", "passthrough"),
            "velocityfs_per_op": {
                "operation": self.per,
                "requests": self.per_op(0),
                "transactions": self.per_op(1),
            },
        }


def fmt_value(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value:.3f}"
    return f"{value:,.0f}" if value >= 100 else f"{value:.1f}"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}" if value < 0.095 else f"{value:.2f}"


def fmt_per_op(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def table(rows: list[Row]) -> str:
    header = ["row", "unit", "native"]
    for target in TARGETS[1:]:
        header += [target, "ratio"]
    header += ["vfs/mfs", "vfs/pt", "req/op", "txn/op", "op"]
    lines = [
        [row.label, row.unit, fmt_value(row.median("native"), row.unit)]
        + [
            cell
            for target in TARGETS[1:]
            for cell in (fmt_value(row.median(target), row.unit), fmt_ratio(row.ratio(target)))
        ]
        + [
            fmt_ratio(row.ratio("velocityfs", "mergerfs")),
            fmt_ratio(row.ratio("velocityfs", "passthrough")),
            fmt_per_op(row.per_op(0)),
            fmt_per_op(row.per_op(1)),
            row.per,
        ]
        for row in rows
    ]
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(len(header))]

    def render(cells: list[str]) -> str:
        left = cells[0].ljust(widths[0]) + "  " + cells[1].ljust(widths[1])
        return left + "".join("  " + c.rjust(w) for c, w in zip(cells[2:], widths[2:], strict=True))

    rule = "-" * len(render(header))
    return "\n".join([render(header), rule, *(render(r) for r in lines)])


# the run ------------------------------------------------------------------------------


@dataclass
class Target:
    name: str
    directory: Path
    backing: Callable[[Path], Path | None]
    counts: Callable[[], dict[str, int]] | None = None  # velocityfs' (FuseMount.counts)


class Counted:
    """Takes velocityfs' counts around one measurement and adds them, per operation,
    to a row (a no-op for the other targets)."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.before = target.counts() if target.counts else None

    def done(self, row: Row, operations: int) -> None:
        if self.before is None or self.target.counts is None:
            return
        after = self.target.counts()
        requests = after["requests"] - self.before["requests"]
        transactions = after["transactions"] - self.before["transactions"]
        row.counts.append((requests / operations, transactions / operations))
        self.before = after


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Benchmark velocityfs against the bare disk and mergerfs (ratios to native).",
    )
    p.add_argument(
        "--size-mib",
        type=int,
        default=1024,
        help="sequential write/read size (default: %(default)s)",
    )
    p.add_argument(
        "--cp-mib",
        type=int,
        default=512,
        help="size of the file copied with cp (default: %(default)s)",
    )
    p.add_argument(
        "--files",
        type=int,
        default=5000,
        help="small files to create/stat/unlink (default: %(default)s)",
    )
    p.add_argument(
        "--entries",
        type=int,
        default=20000,
        help="entries in the ls -l directory (default: %(default)s)",
    )
    p.add_argument(
        "--rsync-files", type=int, default=1000, help="small files in the rsync tree (%(default)s)"
    )
    p.add_argument(
        "--rsync-big-mib", type=int, default=256, help="the rsync tree's image (%(default)s MiB)"
    )
    p.add_argument("--fio-mib", type=int, default=256, help="fio's file (%(default)s MiB)")
    p.add_argument("--fio-s", type=float, default=10.0, help="seconds per fio run (%(default)s)")
    p.add_argument(
        "--image-mib", type=int, default=2048, help="qemu-img's sparse image (%(default)s MiB)"
    )
    p.add_argument(
        "--image-data-mib", type=int, default=64, help="data in that image (%(default)s MiB)"
    )
    p.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="repetitions per measurement (median) (default: %(default)s)",
    )
    p.add_argument(
        "--workdir",
        type=Path,
        help="parent of the temporary work directory; a real disk, not tmpfs, unless "
        "--memory (default: ./var/bench in the repository, else /var/tmp)",
    )
    p.add_argument(
        "--only",
        nargs="+",
        choices=GROUPS,
        default=list(GROUPS),
        metavar="GROUP",
        help="run only these groups of rows, so that a noisy row can be repeated more "
        f"often in the same time ({', '.join(GROUPS)}; default: all)",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="put every target on a tmpfs (default /dev/shm/velocityfs-bench) instead of a "
        "disk: only software is measured, without the disk's write-back noise, so two "
        "builds compare; cold reads are then reads from memory",
    )
    p.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON")
    p.add_argument(
        "--mergerfs-cache",
        default="full",
        choices=["off", "partial", "full", "auto-full"],
        help="mergerfs cache.files (default: full, velocityfs' keep_cache without direct_io)",
    )
    p.add_argument("--keep", action="store_true", help="keep the work directory afterwards")
    args = p.parse_args(argv)
    for name in ("size_mib", "cp_mib", "files", "entries", "repeat", "rsync_files", "fio_mib"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def pick_workdir_parent(requested: Path | None, *, memory: bool = False) -> Path:
    if memory:
        candidates = [requested or Path("/dev/shm/velocityfs-bench")]
    else:
        candidates = [requested] if requested else [REPO / "var" / "bench", Path("/var/tmp")]
    for candidate in candidates:
        try:
            candidate.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            log(f"cannot use {candidate}: {exc}")
            continue
        kind = fs_type(candidate)
        if (kind in MEMORY_FILESYSTEMS) != memory:
            log(f"{candidate} is on {kind}; skipping")
            continue
        return candidate.resolve()
    if memory:
        raise SystemExit("bench: --memory needs a work directory on tmpfs (--workdir)")
    raise SystemExit("bench: no work directory on a real disk (try --workdir on one)")


def check_space(workdir: Path, args: argparse.Namespace) -> None:
    # Per repetition, the three targets hold one sequential file and one copy each at most.
    need_mib = 3 * (args.size_mib + args.cp_mib) + args.cp_mib + 1024
    st = os.statvfs(workdir)
    free_mib = st.f_bavail * st.f_frsize // MIB
    if free_mib < need_mib:
        raise SystemExit(f"bench: {workdir} has {free_mib} MiB free, the run needs ~{need_mib}")


def command_version(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def git_commit() -> str | None:
    out = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return out.stdout.strip() or None


def ordered(targets: list[Target], rep: int) -> list[Target]:
    """Rotate the order per repetition so no target always runs first (or last)."""
    shift = rep % len(targets)
    return targets[shift:] + targets[:shift]


def run_rows(
    targets: list[Target], args: argparse.Namespace, work: Path, caches: Caches
) -> list[Row]:
    rows = {
        r.key: r
        for r in [
            Row("seq_write", f"seq write {args.size_mib} MiB (1 MiB writes)", "MiB/s", True, "MiB"),
            Row("seq_read", f"seq read {args.size_mib} MiB (cold, 1 MiB)", "MiB/s", True, "MiB"),
            Row("cp", f"cp {args.cp_mib} MiB from native disk", "MiB/s", True, "MiB"),
            Row("create", f"create {args.files} x 4 KiB files", "ops/s", True, "file"),
            Row("stat", f"stat {args.files} files (attrs expired)", "ops/s", True, "file"),
            Row("unlink", f"unlink {args.files} files", "ops/s", True, "file"),
            Row("ls_cold", f"ls -l {args.entries} entries (just created)", "s", False, "entry"),
            Row("ls_warm", f"ls -l {args.entries} entries (again)", "s", False, "entry"),
            Row(
                "rsync",
                f"rsync -a {args.rsync_files} x 4 KiB in {workloads.TREE_DIRS} dirs + "
                f"{args.rsync_big_mib} MiB",
                "s",
                False,
                "file",
            ),
            Row(
                "fio_randwrite",
                f"fio 4 KiB randwrite, psync, {args.fio_mib} MiB file",
                "IOPS",
                True,
                "I/O",
            ),
            Row(
                "fio_randread",
                f"fio 4 KiB randread, psync, {args.fio_mib} MiB file",
                "IOPS",
                True,
                "I/O",
            ),
            Row(
                "qemu_in",
                f"qemu-img convert {args.image_mib} MiB raw ({args.image_data_mib} MiB data) into",
                "s",
                False,
                "image MiB",
            ),
            Row("qemu_out", "qemu-img convert of it out to native", "s", False, "image MiB"),
        ]
    }
    block = bytes(range(256)) * (MIB // 256)
    buf = bytearray(MIB)
    size = args.size_mib * MIB

    def progress(target: Target, row: Row, rep: int, value: float) -> None:
        log(f"{row.key:<9} {target.name:<10} #{rep + 1}: {fmt_value(value, row.unit)} {row.unit}")

    for rep in range(args.repeat if "sequential" in args.only else 0):
        order = ordered(targets, rep)
        for t in order:
            os.sync()
            path = t.directory / f"seq-{rep}.bin"
            counted = Counted(t)
            seconds = seq_write(path, args.size_mib, block)
            counted.done(rows["seq_write"], args.size_mib)
            rows["seq_write"].add(t.name, args.size_mib / seconds)
            progress(t, rows["seq_write"], rep, args.size_mib / seconds)
        for t in order:
            path = t.directory / f"seq-{rep}.bin"
            backing = t.backing(path)
            caches.drop(*(p for p in (path, backing) if p is not None))
            counted = Counted(t)
            seconds = seq_read(path, size, buf)
            counted.done(rows["seq_read"], args.size_mib)
            rows["seq_read"].add(t.name, args.size_mib / seconds)
            progress(t, rows["seq_read"], rep, args.size_mib / seconds)
            path.unlink()

    # The cp source lives on the native disk, outside every target.
    source = work / "cp-source.bin"
    if "cp" in args.only:
        log(f"writing the {args.cp_mib} MiB cp source")
        seq_write(source, args.cp_mib, os.urandom(MIB))
    for rep in range(args.repeat if "cp" in args.only else 0):
        for t in ordered(targets, rep):
            dest = t.directory / f"cp-{rep}.bin"
            read_through(source, buf)
            os.sync()
            counted = Counted(t)
            seconds = timed_cp(source, dest)
            counted.done(rows["cp"], args.cp_mib)
            if dest.stat().st_size != args.cp_mib * MIB:
                raise RuntimeError(f"cp produced {dest.stat().st_size} bytes in {dest}")
            rows["cp"].add(t.name, args.cp_mib / seconds)
            progress(t, rows["cp"], rep, args.cp_mib / seconds)
            dest.unlink()
    source.unlink(missing_ok=True)

    for rep in range(args.repeat if "files" in args.only else 0):
        for t in ordered(targets, rep):
            counted = Counted(t)
            created, statted, unlinked = small_files(
                t.directory / f"files-{rep}",
                args.files,
                functools.partial(phase_counted, counted, rows, args.files),
            )
            for key, seconds in (("create", created), ("stat", statted), ("unlink", unlinked)):
                rows[key].add(t.name, args.files / seconds)
                progress(t, rows[key], rep, args.files / seconds)

    # Last, because the directories stay (the work directory goes away as a whole): the
    # unlink row above already measured removing files.
    for rep in range(args.repeat if "ls" in args.only else 0):
        for t in ordered(targets, rep):
            directory = t.directory / f"ls-{rep}"
            log(f"ls        {t.name:<10} #{rep + 1}: creating {args.entries} entries")
            populate(directory, args.entries)
            counted = Counted(t)
            for key in ("ls_cold", "ls_warm"):
                seconds = timed_ls(directory)
                counted.done(rows[key], args.entries)
                rows[key].add(t.name, seconds)
                progress(t, rows[key], rep, seconds)
            listed = len(os.listdir(directory))
            if listed != args.entries:
                raise RuntimeError(f"{directory} lists {listed} entries, not {args.entries}")
    users_workloads(targets, args, work, rows, progress)
    return [row for row in rows.values() if row.samples["native"]]


def phase_counted(counted: Counted, rows: dict[str, Row], files: int, key: str) -> None:
    counted.done(rows[key], files)


def users_workloads(
    targets: list[Target],
    args: argparse.Namespace,
    work: Path,
    rows: dict[str, Row],
    progress: Callable[[Target, Row, int, float], None],
) -> None:
    """rsync of a media tree, fio on a VM disk, qemu-img convert into and out of the
    target: the sources live on the native disk, outside every target."""
    if "rsync" in args.only:
        tree = work / "rsync-source"
        log(f"making the rsync tree: {args.rsync_files} files and {args.rsync_big_mib} MiB")
        files = workloads.make_tree(tree, args.rsync_files, args.rsync_big_mib)
    for rep in range(args.repeat if "rsync" in args.only else 0):
        for t in ordered(targets, rep):
            os.sync()
            counted = Counted(t)
            seconds = workloads.timed_rsync(tree, t.directory / f"rsync-{rep}")
            counted.done(rows["rsync"], files)
            rows["rsync"].add(t.name, seconds)
            progress(t, rows["rsync"], rep, seconds)
            shutil.rmtree(t.directory / f"rsync-{rep}")
    for rep in range(args.repeat if "fio" in args.only else 0):
        for t in ordered(targets, rep):
            disk = t.directory / "fio.img"
            for key, rw in (("fio_randwrite", "randwrite"), ("fio_randread", "randread")):
                workloads.fio(disk, "randread", args.fio_mib, 0.1)  # laid out, warm
                counted = Counted(t)
                iops, ios = workloads.fio(disk, rw, args.fio_mib, args.fio_s)
                counted.done(rows[key], ios)
                rows[key].add(t.name, iops)
                progress(t, rows[key], rep, iops)
            disk.unlink()
    if "qemu" in args.only:
        image = work / "qemu-source.img"
        workloads.make_sparse_image(image, args.image_mib, args.image_data_mib)
    for rep in range(args.repeat if "qemu" in args.only else 0):
        for t in ordered(targets, rep):
            inside, back = t.directory / f"qemu-{rep}.img", work / f"qemu-back-{rep}.img"
            os.sync()
            for key, source, dest in (("qemu_in", image, inside), ("qemu_out", inside, back)):
                counted = Counted(t)
                seconds = workloads.timed_convert(source, dest)
                counted.done(rows[key], args.image_mib)
                rows[key].add(t.name, seconds)
                progress(t, rows[key], rep, seconds)
            if not workloads.same_content(image, back):
                raise RuntimeError(f"qemu-img convert through {t.name} changed the image")
            inside.unlink()
            back.unlink()


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def mergerfs_options(args: argparse.Namespace) -> str:
    return ",".join(
        [
            "fsname=bench-mergerfs",
            "category.create=ff",
            f"cache.files={args.mergerfs_cache}",
            "dropcacheonclose=false",
            f"cache.attr={ATTR_TIMEOUT}",
            f"cache.entry={ATTR_TIMEOUT}",
            "cache.negative_entry=0",
            "minfreespace=0",
        ]
    )


def environment(work: Path, args: argparse.Namespace) -> dict[str, Any]:
    dev = os.stat(work).st_dev
    return {
        "workdir": str(work),
        "filesystem": fs_type(work),
        "device": f"{os.major(dev)}:{os.minor(dev)}",
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "mergerfs": command_version(["mergerfs", "--version"]),
        "mergerfs_options": mergerfs_options(args),
        "cp": command_version(["cp", "--version"]),
        "loadavg_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def benchmark(
    work: Path, args: argparse.Namespace, env: dict[str, Any], started: list[FuseMount]
) -> list[Row]:
    """Set up the three targets in ``work``, run every row, return the rows.

    Each mount is appended to ``started`` before it is started, so the caller can
    tear down whatever came up, whatever happens here.
    """
    # The disk directory is also mergerfs' only branch; each target works in its own
    # subdirectory of it, so their files never meet.
    native_root = work / "native"
    (native_root / "native").mkdir(parents=True)
    (native_root / "mergerfs").mkdir()
    (native_root / "passthrough").mkdir()
    vfs_mnt, mfs_mnt, pt_mnt = work / "mnt", work / "mergerfs", work / "passthrough"
    vfs = [*velocityfs_command(), "--catalog", f"sqlite:///{work}/catalog.sqlite"]
    vfs += ["--store", str(work / "store")]
    quota_mib = 2 * (args.size_mib + args.cp_mib) + args.files * SMALL_FILE // MIB + 1024
    quota_mib += args.rsync_big_mib + args.rsync_files * SMALL_FILE // MIB + args.fio_mib
    quota_mib += args.image_mib
    env["velocityfs_quota_mib"] = quota_mib
    subprocess.run([*vfs, "init"], check=True, stdout=subprocess.DEVNULL)
    subprocess.run(
        [*vfs, "pool", "create", "bench", "--quota-mib", str(quota_mib)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    mount_args = ["--attr-timeout", str(ATTR_TIMEOUT), "--log-level", "WARNING"]
    velocityfs = FuseMount(
        "velocityfs",
        [*vfs, "mount", str(vfs_mnt), *mount_args],
        vfs_mnt,
        work / "velocityfs.log",
        ready_line=VELOCITYFS_READY,
    )
    started.append(velocityfs)
    velocityfs.start()
    mergerfs = FuseMount(
        "mergerfs",
        ["mergerfs", "-f", "-o", mergerfs_options(args), str(native_root), str(mfs_mnt)],
        mfs_mnt,
        work / "mergerfs.log",
    )
    started.append(mergerfs)
    mergerfs.start()
    passthrough = FuseMount(
        "passthrough",
        [sys.executable, str(passthrough_example(work)), str(native_root / "passthrough")]
        + [str(pt_mnt)],
        pt_mnt,
        work / "passthrough.log",
    )
    started.append(passthrough)
    passthrough.start()
    read_ahead = velocityfs.read_ahead_kb()
    if read_ahead is not None:
        passthrough.set_read_ahead_kb(read_ahead)
        if args.mergerfs_cache != "off":
            mergerfs.set_read_ahead_kb(read_ahead)
    peers = {"velocityfs": velocityfs, "mergerfs": mergerfs, "passthrough": passthrough}
    env["read_ahead_kb"] = {name: m.read_ahead_kb() for name, m in peers.items()}
    log(f"mounted velocityfs on {vfs_mnt}, mergerfs on {mfs_mnt}, passthrough on {pt_mnt}")

    def velocityfs_backing(path: Path) -> Path | None:
        try:
            return Path(os.fsdecode(os.getxattr(path, "user.velocity.backing_path")))
        except OSError:
            return None

    targets = [
        Target("native", native_root / "native", lambda p: None),
        Target("velocityfs", vfs_mnt / "bench", velocityfs_backing, velocityfs.counts),
        Target("mergerfs", mfs_mnt / "mergerfs", lambda p: native_root / "mergerfs" / p.name),
        Target("passthrough", pt_mnt, lambda p: native_root / "passthrough" / p.name),
    ]
    caches = Caches()
    rows = run_rows(targets, args, work, caches)
    env["cold_reads"] = caches.description
    env["peak_rss_mib"] = {name: m.peak_rss_mib() for name, m in peers.items()}
    return rows


def passthrough_example(work: Path) -> Path:
    """pyfuse3's passthroughfs.py of the installed release, from its source on PyPI."""
    version = importlib.metadata.version("pyfuse3").split("+")[0]
    sdist = work / "pyfuse3-sdist"
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--disable-pip-version-check"]
        + ["--no-deps", "--no-binary", ":all:", "-d", str(sdist), f"pyfuse3=={version}"],
        check=True,
    )
    member = f"pyfuse3-{version}/examples/passthroughfs.py"
    with tarfile.open(sdist / f"pyfuse3-{version}.tar.gz") as tar:
        source = tar.extractfile(member)
        assert source is not None, member
        script = work / "passthroughfs.py"
        script.write_bytes(source.read())
    return script


def teardown(work: Path, started: list[FuseMount], *, keep: bool, failed: bool) -> None:
    """Unmount everything (mergerfs first), then remove the work directory."""
    for mount in reversed(started):
        if failed:
            log(f"{mount.name} log ({mount.log_path}):\n{mount.log_tail()}")
        try:
            mount.stop()
        except Exception as exc:  # keep going: the other mount must go too
            log(f"{mount.name}: teardown failed: {exc}")
    still = [m for m in mounts() if m == str(work) or m.startswith(f"{work}/")]
    if still:
        log(f"WARNING: still mounted, keeping {work}: {', '.join(still)}")
    elif keep:
        log(f"kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)


def report(rows: list[Row], env: dict[str, Any], args: argparse.Namespace) -> None:
    load = f"{' '.join(env['loadavg_start'])} -> {' '.join(env['loadavg_end'])}"
    print(
        f"velocityfs benchmark: {env['workdir']} on {env['filesystem']} ({env['device']}), "
        f"kernel {env['kernel']}, {env['cpus']} CPUs, git {env['git_commit']}"
    )
    print(
        f"repeat {args.repeat} (medians); cold reads via {env['cold_reads']}; "
        f"read_ahead_kb {env['read_ahead_kb']}; load {load}"
    )
    print(f"{env['mergerfs']}: -o {env['mergerfs_options']}")
    print(f"peak RSS MiB: {env['peak_rss_mib']}")
    print(
        "ratio = target vs native, vfs/mfs = velocityfs vs mergerfs, vfs/pt = velocityfs vs "
        "pyfuse3's passthrough example; > 1 means faster\n"
    )
    print(table(rows))
    if args.json:
        config = {
            k: getattr(args, k)
            for k in ("size_mib", "cp_mib", "files", "entries", "repeat", "mergerfs_cache")
        }
        document = {"config": config, "environment": env, "rows": [r.as_dict() for r in rows]}
        args.json.write_text(json.dumps(document, indent=2) + "\n")
        log(f"wrote {args.json}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        log("not root: mounting may work, drop_caches will not (reads fall back to fadvise)")
    for tool in ("mergerfs", "fusermount3", "cp", "ls", "stat", "rsync", "fio", "qemu-img"):
        if shutil.which(tool) is None:
            raise SystemExit(f"bench: {tool} is not installed")
    parent = pick_workdir_parent(args.workdir, memory=args.memory)
    check_space(parent, args)
    # Ctrl-C, kill and a closed terminal all unwind through the teardown below (SIGINT
    # too when started in the background, where the shell would have it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)

    work = Path(tempfile.mkdtemp(prefix="fs-", dir=parent))
    started: list[FuseMount] = []
    failed = True
    try:
        env = environment(work, args)
        log(f"work directory {work} ({env['filesystem']})")
        rows = benchmark(work, args, env, started)
        failed = False
    except KeyboardInterrupt:
        failed = False  # stopped, not broken: no daemon logs to show
        log("interrupted; unmounting")
        return 130
    finally:
        # A second signal must not cut the teardown short and leave a mount behind.
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_IGN)
        teardown(work, started, keep=args.keep, failed=failed)
    env["loadavg_end"] = Path("/proc/loadavg").read_text().split()[:3]
    report(rows, env, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
