"""Backing volumes, the Koji way: a registry, and moves of media between volumes.

DEFAULT is the store's top; volume NAME lives at ``TOP/vol/NAME`` (an operator
mounts a disk there first). Media on another volume keeps a relative symlink
at its DEFAULT path, so anything that opens the DEFAULT path (the mount does)
reaches the bytes wherever they live.

A volume is used only while its disk is there (``service.presence``): ``add``
writes its marker on the disk, and moves onto or off a volume without one are
refused, so no bytes land on the disk under an empty mount point.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, func, select
from sqlalchemy.orm import Session

from velocityfs.catalog.database import Database
from velocityfs.catalog.models import DEFAULT_VOLUME, Grant, Media, Volume
from velocityfs.catalog.prepared import Prepared
from velocityfs.errors import Busy, Conflict, InvalidValue, NotFound, VolumeOffline
from velocityfs.service.names import check_name
from velocityfs.service.presence import VolumePresence
from velocityfs.store.backing import FILE_MODE, BackingStore, make_dirs
from velocityfs.store.markers import read_marker

COPY_CHUNK = 8 << 20

_NAMES = Prepared(select(Volume.__table__.c.name).order_by(Volume.__table__.c.name))


def volume_names(conn: Connection) -> list[str]:
    """The registered volumes, read on a unit of work's own connection: a create
    that asks the policy stays one unit (in a batch, too)."""
    return [row[0] for row in _NAMES.execute(conn, {})]


@dataclass(frozen=True)
class VolumeInfo:
    """A volume as ``volume list`` shows it; an offline one has no free space to show
    (its directory is on another filesystem) but the reason it is offline."""

    name: str
    path: str
    online: bool
    offline_reason: str | None
    media: int
    used_bytes: int
    free_bytes: int | None


@dataclass(frozen=True)
class Marking:
    """What ``init`` did about a volume that had no marker: marked, or why not."""

    volume: str
    media: int
    refused: str | None


class VolumeService:
    """Volume registry and media moves; catalog switches are single transactions."""

    def __init__(self, database: Database, backing: BackingStore) -> None:
        self.db = database
        self.backing = backing
        self.presence = VolumePresence(backing)

    def names(self) -> list[str]:
        with self.db.reading() as s:
            return volume_names(s.connection())

    def add(self, name: str) -> VolumeInfo:
        """Register TOP/vol/NAME; it must exist (the disk is mounted there first), and
        gets the volume's marker."""
        check_name(name, "volume name")
        if name == DEFAULT_VOLUME:
            raise Conflict("DEFAULT always exists")
        directory = self.backing.volume_dir(name)
        if not directory.is_dir():
            raise NotFound(f"{directory} does not exist: mount the volume's disk there first")
        with self.db.transaction() as s:
            if s.get(Volume, name) is not None:
                raise Conflict(f"volume '{name}' exists")
            make_dirs(directory / "media")
            self.presence.mark(name)
            s.add(Volume(name=name, created_ns=time.time_ns()))
        return self.info(name)

    def mark(self, name: str) -> int:
        """Write the marker of a registered volume whose disk is mounted but has none
        (made before markers, or restored from a backup); returns its media count.

        Refused unless every media the catalog has on the volume is on this disk:
        marking an empty directory would let new media land under a mount point.
        """
        if name == DEFAULT_VOLUME:
            raise InvalidValue("DEFAULT is the store's top: 'velocityfs init' marks it")
        with self.db.reading() as s:
            if s.get(Volume, name) is None:
                raise NotFound(f"no volume '{name}'")
            media_ids = list(s.execute(select(Media.id).where(Media.volume == name)).scalars())
        directory = self.backing.volume_dir(name)
        if not (directory / "media").is_dir():
            raise VolumeOffline(
                f"{directory} has no media/ directory: mount volume '{name}''s disk there first"
            )
        missing = sum(not self.backing.path(name, mid).is_file() for mid in media_ids)
        if missing:
            raise VolumeOffline(
                f"{missing} of the {len(media_ids)} media of volume '{name}' are not in "
                f"{directory}: is the right disk mounted there? Nothing was marked"
            )
        self.presence.mark(name)
        return len(media_ids)

    def mark_store(self) -> None:
        """Give the store's top its marker, if it has none: a new store, or one made
        before markers. Refused when the catalog has media on DEFAULT and none of them
        is there: that is a store top whose disk is not mounted, and marking it would
        let the mounts take it for the store."""
        if self.presence.store_id() is not None:
            return
        with self.db.reading() as s:
            media_ids = list(
                s.execute(select(Media.id).where(Media.volume == DEFAULT_VOLUME)).scalars()
            )
        if media_ids and not any(self.backing.path(DEFAULT_VOLUME, m).exists() for m in media_ids):
            raise VolumeOffline(
                f"the store {self.backing.top} has no marker and none of the "
                f"{len(media_ids)} media the catalog has on DEFAULT: is the store's disk "
                "mounted there?"
            )
        self.presence.ensure_store_marker()

    def mark_unmarked(self) -> list[Marking]:
        """Mark the store and each volume that has no marker yet, where ``mark`` allows
        (``init`` does this, so a store made before markers keeps its volumes online)."""
        self.mark_store()
        done = []
        for name in self.names():
            if name == DEFAULT_VOLUME or read_marker(self.backing.volume_dir(name)) is not None:
                continue
            try:
                done.append(Marking(name, self.mark(name), None))
            except VolumeOffline as exc:
                done.append(Marking(name, 0, str(exc)))
        return done

    def offline(self) -> dict[str, str]:
        """The volumes whose disk is not there, with the reason, checked now."""
        found = {}
        for name in self.names():
            reason = self.presence.offline_reason(name, fresh=True)
            if reason is not None:
                found[name] = reason
        return found

    def free_bytes(self) -> int:
        """Free space on the disks of the online volumes, each disk counted once: the
        room that new media may take (an offline volume's directory is on another disk)."""
        seen: set[int] = set()
        free = 0
        for name in self.names():
            if self.presence.offline_reason(name) is not None:
                continue
            directory = self.backing.volume_dir(name)
            try:
                device = os.stat(directory).st_dev
                disk = os.statvfs(directory)
            except OSError:
                continue
            if device not in seen:
                seen.add(device)
                free += disk.f_bavail * disk.f_frsize
        return free

    def remove(self, name: str) -> None:
        """Forget a volume; refused while any media lives on it."""
        if name == DEFAULT_VOLUME:
            raise InvalidValue("DEFAULT cannot be removed")
        with self.db.transaction() as s:
            volume = s.get(Volume, name)
            if volume is None:
                raise NotFound(f"no volume '{name}'")
            count = s.execute(
                select(func.count()).select_from(Media).where(Media.volume == name)
            ).scalar_one()
            if count:
                raise Busy(f"volume '{name}' still holds {count} media: move them first")
            s.delete(volume)

    def info(self, name: str) -> VolumeInfo:
        with self.db.transaction() as s:
            if s.get(Volume, name) is None:
                raise NotFound(f"no volume '{name}'")
            count, used = s.execute(
                select(func.count(), func.coalesce(func.sum(Media.size), 0)).where(
                    Media.volume == name
                )
            ).one()
        directory = self.backing.volume_dir(name)
        reason = self.presence.offline_reason(name, fresh=True)
        free: int | None = None
        if reason is None:
            try:
                disk = os.statvfs(directory)
                free = disk.f_bavail * disk.f_frsize
            except OSError:
                free = 0
        return VolumeInfo(name, str(directory), reason is None, reason, int(count), int(used), free)

    def all(self) -> list[VolumeInfo]:
        return [self.info(name) for name in self.names()]

    # moves -------------------------------------------------------------------
    def move(
        self,
        media_id: str,
        target: str,
        progress: Callable[[int], None] | None = None,
        wait_s: float = 5.0,
    ) -> str:
        """Move a media's bytes to ``target``; returns the volume it came from.

        Copy and fsync first, outside any transaction; then, in one
        transaction that re-checks nothing changed, put the copy in place,
        point the DEFAULT path at it and switch the catalog. Both volumes must be
        online (their markers are checked before the copy and again at the
        switch), so no copy lands under an empty mount point. A media open for
        writing anywhere (it has a grant, even of 0 bytes) is refused, and a
        writer cannot open it while the switch runs: opening for write takes
        the same row lock. A writer that just closed may hold its lease a
        moment longer (the kernel reports closes asynchronously, and mounts
        release leases in batches), so the move waits up to ``wait_s`` first.
        """
        deadline = time.monotonic() + wait_s
        while True:
            try:
                with self.db.transaction() as s:
                    media = s.get(Media, media_id)
                    if media is None:
                        raise NotFound(f"no media {media_id}")
                    if s.get(Volume, target) is None:
                        raise NotFound(f"no volume '{target}'")
                    source = media.volume
                    self._refuse_if_open(s, media_id)
                break
            except Busy:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        if source == target:
            return source
        self._require_online(source, target)
        src = self.backing.path(source, media_id)
        before = os.stat(src)
        room = shutil.disk_usage(self.backing.volume_dir(target)).free
        if before.st_blocks * 512 > room:
            raise Busy(f"volume '{target}' has {room} bytes free, {before.st_blocks * 512} needed")
        staging = self.backing.moving_path(target, media_id)
        self.backing.make_media_dirs(target, staging.parent)
        try:
            _copy_sparse(src, staging, progress)
            with self.db.transaction() as s:
                media = s.execute(
                    select(Media).where(Media.id == media_id).with_for_update()
                ).scalar_one_or_none()
                if media is None:
                    raise NotFound(f"media {media_id} was removed during the move")
                self._refuse_if_open(s, media_id)
                self._require_online(source, target)
                after = os.stat(src)
                if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
                    raise Busy("the media changed during the copy: try again")
                os.rename(staging, self.backing.path(target, media_id))
                self.backing.point_default(target, media_id)
                media.volume = target
                media.ctime_ns = time.time_ns()
        except BaseException:
            staging.unlink(missing_ok=True)
            raise
        if source != DEFAULT_VOLUME:
            self.backing.path(source, media_id).unlink(missing_ok=True)
        return source

    def _require_online(self, source: str, target: str) -> None:
        for volume in (source, target):
            reason = self.presence.offline_reason(volume, fresh=True)
            if reason is not None:
                raise VolumeOffline(f"volume '{volume}' is offline, nothing was moved: {reason}")

    @staticmethod
    def _refuse_if_open(s: Session, media_id: str) -> None:
        writers = s.execute(select(Grant.holder_id).where(Grant.media_id == media_id)).first()
        if writers is not None:
            raise Busy("the media is open for writing: close it and try again")


def _backing_opener(path: str, flags: int) -> int:
    """Open a move's copy as a backing file: ``FILE_MODE`` whatever the umask, and whatever
    mode a staging file that a killed move left there had (O_TRUNC keeps a file's mode)."""
    fd = os.open(path, flags, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _copy_sparse(src: Path, dst: Path, progress: Callable[[int], None] | None) -> None:
    """Copy keeping holes (a 100 GiB sparse VM disk stays sparse), then fsync."""
    with open(src, "rb") as fin, open(dst, "wb", opener=_backing_opener) as fout:
        size = os.fstat(fin.fileno()).st_size
        offset = 0
        while offset < size:
            try:
                data_start = os.lseek(fin.fileno(), offset, os.SEEK_DATA)
            except OSError:
                break
            hole = os.lseek(fin.fileno(), data_start, os.SEEK_HOLE)
            if progress is not None and data_start > offset:
                progress(data_start - offset)
            position = data_start
            while position < hole:
                chunk = os.pread(fin.fileno(), min(COPY_CHUNK, hole - position), position)
                if not chunk:
                    break
                os.pwrite(fout.fileno(), chunk, position)
                position += len(chunk)
                if progress is not None:
                    progress(len(chunk))
            offset = hole
        if progress is not None and size > offset:
            progress(size - offset)
        os.ftruncate(fout.fileno(), size)
        fout.flush()
        os.fsync(fout.fileno())
