"""Compare the catalog with the backing files, report each problem, repair on request.

Checks: stale grants of dead processes; media unlinked while open by processes
that are gone (``MediaService.unlink_open``); media whose bytes are missing; sizes
that disagree with the disk (of media no process holds a grant on); pools whose
media hold more bytes on disk than their quota, whatever holds grants; backing
files other users may open (not 0600, as ``set-volume`` of earlier versions left
them); orphan files (no catalog row), including the leftovers of interrupted
uploads and moves and the spare files and unreplayed create journals of
processes that are gone; DEFAULT paths that do not lead to the media's volume
(dangling or wrong compatibility symlinks, and moves interrupted between copy
and commit); usage totals per pool.

Catalog rows win, except where only the disk still has the bytes: an
interrupted move whose copy is the one authoritative file is finished, not
rolled back. A volume whose disk is not there (no marker of its own, see
``service.presence``, or no ``media/`` directory) is offline: it and each of
its media are reported, never "repaired" away, and its directory is not
searched for orphans.
"""

from __future__ import annotations

import functools
import os
import re
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import delete, func, select, update

from velocityfs.catalog.models import DEFAULT_VOLUME, Grant, Holder, Media, Pool, XAttr
from velocityfs.service.chains import adjust
from velocityfs.service.pools import subtree_ids
from velocityfs.service.removals import record_removals
from velocityfs.service.velocity import Velocity
from velocityfs.store.backing import FILE_MODE
from velocityfs.store.journal import journals, read_journal
from velocityfs.store.spares import spare_dirs

MEDIA_NAME = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


@dataclass
class Problem:
    """One thing wrong, in one line, and how to repair it (None: needs a human)."""

    kind: str
    message: str
    repair: Callable[[], object] | None

    def __str__(self) -> str:
        return f"{self.kind}: {self.message}"


class Fsck:
    """One pass over a store; ``run`` yields problems as it finds them."""

    def __init__(self, velocity: Velocity) -> None:
        self.v = velocity
        self.backing = velocity.backing

    def media_count(self) -> int:
        with self.v.db.transaction() as s:
            return s.execute(select(func.count()).select_from(Media)).scalar_one()

    def run(self, progress: Callable[[int], None] | None = None) -> Iterator[Problem]:
        yield from self._stale_grants()
        yield from self._left_unlinked()
        live = self._media_with_grants()
        offline = self._offline_volumes()
        for name, reason in sorted(offline.items()):
            yield Problem("volume-offline", f"volume '{name}' is offline: {reason}", None)
        known: set[str] = set()
        on_disk: dict[str, int] = {}  # per pool: the bytes of its own media, as they lie
        for media in self._all_media():
            known.add(media.id)
            if media.volume in offline:
                yield Problem(
                    "offline-media",
                    f"media {media.id} ({self.v.pools.path(media.pool_id)}/{media.name}) is on "
                    f"volume '{media.volume}', which is offline: kept as it is",
                    None,
                )
            elif media.id not in live:
                yield from self._check_media(media)
            size = None if media.volume in offline else self.backing.size(media.volume, media.id)
            on_disk[media.pool_id] = on_disk.get(media.pool_id, 0) + (
                media.size if size is None else size
            )
            if progress is not None:
                progress(1)
        yield from self._orphans(known, set(offline))
        yield from self._usage()
        yield from self._over_quota(on_disk)

    # grants ----------------------------------------------------------------
    def _stale_grants(self) -> Iterator[Problem]:
        for holder in self.v.ledger.dead_holders():
            grants = self.v.ledger.stale_grants([holder])
            yield Problem(
                "stale-grant",
                f"{len(grants)} grant(s) of dead process {holder}",
                lambda: self.v.reclaim_dead_holders(),
            )

    def _left_unlinked(self) -> Iterator[Problem]:
        """Media unlinked while open by a process that left the catalog without
        closing them (the dead ones' are the stale grants' repair)."""
        left = self.v.media.left_unlinked([])
        if left:
            yield Problem(
                "unlinked-media",
                f"{len(left)} media unlinked while open by processes that are gone",
                lambda: self.v.media.remove_unlinked([]),
            )

    def _media_with_grants(self) -> set[str]:
        with self.v.db.transaction() as s:
            rows = s.execute(select(Grant.media_id).where(Grant.media_id.is_not(None)))
            return {m for m in rows.scalars() if m}

    # per media -------------------------------------------------------------
    def _all_media(self) -> list[Media]:
        with self.v.db.transaction() as s:
            return list(s.execute(select(Media)).scalars())

    def _offline_volumes(self) -> dict[str, str]:
        """Volumes whose disk is not there, with the reason: no marker of their own, or
        a marker but no ``media/`` (a disk emptied or half restored)."""
        offline = self.v.volumes.offline()
        for name in self.v.volumes.names():
            media_dir = self.backing.volume_dir(name) / "media"
            if name not in offline and not media_dir.is_dir():
                offline[name] = f"no media/ directory at {media_dir}: is its disk mounted?"
        return offline

    def _check_media(self, media: Media) -> Iterator[Problem]:
        label = f"media {media.id} ({self.v.pools.path(media.pool_id)}/{media.name})"
        home = self.backing.path(media.volume, media.id)
        default = self.backing.default_path(media.id)
        if not home.is_file() or home.is_symlink():
            other = self._real_copy_elsewhere(media)
            if other is not None:
                yield Problem(
                    "interrupted-move",
                    f"{label}: catalog says volume {media.volume}, the bytes are on {other}",
                    lambda: self._adopt_volume(media.id, other),
                )
                return
            yield Problem(
                "missing-file",
                f"{label}: backing file {home} is missing",
                lambda: self._drop_media(media.id),
            )
            return
        if media.volume != DEFAULT_VOLUME:
            expected = os.path.relpath(home, default.parent)
            current = os.readlink(default) if default.is_symlink() else None
            if current != expected:
                state = "missing" if not os.path.lexists(default) else f"-> {current}"
                yield Problem(
                    "volume-symlink",
                    f"{label}: DEFAULT path {default} should link to {expected} ({state})",
                    lambda: self._repoint(media.volume, media.id),
                )
        st = home.stat()
        mode = stat.S_IMODE(st.st_mode)
        if mode & 0o077:
            yield Problem(
                "backing-mode",
                f"{label}: backing file {home} has mode {mode:04o}: other users may open it "
                f"(backing files are {FILE_MODE:04o})",
                functools.partial(os.chmod, home, FILE_MODE),
            )
        size = st.st_size
        if size != media.size:
            yield Problem(
                "size",
                f"{label}: catalog says {media.size} bytes, the file has {size}",
                lambda: self._resize(media.id, size),
            )

    def _real_copy_elsewhere(self, media: Media) -> str | None:
        """The volume that really has a media's bytes when its catalog volume does not."""
        default = self.backing.default_path(media.id)
        if default.is_file() and not default.is_symlink():
            return DEFAULT_VOLUME
        if default.is_symlink() and default.exists():
            volume, _path = self.backing.locate(media.id)
            return volume if volume != media.volume else None
        return None

    def _adopt_volume(self, media_id: str, volume: str) -> None:
        os.chmod(self.backing.path(volume, media_id), FILE_MODE)  # the copy becomes the file
        with self.v.db.transaction() as s:
            s.execute(update(Media).where(Media.id == media_id).values(volume=volume))
        self.backing.point_default(volume, media_id)

    def _repoint(self, volume: str, media_id: str) -> None:
        self.backing.point_default(volume, media_id)

    def _drop_media(self, media_id: str) -> None:
        with self.v.db.transaction() as s:
            media = s.get(Media, media_id)
            if media is None:
                return
            conn = s.connection()
            (chain,) = self.v.chains.lock(conn, media.pool_id)
            adjust(conn, chain, -media.size)
            s.execute(delete(XAttr).where(XAttr.owner_id == media_id))
            record_removals(conn, "media", [media_id])
            s.delete(media)
        self.backing.default_path(media_id).unlink(missing_ok=True)

    def _resize(self, media_id: str, size: int) -> None:
        """The disk's bytes are real: record them even if that passes a quota
        (writes then get ENOSPC until room is freed)."""
        with self.v.db.transaction() as s:
            media = s.get(Media, media_id)
            if media is None:
                return
            conn = s.connection()
            (chain,) = self.v.chains.lock(conn, media.pool_id)
            adjust(conn, chain, size - media.size)
            media.size = size

    # files without rows ------------------------------------------------------
    def _volume_files(self, offline: set[str]) -> Iterator[tuple[str, Path]]:
        for volume in self.v.volumes.names():
            if volume in offline:
                continue
            media_dir = self.backing.volume_dir(volume) / "media"
            for bucket in sorted(media_dir.glob("[0-9a-f][0-9a-f]")):
                for path in sorted(bucket.iterdir()):
                    yield volume, path

    def _orphans(self, known: set[str], offline: set[str]) -> Iterator[Problem]:
        catalog_volume = self._catalog_volumes()
        journaled = self._journaled()
        for volume, path in self._volume_files(offline):
            name = path.name
            if name in journaled:
                continue
            if not MEDIA_NAME.match(name):
                yield Problem(
                    "orphan-file",
                    f"{path}: leftover of an interrupted move or link",
                    functools.partial(path.unlink, missing_ok=True),
                )
            elif name not in known:
                yield Problem(
                    "orphan-file",
                    f"{path}: no media {name} in the catalog",
                    functools.partial(path.unlink, missing_ok=True),
                )
            elif (
                volume != catalog_volume.get(name)
                and path.is_file()
                and not path.is_symlink()
                and self._other_copy(self.backing.path(catalog_volume[name], name), path)
            ):
                yield Problem(
                    "stray-copy",
                    f"{path}: a second copy of media {name}, which lives on "
                    f"{catalog_volume[name]} (a move was interrupted)",
                    functools.partial(self._drop_stray, path, catalog_volume[name], name),
                )
        dead = set(self.v.ledger.dead_holders())
        leftovers = [
            (d, "orphan-upload", "unfinished uploads", self.backing.discard_uploads)
            for d in self.backing.top.glob("**/media/.uploads/*")
        ]
        leftovers += [
            (d, "orphan-spares", "spare files", self.backing.discard_spares)
            for d in spare_dirs(self.backing.top)
        ]
        for directory, kind, what, discard in leftovers:
            if directory.name in dead or not self._holder_exists(directory.name):
                yield Problem(
                    kind,
                    f"{directory}: {what} of a process that is gone",
                    functools.partial(discard, directory.name),
                )
        for holder_id in journals(self.backing.top):
            if holder_id in dead or not self._holder_exists(holder_id):
                records = read_journal(self.backing.top, holder_id)
                volumes = {r["volume"] for r in records if "op" not in r}
                waiting = sorted(volumes.intersection(offline))
                if waiting:
                    yield Problem(
                        "unreplayed-journal",
                        f"creates journaled by process {holder_id}, which is gone, wait for "
                        f"offline volume(s) {', '.join(waiting)}",
                        None,
                    )
                    continue
                yield Problem(
                    "unreplayed-journal",
                    f"creates journaled by process {holder_id}, which is gone, not replayed",
                    lambda: self.v.reclaim_dead_holders(),
                )

    def _journaled(self) -> set[str]:
        """Media a live mount created but has not committed yet: files, not orphans."""
        return {
            record["id"]
            for holder_id in journals(self.backing.top)
            for record in read_journal(self.backing.top, holder_id)
            if "op" not in record
        }

    @staticmethod
    def _other_copy(home: Path, path: Path) -> bool:
        """Whether ``home`` holds bytes of its own, not just a link to ``path``.

        After a move interrupted between its symlink and its commit, the catalog's
        DEFAULT path leads to the target's file: that file is the only copy.
        """
        try:
            return home.is_file() and not os.path.samefile(home, path)
        except OSError:
            return False

    def _drop_stray(self, path: Path, volume: str, media_id: str) -> None:
        path.unlink(missing_ok=True)
        self.backing.point_default(volume, media_id)

    def _catalog_volumes(self) -> dict[str, str]:
        with self.v.db.transaction() as s:
            return dict(s.execute(select(Media.id, Media.volume)).all())

    def _holder_exists(self, holder_id: str) -> bool:
        with self.v.db.transaction() as s:
            return s.get(Holder, holder_id) is not None

    # usage -----------------------------------------------------------------
    def _usage(self) -> Iterator[Problem]:
        with self.v.db.transaction() as s:
            pools = list(s.execute(select(Pool)).scalars())
            sizes = dict(
                s.execute(select(Media.pool_id, func.sum(Media.size)).group_by(Media.pool_id)).all()
            )
            grants = dict(
                s.execute(
                    select(Grant.pool_id, func.sum(Grant.bytes)).group_by(Grant.pool_id)
                ).all()
            )
            expected = {}
            for pool in pools:
                ids = subtree_ids(s, pool.id)
                expected[pool.id] = sum(
                    int(sizes.get(i) or 0) + int(grants.get(i) or 0) for i in ids
                )
        for pool in pools:
            if pool.used_bytes != expected[pool.id]:
                yield Problem(
                    "usage",
                    f"pool {self.v.pools.path(pool.id)}: used {pool.used_bytes} bytes recorded, "
                    f"{expected[pool.id]} counted",
                    functools.partial(self._set_usage, pool.id, expected[pool.id]),
                )

    def _over_quota(self, on_disk: dict[str, int]) -> Iterator[Problem]:
        """Pools whose media hold more bytes on disk than their quota allows, whoever
        holds grants on them (a writer stays within its grant, so even a live one's
        file never passes a quota). No repair: bytes that are there were written,
        and only a human may delete them. Media of an unmounted volume count at
        the size the catalog records."""
        with self.v.db.transaction() as s:
            pools = list(s.execute(select(Pool)).scalars())
        children: dict[str | None, list[Pool]] = {}
        for pool in pools:
            children.setdefault(pool.parent_id, []).append(pool)

        def subtree(pool: Pool) -> int:
            return on_disk.get(pool.id, 0) + sum(subtree(c) for c in children.get(pool.id, []))

        for pool in pools:
            if pool.quota_bytes is None:
                continue  # inherits: the ancestor with the quota is checked
            real = subtree(pool)
            if real > pool.quota_bytes:
                yield Problem(
                    "over-quota",
                    f"pool {self.v.pools.path(pool.id)}: {real} bytes on disk, "
                    f"{real - pool.quota_bytes} over its quota of {pool.quota_bytes}",
                    None,
                )

    def _set_usage(self, pool_id: str, used: int) -> None:
        with self.v.db.transaction() as s:
            s.execute(update(Pool).where(Pool.id == pool_id).values(used_bytes=used))
