"""``mount.fuse.velocityfs``: what ``mount -t fuse.velocityfs CONFIG MNT`` and fstab run.

mount(8) calls ``/sbin/mount.fuse.velocityfs CONFIG MNT -o OPTIONS`` and waits
for it to return, so the helper starts the daemon detached, waits until the
mount answers (or the daemon dies), and returns. ``umount MNT`` ends the
daemon cleanly: the kernel closes its session. A daemon that refuses (a
mountpoint that already holds a velocityfs mount, a catalog not initialised)
exits at once, and its error line is passed on with a non-zero status.

Of the options only ``allow_other`` reaches the daemon. ``default_permissions``
is always on (the kernel checks modes and owners on every mount), so an fstab
line that still lists it mounts as before; other options (``_netdev``,
``noauto``, ...) are mount(8)'s.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

READY = "velocityfs: mounted"
PASSED_OPTIONS = {"allow_other"}
LOG_DIR = Path("/var/log/velocityfs")


def parse_args(argv: list[str]) -> tuple[str, str, list[str]]:
    """CONFIG MNT [-o opt,opt...] in any order, as mount(8) passes them."""
    positional, options = [], []
    args = iter(argv)
    for arg in args:
        if arg == "-o":
            options += next(args, "").split(",")
        elif arg.startswith("-o"):
            options += arg[2:].split(",")
        elif arg.startswith("-"):
            continue
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise SystemExit("usage: mount.fuse.velocityfs CONFIG MOUNTPOINT [-o OPTIONS]")
    return positional[0], positional[1], [o for o in options if o]


def daemon_command(config: str, mountpoint: str, options: list[str]) -> list[str]:
    """The foreground daemon invocation; mount options it knows become flags."""
    command = [sys.executable, "-m", "velocityfs", "--config", config, "mount", mountpoint]
    for option in options:
        if option in PASSED_OPTIONS:
            command.append("--" + option.replace("_", "-"))
    return command


def log_path(mountpoint: str) -> Path:
    name = mountpoint.strip("/").replace("/", "-") or "root"
    try:
        LOG_DIR.mkdir(parents=True, exist_ok=True)
        return LOG_DIR / f"{name}.log"
    except OSError:
        return Path("/tmp") / f"velocityfs-{name}.log"


def main(argv: list[str] | None = None) -> None:
    config, mountpoint, options = parse_args(sys.argv[1:] if argv is None else argv)
    mountpoint = os.path.abspath(mountpoint)
    log = log_path(mountpoint)
    with open(log, "a") as sink:
        offset = sink.tell()
        daemon = subprocess.Popen(
            daemon_command(os.path.abspath(config), mountpoint, options),
            stdin=subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
            start_new_session=True,
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace")[offset:]
        if READY in text:
            return
        if daemon.poll() is not None:
            sys.stderr.write(text)
            raise SystemExit(f"mount.fuse.velocityfs: the daemon exited ({daemon.returncode})")
        time.sleep(0.05)
    daemon.terminate()
    raise SystemExit(f"mount.fuse.velocityfs: {mountpoint} did not come up in 60 s (see {log})")


if __name__ == "__main__":
    main()
