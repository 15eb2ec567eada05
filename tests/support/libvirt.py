"""A libvirt daemon of the test's own, and virsh on it.

libvirtd as root is the system instance: its state lives in /run/libvirt,
/etc/libvirt, /var/lib/libvirt and /var/cache/libvirt, and a second one on
the host cannot take its drivers' locks. So the test's daemon runs in a mount
namespace of its own with a tmpfs over each of those: it meets no libvirtd
that runs on the host, and leaves nothing behind. It listens on a socket in
the test's directory.

A mount made on the host after the daemon started is not seen by it (/ is not
a shared mount everywhere), and a mount it has seen stays alive in its
namespace: start it after mounting, stop it before unmounting.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

STATE_DIRS = ("/run/libvirt", "/etc/libvirt", "/var/lib/libvirt", "/var/cache/libvirt")

# Runs inside the new mount namespace: its tmpfs mounts end with it.
_START = """set -e
for d in {dirs}; do
    mkdir -p "$d"
    mount -t tmpfs -o mode=0755 velocityfs-test "$d"
done
exec libvirtd --config "$1/libvirtd.conf" --pid-file "$1/libvirtd.pid"
"""


class Virsh:
    """virsh on the test's daemon."""

    def __init__(self, socket: Path) -> None:
        self.uri = f"qemu:///system?socket={socket}"

    def __call__(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run(
            ["virsh", "-c", self.uri, *args],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        if check:
            assert res.returncode == 0, f"virsh {' '.join(args)}: {res.stdout}{res.stderr}"
        return res

    def pool_info(self, pool: str) -> dict[str, str]:
        """``pool-info --bytes``: Capacity, Allocation, Available in bytes, State, ..."""
        out = self("pool-info", pool, "--bytes").stdout
        return {
            key.strip(): value.strip()
            for key, _, value in (line.partition(":") for line in out.splitlines())
            if value
        }


@contextlib.contextmanager
def private_libvirtd(directory: Path) -> Iterator[Virsh]:
    """Start libvirtd in its own mount namespace; yield virsh on it; stop it."""
    directory.mkdir(parents=True, exist_ok=True)
    socket = directory / "libvirt-sock"
    (directory / "libvirtd.conf").write_text(f'unix_sock_dir = "{directory}"\n')
    script = directory / "start.sh"
    script.write_text(_START.format(dirs=" ".join(STATE_DIRS)))
    log = directory / "libvirtd.log"
    with open(log, "ab") as sink:
        daemon = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "slave", "sh", str(script), str(directory)],
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        virsh = Virsh(socket)
        deadline = time.monotonic() + 30
        while virsh("uri", check=False).returncode != 0:
            assert daemon.poll() is None, f"libvirtd exited:\n{log.read_text()}"
            assert time.monotonic() < deadline, f"libvirtd did not answer:\n{log.read_text()}"
            time.sleep(0.1)
        yield virsh
    finally:
        daemon.terminate()  # unshare and sh exec'd: this is libvirtd itself
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(timeout=30)
