"""Media rules: creation with placement on a volume, removal, renames and moves."""

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import SimpleNamespace
from typing import Any

from sqlalchemy import BindParameter, Connection, bindparam, delete, func, insert, select, update

from velocityfs.catalog.database import Database
from velocityfs.catalog.models import DEFAULT_VOLUME, Media, Pool, XAttr, new_id
from velocityfs.catalog.prepared import Prepared
from velocityfs.errors import Conflict, InvalidValue, NotFound, QuotaExceeded
from velocityfs.service.batch import WriteBatch
from velocityfs.service.chains import (
    Chains,
    Link,
    chain_path,
    charge,
    room,
    serialised,
    touch,
)
from velocityfs.service.ledger import (
    GRANTS,
    HOLDERS,
    MEDIA,
    add_grant,
    grant_size,
    granted,
    lock_media_rows,
    media_row,
    require_live_holder,
)
from velocityfs.service.names import check_name
from velocityfs.service.pools import POOLS, name_taken, recover_pool
from velocityfs.service.removals import record_removals
from velocityfs.service.views import Creator, MediaView, attr_changes, media_mode
from velocityfs.store.backing import FILE_MODE, BackingStore
from velocityfs.store.journal import discard_journal, keep_journal, read_journal
from velocityfs.store.spares import SpareFiles

log = logging.getLogger(__name__)

XATTRS = XAttr.__table__
_INSERT_MEDIA = Prepared(insert(MEDIA))
_EXISTS = select(MEDIA.c.id).where(MEDIA.c.id == bindparam("mid"))
_VOLUMES = select(MEDIA.c.id, MEDIA.c.volume).where(
    MEDIA.c.id.in_(bindparam("ids", expanding=True))
)
# Media ids one statement binds at most (psycopg allows 65,535 parameters).
VOLUMES_BATCH = 2000
# Where new media goes: the volume policy, asked with the create's connection (so it
# reads the catalog inside the create's unit of work), the pool's path, the name and
# the creator.
Placement = Callable[[Connection, str, str, Creator | None], str]

# A journaled create's columns (``changed_ns`` is set anew when it is recovered).
_ROW_KEYS = ("id", "pool_id", "volume", "mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns")
# The columns a journaled attribute change may set again.
_ATTR_KEYS = frozenset({"mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns"})
_MEDIA_BY_ID = select(MEDIA.c.id, MEDIA.c.pool_id, MEDIA.c.name, MEDIA.c.size).where(
    MEDIA.c.id == bindparam("mid")
)
_BY_NAME = select(MEDIA.c.id, MEDIA.c.pool_id, MEDIA.c.size, MEDIA.c.volume).where(
    MEDIA.c.pool_id == bindparam("pid"), MEDIA.c.name == bindparam("name")
)
_MOVE = (
    update(MEDIA)
    .where(MEDIA.c.id == bindparam("mid"))
    .values(pool_id=bindparam("new_pool"), name=bindparam("new_name"), ctime_ns=bindparam("now"))
)
_MOVE_GRANTS = (
    update(GRANTS)
    .where(GRANTS.c.media_id == bindparam("mid"))
    .values(pool_id=bindparam("new_pool"))
)
# A batch of removals costs these five statements, not five per media.
_IDS: BindParameter[str] = bindparam("ids", expanding=True)
_GRANTED = (
    select(GRANTS.c.media_id, func.sum(GRANTS.c.bytes))
    .where(GRANTS.c.media_id.in_(_IDS))
    .group_by(GRANTS.c.media_id)
)
_DROP_GRANTS = delete(GRANTS).where(GRANTS.c.media_id.in_(_IDS))
_DROP_XATTRS = delete(XATTRS).where(XATTRS.c.owner_id.in_(_IDS))
_DROP_MEDIA = delete(MEDIA).where(MEDIA.c.id.in_(_IDS))
_UNLINK_OPEN = (
    update(MEDIA)
    .where(MEDIA.c.id == bindparam("mid"))
    .values(name=bindparam("hidden"), unlinked_by=bindparam("holder"), ctime_ns=bindparam("now"))
)


def _new_row(
    media_id: str,
    pool_id: str,
    name: str,
    size: int,
    volume: str,
    *,
    mode: int = 0o644,
    uid: int = 0,
    gid: int = 0,
) -> dict[str, Any]:
    """The columns of a new media row, all its times now."""
    now = time.time_ns()
    return {
        "id": media_id,
        "pool_id": pool_id,
        "name": name,
        "size": size,
        "volume": volume,
        "mode": media_mode(mode),
        "uid": uid,
        "gid": gid,
        "atime_ns": now,
        "mtime_ns": now,
        "ctime_ns": now,
        "changed_ns": now,
        "unlinked_by": None,
    }


class MediaService:
    """Media operations; each public method is one transaction (a create of a
    process that batches them, ``start_creates``, is one unit of its batch).

    Backing files are created before the catalog row commits (and removed
    again if it does not), and deleted only after the removal commits, so a
    crash leaves at worst an orphan file, never a row without bytes.
    """

    def __init__(
        self,
        database: Database,
        backing: BackingStore,
        chains: Chains,
        placement: Placement | None = None,
        volume_offline: Callable[[str], str | None] = lambda _volume: None,
    ) -> None:
        self.db = database
        self.chains = chains
        self.backing = backing
        self._placement = placement or (lambda _conn, _path, _name, _creator: DEFAULT_VOLUME)
        self._volume_offline = volume_offline
        self.batch = WriteBatch(database, backing)
        self._spares: SpareFiles | None = None

    # a writer process's creates ------------------------------------------------
    def start_creates(self, holder_id: str) -> None:
        """Make this process's creates cheap: spare files and (on SQLite) batches.

        A create takes an empty file made ahead of time (``store.spares``)
        instead of making one. On SQLite it also answers once its statements
        have run in the batch transaction (``Database.batched``: SQLite's write
        lock held, so the name check and the charge are exact) and its line is
        in the journal (``store.journal``); the batch commits with
        ``commit_batch`` or before any other unit of work, and the journal of a
        process that dies first is replayed (``recover_journal``). Measured on
        a mount: a BEGIN and a COMMIT less per file, and the pages many creates
        share written to the log once. PostgreSQL catalogs keep a transaction
        per create, since an open batch would hold row locks against other hosts.
        Called again with a new holder id (the process re-registered), the old
        holder's batch commits and its journal and spares go first.
        """
        self.end_creates()
        self._spares = SpareFiles(self.backing, holder_id)
        self.batch.start(holder_id)

    def commit_batch(self) -> None:
        """Commit the creates waiting in the batch (a no-op when none are)."""
        self.db.commit_batch()

    @property
    def batch_pending(self) -> bool:
        return self.db.batch_open

    def open_batch(self) -> bool:
        """Have a batch open for the next create, without waiting for SQLite's lock;
        False when it is another process's now, or this process does not batch."""
        return self.batch.open()

    def end_creates(self) -> None:
        """Commit the last batch, delete the journal (unless a batch was lost: the next
        start replays it) and the spare files (a clean stop)."""
        if self._spares is not None:
            self._spares.close()
            self._spares = None
        self.batch.end()

    def view(self, media: Any, xattrs: dict[str, bytes] | None = None) -> MediaView:
        """A snapshot of a media row (an ORM object or a Core row with the same columns)."""
        backing_path, open_path = self.backing.paths_text(media.volume, media.id)
        return MediaView(
            id=media.id,
            pool_id=media.pool_id,
            name=media.name,
            size=media.size,
            volume=media.volume,
            mode=media_mode(media.mode),  # rows from before media_mode may have them
            uid=media.uid,
            gid=media.gid,
            atime_ns=media.atime_ns,
            mtime_ns=media.mtime_ns,
            ctime_ns=media.ctime_ns,
            backing_path=backing_path,
            open_path=open_path,
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
        made: tuple[str, str] | None = None  # the backing file, while this create has one
        try:
            with self.batch.unit(batched=holder_id is not None) as (conn, journal):
                if holder_id is not None:
                    require_live_holder(conn, holder_id)
                (chain,) = self.chains.lock(conn, pool_id)
                if name_taken(conn, pool_id, name):
                    raise Conflict(f"'{name}' already exists in pool '{chain[-1].name}'")
                # In the unit, on its connection: asking the policy must not commit a batch.
                volume = self._placement(conn, chain_path(chain), name, creator)
                spare = self._spares.take(volume) if self._spares is not None else None
                row = _new_row(
                    spare or new_id(), pool_id, name, size, volume, mode=mode, uid=uid, gid=gid
                )
                if spare is not None:
                    made = (volume, row["id"])
                available = room(chain) - size
                first = grant_size(0, max(0, available), grant_chunk) if holder_id else 0
                charge(conn, chain, size + first, touch_ns=row["ctime_ns"])
                _INSERT_MEDIA.execute(conn, row)
                if holder_id is not None:
                    add_grant(conn, pool_id, row["id"], holder_id, first)
                if spare is not None:
                    self.backing.adopt_spare(volume, spare, size)
                else:
                    self.backing.create(volume, row["id"], size)
                    made = (volume, row["id"])
                if journal is not None:
                    journal.append({**row, "granted": size + first})
                return self.view(SimpleNamespace(**row)), first
        except BaseException:
            if made is not None:
                self.backing.remove(*made)
            raise

    def recover_journal(self, holder_id: str) -> int:
        """Make again what a gone process journaled but never committed: its creates,
        then, in their order, its renames, attribute changes and subpools.

        Each create comes back with its backing file's bytes, but never more than
        it was granted nor more than its pool chain has room for now (the file is
        cut back to that). It keeps its name, or is ``NAME.recovered-ID8`` when
        the name was taken since. One whose pool or backing file is gone is
        dropped. A rename and a subpool are recovered the same way (``_recover_rename``,
        ``recover_pool``); attributes are set again where their media or pool is
        still there. Returns how many creates came back; the journal is deleted,
        unless creates on an offline volume wait in it for their disk (their files
        are there, out of sight: a later replay makes them media), with what was
        journaled after them about them.
        """
        recovered = others = 0
        waiting: list[dict[str, Any]] = []
        for record in read_journal(self.backing.top, holder_id):
            op = record.get("op")
            offline = op is None and self._volume_offline(record["volume"]) is not None
            if offline or any(w["id"] == record["id"] for w in waiting):
                waiting.append(record)
            elif op is None:
                recovered += self._recover_create(record)
            else:
                others += self._recover_change(record)
        if others:
            log.warning(
                "replayed %d rename(s), attribute change(s) and subpool(s) that process %s "
                "journaled but never committed",
                others,
                holder_id,
            )
        if waiting:
            log.warning(
                "%d create(s) journaled by process %s are on offline volumes: "
                "kept for when their disks are back",
                sum(1 for w in waiting if "op" not in w),
                holder_id,
            )
            keep_journal(self.backing.top, holder_id, waiting)
        else:
            discard_journal(self.backing.top, holder_id)
        return recovered

    def _recover_create(self, record: dict[str, Any]) -> int:
        media_id, volume, pool_id = record["id"], record["volume"], record["pool_id"]
        on_disk = self.backing.size(volume, media_id)
        with self.db.statements() as conn:
            if on_disk is None or conn.execute(_EXISTS, {"mid": media_id}).first():
                return 0
            try:
                (chain,) = self.chains.lock(conn, pool_id)
            except NotFound:
                self.backing.remove(volume, media_id)
                return 0
            name = record["name"]
            if name_taken(conn, pool_id, name):
                name = f"{name}.recovered-{media_id[:8]}"
            size = min(on_disk, record["granted"], room(chain))
            if size < on_disk:
                os.truncate(self.backing.path(volume, media_id), size)
            now = time.time_ns()
            charge(conn, chain, size, touch_ns=now)
            row = {key: record[key] for key in _ROW_KEYS}
            _INSERT_MEDIA.execute(
                conn, {**row, "name": name, "size": size, "changed_ns": now, "unlinked_by": None}
            )
            return 1

    def _recover_change(self, record: dict[str, Any]) -> int:
        """Replay one journaled change that is not a create; 1 if it took effect."""
        op = record["op"]
        try:
            if op == "rename":
                return self._recover_rename(record)
            with self.db.statements() as conn:
                if op == "pool":
                    return int(recover_pool(conn, self.chains, record))
                if op == "attrs":
                    table = MEDIA if record["table"] == "media" else POOLS
                    columns = {k: v for k, v in record.items() if k in _ATTR_KEYS}
                    done = conn.execute(
                        update(table).where(table.c.id == record["id"]).values(**columns)
                    )
                    return int(done.rowcount > 0)
        except (QuotaExceeded, Conflict) as exc:
            log.warning("a journaled %s of %s is not replayed: %s", op, record["id"], exc)
            return 0
        log.warning("a journal record of an unknown kind is skipped: %s", op)
        return 0

    def _recover_rename(self, record: dict[str, Any]) -> int:
        """Move a media as a journaled rename did, unless it is gone (or already there).

        The media it replaced goes whatever happens (its backing file went with
        the rename); a name taken since by anything else makes the moved one
        ``NAME.recovered-ID8``. A move that no longer fits its new pool's quota
        is not made.
        """
        pool_id, name = record["pool_id"], record["name"]
        with self.db.statements() as conn:
            replaced = conn.execute(_BY_NAME, {"pid": pool_id, "name": name}).first()
            if replaced is not None and replaced.id == record["replaced"]:
                rows, chains = lock_media_rows(conn, self.chains, [replaced.id])
                self._drop(conn, list(rows.values()), chains)
        if replaced is not None and replaced.id == record["replaced"]:
            self.backing.remove(replaced.volume, replaced.id)
        with self.db.statements() as conn:
            media = conn.execute(_MEDIA_BY_ID, {"mid": record["id"]}).first()
            if media is None:
                return 0
            try:
                old_chain, new_chain = self.chains.lock(conn, media.pool_id, pool_id)
            except NotFound:
                return 0
            if media.pool_id == pool_id and media.name == name:
                return 0
            if name_taken(conn, pool_id, name):
                name = f"{name}.recovered-{media.id[:8]}"
            self._move(conn, media, (old_chain, new_chain), name, None)
        return 1

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
        row = _new_row(media_id, pool_id, name, size, volume)
        with self.db.statements() as conn:
            (chain,) = self.chains.lock(conn, pool_id)
            if name_taken(conn, pool_id, name):
                raise Conflict(f"'{name}' already exists in pool '{chain[-1].name}'")
            held = conn.execute(select(GRANTS.c.bytes).where(GRANTS.c.id == grant_id)).scalar()
            charge(conn, chain, size - (held or 0), touch_ns=row["ctime_ns"])
            conn.execute(delete(GRANTS).where(GRANTS.c.id == grant_id))
            _INSERT_MEDIA.execute(conn, row)
            final = self.backing.path(volume, media_id)
            self.backing.make_media_dirs(volume, final.parent)
            os.chmod(upload_path, FILE_MODE)  # a backing file, however the upload made it
            os.rename(upload_path, final)
            self.backing.point_default(volume, media_id)
            return self.view(SimpleNamespace(**row))

    def choose_volume(self, pool_id: str, name: str, creator: Creator | None) -> str:
        """The volume that new media of this pool, name and creator goes to."""
        with self.db.reading() as s:
            conn = s.connection()
            return self._placement(conn, self.chains.path(conn, pool_id), name, creator)

    def volumes(self, media_ids: Iterable[str]) -> dict[str, str]:
        """The volume of each media that exists, by id."""
        ids = list(media_ids)
        found: dict[str, str] = {}
        with self.db.statements() as conn:
            for start in range(0, len(ids), VOLUMES_BATCH):
                chunk = {"ids": ids[start : start + VOLUMES_BATCH]}
                found.update((row.id, row.volume) for row in conn.execute(_VOLUMES, chunk))
        return found

    def get(self, media_id: str) -> MediaView:
        with self.db.transaction() as s:
            media = s.get(Media, media_id)
            if media is None or media.unlinked_by is not None:
                raise NotFound(f"no media {media_id}")
            return self.view(media)

    def in_pool(self, pool_id: str) -> list[MediaView]:
        with self.db.transaction() as s:
            if s.get(Pool, pool_id) is None:
                raise NotFound(f"no pool {pool_id}")
            rows = s.execute(
                select(Media)
                .where(Media.pool_id == pool_id, Media.unlinked_by.is_(None))
                .order_by(Media.name)
            )
            return [self.view(m) for m in rows.scalars()]

    def all(self) -> list[MediaView]:
        """Every media with its xattrs: what a mount loads at start."""
        with self.db.reading() as s:
            xattrs: dict[str, dict[str, bytes]] = {}
            for owner, name, value in s.execute(select(XAttr.owner_id, XAttr.name, XAttr.value)):
                xattrs.setdefault(owner, {})[name] = value
            # Core rows: 20,000 ORM objects cost a second.
            rows = s.execute(select(MEDIA).where(MEDIA.c.unlinked_by.is_(None)))
            return [self.view(m, xattrs.get(m.id)) for m in rows]

    def remove(self, media_id: str) -> None:
        """Delete media: its size and any grants on it go back to the pool chain."""
        if not self.remove_many([media_id]):
            raise NotFound(f"no media {media_id}")

    def remove_many(self, media_ids: Sequence[str]) -> list[str]:
        """Delete many media in one transaction (a mount's unlinks, batched).

        Media already gone (removed by another host) are skipped; returns the
        ids removed. Backing files go after the commit.
        """
        with self.db.statements() as conn:
            # Sizes as of the locks, not before.
            rows, chains = lock_media_rows(conn, self.chains, media_ids)
            if rows:
                self._drop(conn, list(rows.values()), chains)
        for row in rows.values():
            self.backing.remove(row.volume, row.id)
        return list(rows)

    def unlink_open(self, media_ids: Sequence[str], holder_id: str) -> list[str]:
        """Unlink media that ``holder_id`` still has open, in one transaction.

        The row stays, and so does what its pool is charged (size and grants), as
        the kernel's filesystems keep an unlinked open file: it gets the name
        ``/ID``, which no user can give, so its old name is free at once; it is
        marked ``unlinked_by`` the holder, which hides it from every listing, and
        a tombstone drops it from other mounts. The holder's last close removes
        it (``remove_many``), or the holder's reclaim (``remove_unlinked``).
        Returns the ids unlinked (media already gone are skipped).
        """
        with self.db.statements() as conn:
            require_live_holder(conn, holder_id)
            rows, _chains = lock_media_rows(conn, self.chains, media_ids)
            if not rows:
                return []
            now = time.time_ns()
            conn.execute(
                _UNLINK_OPEN,
                [
                    {"mid": mid, "hidden": f"/{mid}", "holder": holder_id, "now": now}
                    for mid in rows
                ],
            )
            for pool_id in {row.pool_id for row in rows.values()}:
                touch(conn, pool_id, now)
            record_removals(conn, "media", list(rows))
        return list(rows)

    def left_unlinked(self, holder_ids: Sequence[str]) -> list[str]:
        """Media unlinked while open by ``holder_ids`` or by a holder no longer in the
        catalog: their last close will never come."""
        gone = ~MEDIA.c.unlinked_by.in_(select(HOLDERS.c.id))
        stale = select(MEDIA.c.id).where(
            MEDIA.c.unlinked_by.is_not(None), MEDIA.c.unlinked_by.in_(holder_ids) | gone
        )
        with self.db.statements() as conn:
            return list(conn.execute(stale).scalars())

    def remove_unlinked(self, holder_ids: Sequence[str]) -> int:
        """Remove the media ``left_unlinked`` finds (``holder_ids`` fenced: dead);
        returns how many. Their room goes back and their backing files go now."""
        ids = self.left_unlinked(holder_ids)
        removed = 0
        for start in range(0, len(ids), VOLUMES_BATCH):
            removed += len(self.remove_many(ids[start : start + VOLUMES_BATCH]))
        return removed

    def _drop(
        self, conn: Connection, media: Sequence[Any], chains: Mapping[str, list[Link]]
    ) -> None:
        """Delete media rows (id, pool_id, size); ``chains`` are their pools' chains,
        already locked. Each pool is charged once, for all of its media."""
        params = {"ids": [m.id for m in media]}
        grants = {media_id: total for media_id, total in conn.execute(_GRANTED, params)}
        freed: dict[str, int] = {}
        for m in media:
            freed[m.pool_id] = freed.get(m.pool_id, 0) + m.size + int(grants.get(m.id, 0))
        now = time.time_ns()
        for pool_id, nbytes in freed.items():
            charge(conn, chains[pool_id], -nbytes, touch_ns=now)
        conn.execute(_DROP_GRANTS, params)
        conn.execute(_DROP_XATTRS, params)
        record_removals(conn, "media", params["ids"])
        conn.execute(_DROP_MEDIA, params)

    def rename(
        self,
        media_id: str,
        pool_id: str,
        name: str,
        *,
        batched: bool = False,
        keep_replaced_for: str | None = None,
    ) -> str | None:
        """Rename or move media, replacing a media of the target name.

        Catalog-only: the backing file is named by id. Across pools the size
        (and any outstanding grant) moves to the target chain and must fit; a
        refusal changes nothing. Returns the id of the replaced media, if any.
        ``batched``: a unit of the process's batch, journaled, when it batches
        (``WriteBatch``); the replaced media's backing file goes at once even so,
        since a replay of the journal removes its row in any case.
        ``keep_replaced_for``: the holder that still has the replaced media open;
        it is then unlinked as ``unlink_open`` does (kept, charged and hidden until
        that holder's last close), not removed.
        """
        check_name(name, "file name")
        with self.batch.unit(batched=batched) as (conn, journal):
            media = media_row(conn, media_id)
            while True:
                # Both chains together, root-first; the row is read again under them
                # where another transaction could have moved it meanwhile (not SQLite).
                old_chain, new_chain = self.chains.lock(conn, media.pool_id, pool_id)
                if serialised(conn):
                    break
                media = media_row(conn, media_id)
                if media.pool_id == old_chain[-1].id:
                    break
            replaced = conn.execute(_BY_NAME, {"pid": pool_id, "name": name}).first()
            if replaced is not None and replaced.id == media.id:
                return None
            if replaced is None and name_taken(conn, pool_id, name):
                raise Conflict(f"'{name}' is a pool in '{new_chain[-1].name}'")
            if replaced is not None and keep_replaced_for is not None:
                self._unlink_replaced(conn, replaced.id, keep_replaced_for)
                replaced_kept, replaced = replaced, None
            else:
                replaced_kept = None
            self._move(conn, media, (old_chain, new_chain), name, replaced)
            if journal is not None:
                replaced_id = replaced.id if replaced is not None else None
                journal.append(
                    {"op": "rename", "id": media.id, "pool_id": pool_id, "name": name,
                     "replaced": replaced_id}
                )  # fmt: skip
        if replaced_kept is not None:
            return str(replaced_kept.id)
        if replaced is None:
            return None
        self.backing.remove(replaced.volume, replaced.id)
        return str(replaced.id)

    def _unlink_replaced(self, conn: Connection, media_id: str, holder_id: str) -> None:
        """``unlink_open`` of the media a rename replaces, in the rename's transaction."""
        require_live_holder(conn, holder_id)
        params = {"mid": media_id, "hidden": f"/{media_id}", "holder": holder_id}
        conn.execute(_UNLINK_OPEN, {**params, "now": time.time_ns()})
        record_removals(conn, "media", [media_id])

    def _move(
        self,
        conn: Connection,
        media: Any,
        chains: tuple[list[Link], list[Link]],
        name: str,
        replaced: Any,
    ) -> None:
        """Move a media row (id, pool_id, size) to the last pool of the second of its
        locked ``chains`` (old, new) under ``name``, dropping the ``replaced`` row there;
        across pools its size and grants are charged to the new chain."""
        old_chain, new_chain = chains
        pool_id = new_chain[-1].id
        if replaced is not None:
            self._drop(conn, [replaced], {pool_id: new_chain})
        now = time.time_ns()
        if media.pool_id != pool_id:
            total = media.size + granted(conn, media.id)
            charge(conn, old_chain, -total, touch_ns=now)
            charge(conn, new_chain, total, touch_ns=now)
            conn.execute(_MOVE_GRANTS, {"mid": media.id, "new_pool": pool_id})
        else:
            touch(conn, pool_id, now)
        conn.execute(_MOVE, {"mid": media.id, "new_pool": pool_id, "new_name": name, "now": now})

    def set_attrs(
        self,
        media_id: str,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        batched: bool = False,
    ) -> dict[str, int]:
        """Metadata that ``cp -a`` and ``rsync -a`` restore; ``batched`` as for ``rename``.
        Returns the columns as stored (a media's mode loses setuid and setgid)."""
        columns = attr_changes(
            mode=None if mode is None else media_mode(mode),
            uid=uid,
            gid=gid,
            atime_ns=atime_ns,
            mtime_ns=mtime_ns,
        )
        with self.batch.unit(batched=batched) as (conn, journal):
            done = conn.execute(update(MEDIA).where(MEDIA.c.id == media_id).values(**columns))
            if done.rowcount == 0:
                raise NotFound(f"no media {media_id}")
            if journal is not None:
                journal.append({"op": "attrs", "table": "media", "id": media_id, **columns})
        return columns

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
