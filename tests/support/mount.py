"""Run velocityfs mount daemons as subprocesses for tests.

pyfuse3 keeps process-global state, so every mount gets its own process. All the
code here is written so that a broken daemon becomes a failed test with its log
attached, never a hung test run or a stale mount left behind for the next test.
Nothing here stat()s a mountpoint once it is mounted: a stat on a hung FUSE mount
would hang the caller too, so the mount table is read from /proc/self/mountinfo.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

READY_LINE = "velocityfs: mounted"
FUSECTL = Path("/sys/fs/fuse/connections")
FUSERMOUNT = "fusermount3"

# Every Mount that may still own a process or a mount, for the atexit safety net.
_LIVE: set[Mount] = set()
_LIVE_LOCK = threading.Lock()


def _unescape(field: str) -> str:
    """Decode the octal escapes (\\040 for a space, ...) that mountinfo uses in paths."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def mountinfo_entry(path: str) -> tuple[int, str] | None:
    """Return (kernel device number, fstype) of the topmost mount on path, or None.

    path must already be resolved (os.path.realpath): resolving it here could hang.
    The device number is what names the FUSE connection in /sys/fs/fuse/connections
    (the same value as os.stat(path).st_dev, obtained without touching the mount).
    """
    found = None
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) < 5 or _unescape(fields[4]) != path:
                continue
            major, minor = (int(x) for x in fields[2].split(":"))
            found = ((major << 20) | minor, right.split()[0])  # later lines are on top
    return found


def is_mounted(path: str) -> bool:
    """True if anything is mounted on the (resolved) path."""
    return mountinfo_entry(path) is not None


def _run_quiet(cmd: list[str], timeout: float = 10.0) -> subprocess.CompletedProcess[str] | None:
    """Run a cleanup command; a timeout or missing binary must not break a teardown."""
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        print(f"tests: {' '.join(cmd)}: {exc}", file=sys.stderr)
        return None


class Mount:
    """One velocityfs daemon mounted on one directory, with its log.

    Built by the ``mount`` fixture; use ``path`` (or ``mount / "pool"``) for file
    operations, ``stop()`` for a clean unmount, ``kill9()`` to simulate a crash.
    """

    def __init__(
        self,
        cmd: list[str],
        mountpoint: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
        ready_line: str = READY_LINE,
    ) -> None:
        self.cmd = list(cmd)
        # What the daemon prints once mounted (another FUSE daemon, e.g. faultfs, has its own).
        self.ready_line = ready_line
        self.path = Path(mountpoint)
        self.path.mkdir(parents=True, exist_ok=True)
        # Resolved once, now, while the directory is still a plain directory.
        self.realpath = os.path.realpath(self.path)
        self.log_path = Path(log_path)
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.conn_id: int | None = None
        self.returncode: int | None = None

    # -- conveniences ---------------------------------------------------------------

    def __truediv__(self, other: str | os.PathLike[str]) -> Path:
        return self.path / other

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        pid = self.proc.pid if self.proc else None
        return f"<Mount {self.path} pid={pid} conn={self.conn_id}>"

    @property
    def log(self) -> str:
        """Everything the daemon wrote to stdout and stderr so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def is_mounted(self) -> bool:
        return is_mounted(self.realpath)

    def _fail(self, msg: str) -> None:
        pytest.fail(f"{msg}\ncommand: {' '.join(self.cmd)}\n--- {self.log_path} ---\n{self.log}")

    # -- lifecycle --------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Mount:
        """Start the daemon and return once it said it is mounted and the kernel agrees."""
        if self.is_mounted():
            pytest.fail(f"{self.path} is already a mountpoint; refusing to stack a mount on it")
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")  # the ready line must not sit in a buffer
        env.setdefault("PYTHONFAULTHANDLER", "1")  # crashes leave a traceback in the log
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                # Own session: a Ctrl-C to pytest must not kill the daemon behind the
                # teardown's back and leave a dead mount.
                start_new_session=True,
            )
        with _LIVE_LOCK:
            _LIVE.add(self)

        deadline = time.monotonic() + timeout
        while self.ready_line not in self.log:
            if self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                self.teardown()
                self._fail(f"velocityfs exited with {self.returncode} before mounting")
            if time.monotonic() > deadline:
                self.teardown()
                self._fail(f"no {self.ready_line!r} line within {timeout:.0f} s")
            time.sleep(0.05)

        # The ready line should follow the mount; allow a moment in case it races ahead.
        while (entry := mountinfo_entry(self.realpath)) is None:
            if self.proc.poll() is not None:
                self.returncode = self.proc.returncode
                self.teardown()
                self._fail(f"velocityfs exited with {self.returncode} right after mounting")
            if time.monotonic() > deadline:
                self.teardown()
                self._fail(
                    f"{self.ready_line!r} printed but {self.path} not in /proc/self/mountinfo"
                )
            time.sleep(0.05)
        dev, fstype = entry
        if not fstype.startswith("fuse"):
            self.teardown()
            self._fail(f"{self.path} is mounted as {fstype!r}, not as a FUSE filesystem")
        self.conn_id = dev
        return self

    def _wait(self, timeout: float) -> bool:
        """Wait for the daemon to exit; True if it did."""
        if self.proc is None:
            return True
        try:
            self.returncode = self.proc.wait(timeout=timeout)
            return True
        except subprocess.TimeoutExpired:
            return False

    def _wait_unmounted(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self.is_mounted():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def _signal(self, sig: int) -> None:
        if self.alive:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)  # its own session: pgid == pid

    def stop(self, timeout: float = 30.0) -> None:
        """Unmount cleanly and require the daemon to exit with status 0.

        This is the path an operator takes (fusermount3 -u), so a daemon that does not
        shut down cleanly from it is a bug the test should see.
        """
        res = _run_quiet([FUSERMOUNT, "-u", str(self.path)], timeout=timeout)
        if res is None or res.returncode != 0:
            out = "" if res is None else (res.stdout + res.stderr).strip()
            self._fail(f"fusermount3 -u {self.path} failed: {out}")
        if not self._wait(timeout):
            self.teardown()
            self._fail(f"velocityfs still running {timeout:.0f} s after unmount")
        if self.is_mounted():
            self._fail(f"{self.path} still mounted after the daemon exited")
        with _LIVE_LOCK:
            _LIVE.discard(self)
        if self.returncode != 0:
            self._fail(f"velocityfs exited with {self.returncode} after a clean unmount")

    def kill9(self) -> None:
        """Simulate a crash: SIGKILL the daemon, then lazily unmount the dead mount."""
        self._signal(signal.SIGKILL)
        if not self._wait(10.0):
            # Stuck in the kernel (D state); aborting the connection is the only way out.
            self.abort()
            if not self._wait(10.0):
                self._fail("velocityfs did not die from SIGKILL")
        _run_quiet([FUSERMOUNT, "-u", "-z", str(self.path)])
        if not self._wait_unmounted(5.0):
            self._fail(f"{self.path} still mounted after kill -9 and fusermount3 -u -z")
        with _LIVE_LOCK:
            _LIVE.discard(self)

    def abort(self) -> bool:
        """Abort the FUSE connection: every pending and future request fails ENOTCONN.

        Returns False when that is impossible (fusectl not mounted, not root).
        """
        if self.conn_id is None:
            return False
        try:
            (FUSECTL / str(self.conn_id) / "abort").write_text("1")
        except OSError as exc:
            print(f"tests: cannot abort FUSE connection {self.conn_id}: {exc}", file=sys.stderr)
            return False
        return True

    def teardown(self) -> None:
        """Leave no mount and no process behind, whatever state the daemon is in.

        Idempotent and never raises: it runs after failed tests, with the daemon
        possibly hung, dead, or already stopped.
        """
        try:
            if self.is_mounted():
                res = _run_quiet([FUSERMOUNT, "-u", str(self.path)])
                # A refused unmount (EBUSY: a request is stuck) will not succeed by waiting.
                refused = res is None or res.returncode != 0
                if refused or not self._wait_unmounted(5.0):
                    _run_quiet([FUSERMOUNT, "-u", "-z", str(self.path)])
            # A short grace: after an unmount a healthy daemon exits on its own.
            if self.alive and not self._wait(2.0):
                self._signal(signal.SIGTERM)
                if not self._wait(10.0):
                    self._signal(signal.SIGKILL)
                    if not self._wait(5.0) and self.abort():
                        self._wait(5.0)
            if self.alive:
                print(f"tests: could not end {self!r}", file=sys.stderr)
            if self.is_mounted():
                _run_quiet([FUSERMOUNT, "-u", "-z", str(self.path)])
        except Exception as exc:  # a teardown must not mask the test result
            print(f"tests: teardown of {self!r} failed: {exc!r}", file=sys.stderr)
        finally:
            with _LIVE_LOCK:
                _LIVE.discard(self)


class Watchdog:
    """Turn a hung mount into a failed test instead of a hung test run.

    A thread sleeps until the deadline; if the test is still running then, it aborts
    the FUSE connection of every registered mount (blocked syscalls in the test then
    fail with ENOTCONN), or kills the daemon when fusectl is unavailable.
    """

    def __init__(self, deadline: float, name: str) -> None:
        self.deadline = deadline
        self.name = name
        self.mounts: list[Mount] = []
        self.fired = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watchdog {name}", daemon=True)

    def register(self, mount: Mount) -> None:
        self.mounts.append(mount)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)

    def _run(self) -> None:
        if self._stop.wait(self.deadline):
            return
        self.fired = True
        print(
            f"\ntests: WATCHDOG: {self.name} still running after {self.deadline:.0f} s; "
            "aborting its FUSE connections",
            file=sys.stderr,
        )
        for m in list(self.mounts):
            if m.alive and not m.abort():
                m._signal(signal.SIGKILL)


@atexit.register
def _reap_leftovers() -> None:
    """Last resort (e.g. pytest killed mid-teardown): no daemon or mount outlives us."""
    with _LIVE_LOCK:
        leftovers = list(_LIVE)
    for m in leftovers:
        m._signal(signal.SIGKILL)
        _run_quiet([FUSERMOUNT, "-u", "-z", str(m.path)])
