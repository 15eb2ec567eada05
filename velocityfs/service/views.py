"""Plain snapshots of catalog rows that leave the service layer, and the one rule
for changing the metadata they show.

Adapters receive these instead of ORM objects, so no adapter can lazily
reach back into SQL.
"""

import time
from dataclasses import dataclass, field


@dataclass
class PoolView:
    """A pool as adapters see it."""

    id: str
    parent_id: str | None
    name: str
    quota_bytes: int | None
    used_bytes: int
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int


@dataclass
class MediaView:
    """A media as adapters see it, with the path of its backing file.

    ``open_path`` is its DEFAULT path, which reaches the bytes on any volume
    (a compatibility symlink off DEFAULT), even after a move by another process.
    """

    id: str
    pool_id: str
    name: str
    size: int
    volume: str
    mode: int
    uid: int
    gid: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    backing_path: str = ""
    open_path: str = ""
    xattrs: dict[str, bytes] = field(default_factory=dict)


@dataclass(frozen=True)
class Creator:
    """Who creates media, for the volume policy: a user name and group names."""

    user: str | None = None
    groups: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ListedPool:
    """A pool as ``GET /p`` lists it for a group: where it sits, its quota (its own or
    the nearest ancestor's), the room really left (the least any pool on its chain
    has), and the group's permissions on it (its shares on the pool or an ancestor)."""

    pool: PoolView
    path: str
    quota_bytes: int
    avail_bytes: int
    permissions: list[str]


# Media never carry the setuid and setgid bits, only permission and sticky bits: they
# are disk images, not programs, and without those bits (and with no
# security.capability, which no one may set) a write, truncate or chown by another
# user has nothing to clear. The mount can so take privilege clearing over from the
# kernel (FUSE_HANDLE_KILLPRIV_V2, fs.operations), which then stops asking for
# security.capability before every write. Pools keep theirs.
MEDIA_MODE_BITS = 0o1777


def media_mode(mode: int) -> int:
    """The mode a media is given for ``mode``: without setuid and setgid."""
    return mode & MEDIA_MODE_BITS


def attr_changes(**changes: int | None) -> dict[str, int]:
    """The columns that setting metadata (mode, uid, gid, atime_ns, mtime_ns) changes.

    Only permission bits are kept of a mode; ``None`` leaves a field alone;
    the ctime moves, as it does for any change of a file's metadata.
    """
    columns = {
        key: value & 0o7777 if key == "mode" else value
        for key, value in changes.items()
        if value is not None
    }
    columns["ctime_ns"] = time.time_ns()
    return columns
