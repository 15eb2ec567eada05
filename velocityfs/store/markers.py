"""Volume markers: a file at the top of each volume's disk saying which volume of which
store that disk is.

A volume's directory ``TOP/vol/NAME`` is a mount point. While its disk is not
mounted it is an empty directory on the store's own disk, and whatever is
written there is hidden (and lost, for the catalog) when the disk comes back.
So ``volume add`` writes a marker on the disk, and a volume is used only while
its marker is there and names it. The store's own marker, at its top (the
DEFAULT volume), holds the store's id, which every volume marker repeats: a
disk of another store, or of another volume, does not pass for this one.

Markers are JSON, ``FILE_MODE`` like every file of the store, and replaced by
rename, so a reader sees the old one or the new one.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from velocityfs.store.backing import FILE_MODE

MARKER_NAME = ".velocityfs-volume"


@dataclass(frozen=True)
class Marker:
    """What a marker says: the store's id and the volume's name."""

    store: str
    volume: str


def marker_path(directory: Path) -> Path:
    return directory / MARKER_NAME


def marker_stamp(directory: Path) -> tuple[int, int, int] | None:
    """The marker file's device, inode and mtime (one stat), or None when there is none:
    a changed stamp is a marker to read again."""
    try:
        st = os.stat(marker_path(directory))
    except (FileNotFoundError, NotADirectoryError):
        return None
    return st.st_dev, st.st_ino, st.st_mtime_ns


def read_marker(directory: Path) -> Marker | None:
    """The marker in ``directory``; None when there is none. One that cannot be parsed
    reads as a marker of no store and no volume, which matches nothing."""
    try:
        text = marker_path(directory).read_text(encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        fields = json.loads(text)
        return Marker(str(fields["store"]), str(fields["volume"]))
    except (ValueError, KeyError, TypeError):
        return Marker("", "")


def write_marker(directory: Path, marker: Marker, *, replace: bool = True) -> bool:
    """Write ``marker`` in ``directory``, synced to its disk. With ``replace`` false an
    existing marker is kept (two processes making the store's first one agree on one);
    returns whether this one was written."""
    final = marker_path(directory)
    staging = final.with_name(f"{MARKER_NAME}.{os.getpid()}")
    fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, json.dumps({"store": marker.store, "volume": marker.volume}).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        if replace:
            os.rename(staging, final)
        else:
            try:
                os.link(staging, final)
            except FileExistsError:
                return False
    finally:
        staging.unlink(missing_ok=True)
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return True
