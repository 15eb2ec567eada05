"""Whether a volume's disk is there: its marker (``store.markers``) names it, of this store.

A volume is online while its marker is there; otherwise it is offline and
nothing goes onto it or off it. Creates are hot (about 300 us each), so the
answer is kept ``CHECK_S``: a create costs a stat of the marker at most that
often per volume, and its content is read again only when the stamp (device,
inode, mtime) changes. Moves, fsck, ``volume list`` and ``init`` ask ``fresh``.
A disk that goes away within ``CHECK_S`` of a check still takes no files: the
volume's ``media/`` directory is on its disk, and nothing makes it again
(``BackingStore.make_media_dirs``).

DEFAULT, the store's top, is always online: without it there is no store.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from velocityfs.catalog.models import DEFAULT_VOLUME, new_id
from velocityfs.errors import VolumeOffline
from velocityfs.store.backing import BackingStore
from velocityfs.store.markers import Marker, marker_path, marker_stamp, read_marker, write_marker

log = logging.getLogger(__name__)

CHECK_S = 0.5


@dataclass(frozen=True)
class _Seen:
    stamp: tuple[int, int, int] | None
    reason: str | None  # None: online
    until: float


class VolumePresence:
    """One process's view of which volumes' disks are there."""

    def __init__(self, backing: BackingStore) -> None:
        self.backing = backing
        self._store_id: str | None = None
        self._seen: dict[str, _Seen] = {}

    def store_id(self) -> str | None:
        """The store's id, from the marker at its top (None while it has none)."""
        if self._store_id is None:
            marker = read_marker(self.backing.top)
            if marker is not None and marker.volume == DEFAULT_VOLUME:
                self._store_id = marker.store
        return self._store_id

    def ensure_store_marker(self) -> str:
        """The store's id, making the store's marker first if it has none."""
        write_marker(self.backing.top, Marker(new_id(), DEFAULT_VOLUME), replace=False)
        store = self.store_id()
        if store is None:
            raise VolumeOffline(
                f"{marker_path(self.backing.top)} is not a marker of this store's top"
            )
        return store

    def mark(self, volume: str) -> None:
        """Write ``volume``'s marker on the disk now mounted at its directory."""
        store = self.ensure_store_marker()
        write_marker(self.backing.volume_dir(volume), Marker(store, volume))
        self._seen.pop(volume, None)

    def offline_reason(self, volume: str, *, fresh: bool = False) -> str | None:
        """None while ``volume``'s disk is there; otherwise why it is not."""
        if volume == DEFAULT_VOLUME:
            return None
        now = time.monotonic()
        seen = self._seen.get(volume)
        if seen is not None and not fresh and now < seen.until:
            return seen.reason
        directory = self.backing.volume_dir(volume)
        stamp = marker_stamp(directory)
        if seen is not None and stamp is not None and stamp == seen.stamp:
            reason = seen.reason
        else:
            reason = self._check(volume, stamp)
        if seen is not None and reason != seen.reason:
            if reason is None:
                log.warning("volume %s is back online", volume)
            else:
                log.warning("volume %s is offline: %s", volume, reason)
        self._seen[volume] = _Seen(stamp, reason, now + CHECK_S)
        return reason

    def require_online(self, volume: str, *, fresh: bool = False) -> None:
        """Raise VolumeOffline, saying why, unless ``volume``'s disk is there."""
        reason = self.offline_reason(volume, fresh=fresh)
        if reason is not None:
            raise VolumeOffline(f"volume '{volume}' is offline: {reason}")

    def _check(self, volume: str, stamp: tuple[int, int, int] | None) -> str | None:
        directory = self.backing.volume_dir(volume)
        path = marker_path(directory)
        marker = read_marker(directory) if stamp is not None else None
        if marker is None:
            return f"no volume marker at {path}: is its disk mounted at {directory}?"
        store = self.store_id()
        if store is None:
            return (
                f"the store {self.backing.top} has no marker of its own: "
                "run 'velocityfs init' on this host"
            )
        if marker != Marker(store, volume):
            return (
                f"{path} marks volume '{marker.volume}' of store {marker.store or '?'}, "
                f"not volume '{volume}' of this store ({store}): is the right disk mounted?"
            )
        return None
