"""The quota ledger: grants, settlement and the hierarchical quota check.

A writer reserves room ahead of its writes (a grant), writes into it without
touching SQL, and settles to the real size on flush, fsync or close. Every
change to usage goes through the locked pool chains of ``chains``.

The grant transactions are SQLAlchemy Core on a connection (see
``Database.statements``): a small file costs a create and a settle, so their
fixed cost is what create and unlink rates are made of.
"""

import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias, TypedDict

from sqlalchemy import (
    BigInteger,
    Connection,
    Row,
    bindparam,
    delete,
    func,
    insert,
    select,
    update,
)

from velocityfs.catalog.database import Database
from velocityfs.catalog.models import Grant, Holder, Media, new_id
from velocityfs.catalog.prepared import Prepared
from velocityfs.errors import NotFound, QuotaExceeded
from velocityfs.service.chains import Chains, Link, charge, room, serialised

GRANT_CHUNK = 64 << 20
DEFAULT_LEASE_S = 30.0

GRANTS = Grant.__table__
MEDIA = Media.__table__

# A row of ``_MEDIA_ROWS``: id, pool_id, size, mtime_ns, volume. (Quoted: the column
# types are Row's parameters from SQLAlchemy 2.1 on; 2.0 takes one tuple type.)
MediaRow: TypeAlias = "Row[str, str, int, int, str]"


@dataclass(frozen=True)
class Settlement:
    """One media's new size, what is left of the holder's grant, and whether it stays open."""

    media_id: str
    size: int
    keep: int = 0
    hold: bool = False
    mtime_ns: int | None = None


@dataclass(frozen=True)
class Reservation:
    """What a grant request got: the grant's id and the bytes added to it."""

    grant_id: str
    added: int


_MEDIA_ROWS = select(
    MEDIA.c.id, MEDIA.c.pool_id, MEDIA.c.size, MEDIA.c.mtime_ns, MEDIA.c.volume
).where(MEDIA.c.id.in_(bindparam("ids", expanding=True)))
_MEDIA_LOCK = select(MEDIA.c.pool_id).where(MEDIA.c.id == bindparam("mid")).with_for_update()
_HOLDER_GRANTS = select(GRANTS.c.media_id, GRANTS.c.id, GRANTS.c.bytes).where(
    GRANTS.c.media_id.in_(bindparam("ids", expanding=True)),
    GRANTS.c.holder_id == bindparam("holder"),
)
_MEDIA_GRANTED = select(func.coalesce(func.sum(GRANTS.c.bytes), 0)).where(
    GRANTS.c.media_id == bindparam("mid")
)
_SET_SIZE = (
    update(MEDIA)
    .where(MEDIA.c.id == bindparam("mid"))
    .values(
        size=bindparam("new_size"),
        mtime_ns=func.coalesce(bindparam("new_mtime", type_=BigInteger), MEDIA.c.mtime_ns),
    )
)
_SET_GRANT = update(GRANTS).where(GRANTS.c.id == bindparam("gid")).values(bytes=bindparam("nbytes"))
_GROW_GRANT = (
    update(GRANTS)
    .where(GRANTS.c.id == bindparam("gid"))
    .values(bytes=GRANTS.c.bytes + bindparam("added"))
)
_DROP_GRANTS = delete(GRANTS).where(GRANTS.c.id.in_(bindparam("gids", expanding=True)))
_GRANT_BY_ID = select(GRANTS.c.pool_id, GRANTS.c.media_id, GRANTS.c.bytes).where(
    GRANTS.c.id == bindparam("gid")
)
_INSERT_GRANT = Prepared(insert(GRANTS))
# Many rows at once (executemany) go through SQLAlchemy: ``Prepared`` runs one row.
_INSERT_GRANTS = insert(GRANTS)


class GrantRow(TypedDict):
    """A new grant's columns, as inserted."""

    id: str
    pool_id: str
    media_id: str | None
    holder_id: str
    bytes: int
    created_ns: int


def grant_row(pool_id: str, media_id: str | None, holder_id: str, nbytes: int = 0) -> GrantRow:
    """A new grant's columns; ``media_id`` is None for an upload whose media does not exist yet."""
    return {
        "id": new_id(),
        "pool_id": pool_id,
        "media_id": media_id,
        "holder_id": holder_id,
        "bytes": nbytes,
        "created_ns": time.time_ns(),
    }


def add_grant(
    conn: Connection, pool_id: str, media_id: str | None, holder_id: str, nbytes: int = 0
) -> str:
    """Insert a grant (its bytes already charged to the chain); returns its id."""
    row = grant_row(pool_id, media_id, holder_id, nbytes)
    _INSERT_GRANT.execute(conn, row)
    return row["id"]


def lock_media_rows(
    conn: Connection, chains_of: Chains, media_ids: Sequence[str]
) -> tuple[dict[str, MediaRow], dict[str, list[Link]]]:
    """Media rows (as ``media_row``) and their pools' chains, locked root-first.

    Every change to a media's size or pool is made while its pool's chain is
    locked, so rows read again after taking the locks are current until commit.
    The first read only says which chains to lock: on PostgreSQL another
    transaction may change a row (settle a new size, move it) before the locks
    are ours, so the locking is redone if one moved to another pool in between.
    """
    params = {"ids": list(media_ids)}
    rows = {r.id: r for r in conn.execute(_MEDIA_ROWS, params)}
    while True:
        pool_ids = sorted({r.pool_id for r in rows.values()})
        chains = dict(zip(pool_ids, chains_of.lock(conn, *pool_ids), strict=True))
        if serialised(conn):
            return rows, chains
        rows = {r.id: r for r in conn.execute(_MEDIA_ROWS, params)}
        if all(r.pool_id in chains for r in rows.values()):
            return rows, chains


def media_row(conn: Connection, media_id: str) -> MediaRow:
    """A media's id, pool_id, size, mtime_ns and volume, read without locks."""
    row = conn.execute(_MEDIA_ROWS, {"ids": [media_id]}).first()
    if row is None:
        raise NotFound(f"no media {media_id}")
    return row


def lock_media(conn: Connection, chains_of: Chains, media_id: str) -> tuple[MediaRow, list[Link]]:
    """One media row and its pool chain, locked as ``lock_media_rows`` does."""
    rows, chains = lock_media_rows(conn, chains_of, [media_id])
    row = rows.get(media_id)
    if row is None:
        raise NotFound(f"no media {media_id}")
    return row, chains[row.pool_id]


def granted(conn: Connection, media_id: str) -> int:
    """Bytes of every holder's grants on a media."""
    return int(conn.execute(_MEDIA_GRANTED, {"mid": media_id}).scalar_one())


def grant_size(need: int, available: int, chunk: int) -> int:
    """How much to reserve when ``need`` bytes are wanted and ``available`` are left.

    Far from a limit a writer takes a whole chunk (few transactions); near it,
    never more than a quarter of what is left, so siblings can still fill the
    parent to the byte.
    """
    if need > available:
        return available
    return max(need, min(chunk, available // 4))


class Ledger:
    """Grant lifecycle, each call one transaction on the catalog."""

    def __init__(
        self, database: Database, chains: Chains, lease_s: float = DEFAULT_LEASE_S
    ) -> None:
        self.db = database
        self.chains = chains
        self.lease_ns = int(lease_s * 1_000_000_000)

    def reserve(
        self,
        media_id: str,
        holder_id: str,
        need: int,
        *,
        partial: bool = False,
        chunk: int = GRANT_CHUNK,
    ) -> Reservation:
        """Grow the holder's grant on a media by at least ``need`` bytes.

        With ``partial`` a request that only partly fits gets what fits (a
        short write); without it, or when nothing fits, QuotaExceeded.
        """
        with self.db.statements() as conn:
            media, chain = lock_media(conn, self.chains, media_id)
            available = room(chain)
            if available == 0 or (available < need and not partial):
                raise QuotaExceeded(f"pool '{chain[-1].name}': {available} bytes left")
            added = grant_size(need, available, chunk)
            charge(conn, chain, added)
            grant = conn.execute(_HOLDER_GRANTS, {"ids": [media_id], "holder": holder_id}).first()
            if grant is None:
                return Reservation(
                    add_grant(conn, media.pool_id, media_id, holder_id, added), added
                )
            conn.execute(_GROW_GRANT, {"gid": grant.id, "added": added})
            return Reservation(grant.id, added)

    def settle(
        self,
        media_id: str,
        holder_id: str,
        size: int,
        keep: int = 0,
        *,
        hold: bool = False,
        mtime_ns: int | None = None,
    ) -> None:
        """Record the media's real ``size`` and shrink the holder's grant to ``keep``.

        The difference is returned to (or, for growth without a grant, charged
        to) the pool chain; growth that does not fit raises QuotaExceeded and
        changes nothing. With ``hold`` the grant row stays even at 0 bytes: the
        media is still open for writing (see ``hold``).
        """
        missing = self.settle_many(holder_id, [Settlement(media_id, size, keep, hold, mtime_ns)])
        if missing:
            raise NotFound(f"no media {media_id}")

    def settle_many(self, holder_id: str, settlements: Sequence[Settlement]) -> list[str]:
        """Settle many media of one holder in one transaction (a mount's closes, batched).

        All their pool chains are locked together, in the global root-first
        order. Returns the ids of media that no longer exist (skipped). A
        process that batches its creates settles in the batch too (they only
        give room back): one commit for both.
        """
        ids = [st.media_id for st in settlements]
        with self.db.unit() as conn:
            media, chains = lock_media_rows(conn, self.chains, ids)
            grants = {
                g.media_id: g
                for g in conn.execute(_HOLDER_GRANTS, {"ids": ids, "holder": holder_id})
            }
            sizes, kept, dropped, added = [], [], [], []
            deltas: dict[str, int] = {}  # per pool: one charge for all its media
            for st in settlements:
                row = media.get(st.media_id)
                if row is None:
                    continue
                grant = grants.get(st.media_id)
                held = grant.bytes if grant else 0
                delta = (st.size - row.size) + (st.keep - held)
                deltas[row.pool_id] = deltas.get(row.pool_id, 0) + delta
                if st.size != row.size or st.mtime_ns not in (None, row.mtime_ns):
                    sizes.append({"mid": row.id, "new_size": st.size, "new_mtime": st.mtime_ns})
                if grant is not None and st.keep == 0 and not st.hold:
                    dropped.append(grant.id)
                elif grant is not None and grant.bytes != st.keep:
                    kept.append({"gid": grant.id, "nbytes": st.keep})
                elif grant is None and (st.keep or st.hold):
                    added.append(grant_row(row.pool_id, row.id, holder_id, st.keep))
            for pool_id, delta in deltas.items():
                charge(conn, chains[pool_id], delta)
            if sizes:
                conn.execute(_SET_SIZE, sizes)
            if kept:
                conn.execute(_SET_GRANT, kept)
            if added:
                conn.execute(_INSERT_GRANTS, added)
            if dropped:
                conn.execute(_DROP_GRANTS, {"gids": dropped})
            return [mid for mid in ids if mid not in media]

    def hold(self, media_id: str, holder_id: str) -> None:
        """Mark a media open for writing by this holder: a grant row, possibly of 0 bytes.

        Volume moves refuse media that has any grant. The media row is locked
        first, the same lock a move's switch takes, so a writer cannot open the
        file between a move's last check and its switch.
        """
        with self.db.statements() as conn:
            media = conn.execute(_MEDIA_LOCK, {"mid": media_id}).first()
            if media is None:
                raise NotFound(f"no media {media_id}")
            mine = {"ids": [media_id], "holder": holder_id}
            if conn.execute(_HOLDER_GRANTS, mine).first() is None:
                add_grant(conn, media.pool_id, media_id, holder_id)

    def reserve_in_pool(
        self,
        pool_id: str,
        holder_id: str,
        need: int,
        grant_id: str | None = None,
        chunk: int = 0,
    ) -> Reservation:
        """Reserve at least ``need`` bytes in a pool for media that does not exist yet.

        Uploads use this: the room is charged before the bytes arrive and the
        grant is adopted by the media row when the upload completes. With
        ``chunk`` it reserves ahead as ``reserve`` does (a chunk far from a
        limit, a quarter of what is left near it). Returns the grant (a new
        one, or ``grant_id`` grown) and the bytes added.
        """
        with self.db.statements() as conn:
            (chain,) = self.chains.lock(conn, pool_id)
            available = room(chain)
            if available < need:
                raise QuotaExceeded(f"pool '{chain[-1].name}': {available} bytes left")
            need = grant_size(need, available, chunk) if chunk else need
            charge(conn, chain, need)
            if grant_id is not None and conn.execute(_GRANT_BY_ID, {"gid": grant_id}).first():
                conn.execute(_GROW_GRANT, {"gid": grant_id, "added": need})
                return Reservation(grant_id, need)
            return Reservation(add_grant(conn, pool_id, None, holder_id, need), need)

    def release(self, grant_id: str) -> None:
        """Hand a grant's room back to its pool chain (an aborted upload)."""
        with self.db.statements() as conn:
            grant = conn.execute(_GRANT_BY_ID, {"gid": grant_id}).first()
            if grant is None:
                return
            (chain,) = self.chains.lock(conn, grant.pool_id)
            charge(conn, chain, -grant.bytes)
            conn.execute(_DROP_GRANTS, {"gids": [grant_id]})

    def register_holder(self) -> str:
        """Record this process as a grant holder and return its id."""
        now = time.time_ns()
        with self.db.transaction() as s:
            holder = Holder(
                host=socket.gethostname(), pid=os.getpid(), started_ns=now, heartbeat_ns=now
            )
            s.add(holder)
            s.flush()
            return holder.id

    def retire_holder(self, holder_id: str) -> None:
        """Forget a holder on a clean shutdown, unless grants are left (a settlement
        failed): then the row stays, so the grants are reclaimed like a dead one's."""
        with self.db.transaction() as s:
            holder = s.get(Holder, holder_id)
            left = s.execute(select(Grant.id).where(Grant.holder_id == holder_id)).first()
            if holder is not None and left is None:
                s.delete(holder)

    def holders(self) -> list[dict[str, object]]:
        """Every registered process with the number of grants it holds."""
        with self.db.transaction() as s:
            counts = dict(
                s.execute(select(Grant.holder_id, func.count()).group_by(Grant.holder_id)).all()
            )
            return [
                {"id": h.id, "host": h.host, "pid": h.pid, "grants": counts.get(h.id, 0)}
                for h in s.execute(select(Holder).order_by(Holder.started_ns)).scalars()
            ]

    def heartbeat(self, holder_id: str) -> bool:
        """Renew this holder's lease; False when it was already reclaimed as dead."""
        with self.db.transaction() as s:
            holder = s.get(Holder, holder_id)
            if holder is None:
                return False
            holder.heartbeat_ns = time.time_ns()
            return True

    def holder_ids(self) -> list[str]:
        """Every registered holder, alive or not."""
        with self.db.transaction() as s:
            return list(s.execute(select(Holder.id)).scalars())

    def dead_holders(self) -> list[str]:
        """Holders whose grants are stale: a gone process on this host, or a lease
        not renewed in time on any host (a crashed or cut-off machine)."""
        host = socket.gethostname()
        expired = time.time_ns() - self.lease_ns
        with self.db.transaction() as s:
            holders = s.execute(select(Holder)).scalars().all()
            return [
                h.id
                for h in holders
                if h.heartbeat_ns < expired or (h.host == host and not _process_alive(h.pid))
            ]

    def stale_grants(self, holder_ids: Sequence[str]) -> list[tuple[str, str | None]]:
        """(grant id, media id) of every grant held by ``holder_ids``; the media id is
        None for an upload's grant (its media does not exist yet)."""
        with self.db.transaction() as s:
            rows = s.execute(
                select(Grant.id, Grant.media_id).where(Grant.holder_id.in_(holder_ids))
            ).all()
            return [(gid, mid) for gid, mid in rows]

    def reclaim(self, holder_id: str, sizes: dict[str, int]) -> int:
        """Drop a dead holder's grants, settling each media to its size on disk.

        ``sizes`` maps media id to the backing file's apparent size, so bytes
        the dead writer really wrote stay charged and the rest is returned.
        Each grant is its own transaction, keeping the root-first lock order.
        Returns how many grants were reclaimed.
        """
        with self.db.statements() as conn:
            grant_ids = list(
                conn.execute(select(GRANTS.c.id).where(GRANTS.c.holder_id == holder_id)).scalars()
            )
        for grant_id in grant_ids:
            with self.db.statements() as conn:
                grant = conn.execute(_GRANT_BY_ID, {"gid": grant_id}).first()
                if grant is None:
                    continue
                (chain,) = self.chains.lock(conn, grant.pool_id)
                media = None
                if grant.media_id is not None:
                    media = conn.execute(_MEDIA_ROWS, {"ids": [grant.media_id]}).first()
                delta = -grant.bytes
                if media is not None and grant.media_id in sizes:
                    real = min(sizes[grant.media_id], media.size + grant.bytes)
                    delta += real - media.size
                    conn.execute(_SET_SIZE, {"mid": media.id, "new_size": real, "new_mtime": None})
                charge(conn, chain, delta)
                conn.execute(_DROP_GRANTS, {"gids": [grant_id]})
        with self.db.transaction() as s:
            holder = s.get(Holder, holder_id)
            if holder is not None:
                s.delete(holder)
        return len(grant_ids)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
