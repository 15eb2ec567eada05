"""Media rules: creation with placement on a volume, removal, renames and moves."""

import os
import time
from collections.abc import Callable

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from velocityfs.catalog.database import Database
from velocityfs.catalog.models import DEFAULT_VOLUME, Grant, Media, Pool, XAttr
from velocityfs.errors import Conflict, InvalidValue, NotFound
from velocityfs.service.ledger import (
    charge,
    grant_size,
    lock_chains,
    lock_media,
    new_grant,
    room,
)
from velocityfs.service.names import check_name
from velocityfs.service.pools import name_taken
from velocityfs.service.removals import record_removals
from velocityfs.service.views import Creator, MediaView, apply_attrs
from velocityfs.store.backing import BackingStore


def _granted(session: Session, media_id: str) -> int:
    return sum(session.execute(select(Grant.bytes).where(Grant.media_id == media_id)).scalars())


class MediaService:
    """Media operations; each public method is one transaction.

    Backing files are created before the catalog row commits (and removed
    again if it does not), and deleted only after the removal commits, so a
    crash leaves at worst an orphan file, never a row without bytes.
    """

    def __init__(
        self,
        database: Database,
        backing: BackingStore,
        placement: Callable[[str, str, Creator | None], str] | None = None,
    ) -> None:
        self.db = database
        self.backing = backing
        self._placement = placement or (lambda _pool_id, _name, _creator: DEFAULT_VOLUME)

    def view(self, media: Media, xattrs: dict[str, bytes] | None = None) -> MediaView:
        return MediaView(
            id=media.id,
            pool_id=media.pool_id,
            name=media.name,
            size=media.size,
            volume=media.volume,
            mode=media.mode,
            uid=media.uid,
            gid=media.gid,
            atime_ns=media.atime_ns,
            mtime_ns=media.mtime_ns,
            ctime_ns=media.ctime_ns,
            backing_path=str(self.backing.path(media.volume, media.id)),
            open_path=str(self.backing.default_path(media.id)),
            xattrs=xattrs or {},
        )

    def create(
        self,
        pool_id: str,
        name: str,
        *,
        size: int = 0,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        creator: Creator | None = None,
    ) -> MediaView:
        """Create media (sparse, ``size`` bytes charged to the pool chain).

        The volume policy places it, looking at the pool, the name and the creator.
        """
        view, _granted = self.create_open(
            pool_id, name, size=size, mode=mode, uid=uid, gid=gid, creator=creator
        )
        return view

    def create_open(
        self,
        pool_id: str,
        name: str,
        *,
        size: int = 0,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        creator: Creator | None = None,
        holder_id: str | None = None,
        grant_chunk: int = 0,
    ) -> tuple[MediaView, int]:
        """Create media and, for ``holder_id``, open it for writing in the same transaction.

        The holder gets its lease (a grant row) and a first grant of up to
        ``grant_chunk`` bytes, so a small file is written without another
        transaction. Returns the media and the bytes granted.
        """
        check_name(name, "file name")
        if size < 0:
            raise InvalidValue("size must not be negative")
        volume = self._placement(pool_id, name, creator)
        now = time.time_ns()
        media = Media(
            pool_id=pool_id,
            name=name,
            size=size,
            volume=volume,
            mode=mode & 0o7777,
            uid=uid,
            gid=gid,
            atime_ns=now,
            mtime_ns=now,
            ctime_ns=now,
        )
        created = False
        try:
            with self.db.transaction() as s:
                (chain,) = lock_chains(s, pool_id)
                if name_taken(s, pool_id, name):
                    raise Conflict(f"'{name}' already exists in pool '{chain[-1].name}'")
                charge(chain, size)
                granted = grant_size(0, room(chain), grant_chunk) if holder_id else 0
                charge(chain, granted)
                chain[-1].mtime_ns = now
                s.add(media)
                s.flush()
                if holder_id is not None:
                    s.add(new_grant(pool_id, media.id, holder_id, granted))
                self.backing.create(volume, media.id, size)
                created = True
                return self.view(media), granted
        except BaseException:
            if created:
                self.backing.remove(volume, media.id)
            raise

    def adopt_upload(
        self,
        grant_id: str,
        pool_id: str,
        media_id: str,
        volume: str,
        name: str,
        size: int,
        upload_path: str,
    ) -> MediaView:
        """Turn a finished upload into media in one transaction.

        The upload's grant already charged the room; the unused part goes back.
        The file is renamed into place before the commit, so the media appears
        with all its bytes or not at all.
        """
        check_name(name, "file name")
        now = time.time_ns()
        with self.db.transaction() as s:
            (chain,) = lock_chains(s, pool_id)
            if name_taken(s, pool_id, name):
                raise Conflict(f"'{name}' already exists in pool '{chain[-1].name}'")
            grant = s.get(Grant, grant_id)
            held = grant.bytes if grant is not None else 0
            charge(chain, size - held)
            if grant is not None:
                s.delete(grant)
            chain[-1].mtime_ns = now
            media = Media(
                id=media_id,
                pool_id=pool_id,
                name=name,
                size=size,
                volume=volume,
                mode=0o644,
                uid=0,
                gid=0,
                atime_ns=now,
                mtime_ns=now,
                ctime_ns=now,
            )
            s.add(media)
            s.flush()
            final = self.backing.path(volume, media_id)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.rename(upload_path, final)
            self.backing.point_default(volume, media_id)
            return self.view(media)

    def choose_volume(self, pool_id: str, name: str, creator: Creator | None) -> str:
        """The volume that new media of this pool, name and creator goes to."""
        return self._placement(pool_id, name, creator)

    def get(self, media_id: str) -> MediaView:
        with self.db.transaction() as s:
            media = s.get(Media, media_id)
            if media is None:
                raise NotFound(f"no media {media_id}")
            return self.view(media)

    def in_pool(self, pool_id: str) -> list[MediaView]:
        with self.db.transaction() as s:
            if s.get(Pool, pool_id) is None:
                raise NotFound(f"no pool {pool_id}")
            rows = s.execute(select(Media).where(Media.pool_id == pool_id).order_by(Media.name))
            return [self.view(m) for m in rows.scalars()]

    def all(self) -> list[MediaView]:
        """Every media with its xattrs: what a mount loads at start."""
        with self.db.transaction() as s:
            xattrs: dict[str, dict[str, bytes]] = {}
            for owner, name, value in s.execute(select(XAttr.owner_id, XAttr.name, XAttr.value)):
                xattrs.setdefault(owner, {})[name] = value
            return [self.view(m, xattrs.get(m.id)) for m in s.execute(select(Media)).scalars()]

    def remove(self, media_id: str) -> None:
        """Delete media: its size and any grants on it go back to the pool chain."""
        with self.db.transaction() as s:
            media, chain = lock_media(s, media_id)  # its size as of the lock, not before
            volume = media.volume
            self._drop(s, media, chain)
        self.backing.remove(volume, media_id)

    def _drop(self, s: Session, media: Media, chain: list[Pool]) -> None:
        """Delete a media row; ``chain`` is its pool chain, already locked."""
        charge(chain, -(media.size + _granted(s, media.id)))
        chain[-1].mtime_ns = time.time_ns()
        s.execute(delete(Grant).where(Grant.media_id == media.id))
        s.execute(delete(XAttr).where(XAttr.owner_id == media.id))
        record_removals(s, "media", [media.id])
        s.delete(media)
        # Now, not at commit: the unit of work would run a rename's UPDATE first, and
        # the renamed row would collide with this one's (pool, name) unique key.
        s.flush()

    def rename(self, media_id: str, pool_id: str, name: str) -> str | None:
        """Rename or move media, replacing a media of the target name.

        Catalog-only: the backing file is named by id. Across pools the size
        (and any outstanding grant) moves to the target chain and must fit; a
        refusal changes nothing. Returns the id of the replaced media, if any.
        """
        check_name(name, "file name")
        replaced: tuple[str, str] | None = None
        with self.db.transaction() as s:
            media = s.get(Media, media_id)
            while True:
                if media is None:
                    raise NotFound(f"no media {media_id}")
                old_chain, new_chain = lock_chains(s, media.pool_id, pool_id)
                # Re-read under the locks, as lock_media does: the size that moves to
                # the new chain must be the current one, not the one read before.
                media = s.execute(
                    select(Media)
                    .where(Media.id == media_id)
                    .execution_options(populate_existing=True)
                ).scalar_one_or_none()
                if media is not None and media.pool_id == old_chain[-1].id:
                    break
            target = s.execute(
                select(Media).where(Media.pool_id == pool_id, Media.name == name)
            ).scalar_one_or_none()
            if target is not None and target.id == media.id:
                return None
            if target is None and name_taken(s, pool_id, name):
                raise Conflict(f"'{name}' is a pool in '{new_chain[-1].name}'")
            if target is not None:
                replaced = (target.id, target.volume)
                self._drop(s, target, new_chain)
            if media.pool_id != pool_id:
                total = media.size + _granted(s, media.id)
                charge(old_chain, -total)
                charge(new_chain, total)
                s.execute(
                    Grant.__table__.update()
                    .where(Grant.media_id == media.id)
                    .values(pool_id=pool_id)
                )
            now = time.time_ns()
            old_chain[-1].mtime_ns = new_chain[-1].mtime_ns = now
            media.pool_id = pool_id
            media.name = name
            media.ctime_ns = now
        if replaced is not None:
            self.backing.remove(replaced[1], replaced[0])
            return replaced[0]
        return None

    def set_attrs(
        self,
        media_id: str,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> None:
        """Metadata that ``cp -a`` and ``rsync -a`` restore."""
        with self.db.transaction() as s:
            media = s.get(Media, media_id)
            if media is None:
                raise NotFound(f"no media {media_id}")
            apply_attrs(media, mode=mode, uid=uid, gid=gid, atime_ns=atime_ns, mtime_ns=mtime_ns)

    def delete_orphan_files(self, removed: list[tuple[str, str]]) -> None:
        """Delete the backing files of media whose rows are already gone."""
        for media_id, volume in removed:
            self.backing.remove(volume, media_id)


class XAttrs:
    """User extended attributes of pools and media, kept in the catalog."""

    def __init__(self, database: Database) -> None:
        self.db = database

    def set(self, owner_id: str, name: str, value: bytes) -> None:
        with self.db.transaction() as s:
            row = s.get(XAttr, (owner_id, name))
            if row is None:
                s.add(XAttr(owner_id=owner_id, name=name, value=value))
            else:
                row.value = value

    def remove(self, owner_id: str, name: str) -> bool:
        with self.db.transaction() as s:
            row = s.get(XAttr, (owner_id, name))
            if row is None:
                return False
            s.delete(row)
            return True

    def of_many(self, owner_ids: list[str]) -> dict[str, dict[str, bytes]]:
        """Attributes of many owners at once (a mount loads every pool's at start)."""
        found: dict[str, dict[str, bytes]] = {}
        with self.db.transaction() as s:
            rows = s.execute(select(XAttr.owner_id, XAttr.name, XAttr.value))
            wanted = set(owner_ids)
            for owner, name, value in rows:
                if owner in wanted:
                    found.setdefault(owner, {})[name] = value
        return found

    def of(self, owner_id: str) -> dict[str, bytes]:
        with self.db.transaction() as s:
            rows = s.execute(select(XAttr.name, XAttr.value).where(XAttr.owner_id == owner_id))
            return {name: value for name, value in rows}
