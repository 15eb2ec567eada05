"""The velocityfs mounts of this mount namespace, read from /proc/self/mountinfo.

A mount's source (its ``fsname``) names the daemon process that serves it,
``velocityfs:PID``. The catalog records each of its processes with host and
pid (the holders), so the mounts of one catalog are those whose daemon is
one of its holders on this host: however its URL is spelt, and without
asking the mounts themselves (a stalled one would hang the asker).

Listing them reads the table, never a mount: a stat() of a stalled mount hangs.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

FSTYPE = "fuse.velocityfs"
MOUNTINFO = Path("/proc/self/mountinfo")
_SOURCE = re.compile(r"velocityfs:(\d+)")


@dataclass(frozen=True)
class MountEntry:
    """One velocityfs mount: where, and the pid of its daemon (None: a mount made by a
    velocityfs from before the pid was in its source)."""

    mountpoint: str
    pid: int | None


def fsname(pid: int) -> str:
    """The source a daemon with this pid gives its mount."""
    return f"velocityfs:{pid}"


def _unescape(field: str) -> str:
    """mountinfo writes space, tab, newline and backslash in paths as octal (``\\040``)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def velocityfs_mounts() -> list[MountEntry]:
    """Every velocityfs mount in this mount namespace, in mount order."""
    found = []
    for line in MOUNTINFO.read_text(encoding="utf-8").splitlines():
        left, _, right = line.partition(" - ")
        fstype, source = (right.split(" ") + ["", ""])[:2]
        if fstype != FSTYPE:
            continue
        match = _SOURCE.fullmatch(source)
        found.append(
            MountEntry(_unescape(left.split(" ")[4]), int(match[1]) if match else None)
        )
    return found


def mount_at(path: str) -> MountEntry | None:
    """The velocityfs mount on ``path``, if there is one. Resolving ``path`` stats it
    (``velocityfs mount`` has checked that it exists already)."""
    target = os.path.realpath(path)
    return next((m for m in velocityfs_mounts() if m.mountpoint == target), None)
