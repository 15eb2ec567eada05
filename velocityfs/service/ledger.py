"""The quota ledger: grants, settlement and the hierarchical quota check.

A writer reserves room ahead of its writes (a grant), writes into it without
touching SQL, and settles to the real size on flush, fsync or close. Every
change to usage goes through the locked pool chains of ``chains``.

The grant transactions are SQLAlchemy Core on a connection (see
``Database.statements``): a small file costs a create and a settle, so their
fixed cost is what create and unlink rates are made of.
"""

import logging
import os
import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TypeAlias, TypedDict

from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Connection,
    Row,
    Select,
    bindparam,
    delete,
    false,
    func,
    insert,
    select,
    update,
)

from velocityfs.catalog.database import POSTGRESQL_NOW_NS, Database
from velocityfs.catalog.models import CatalogSettings, Grant, Holder, Media, new_id
from velocityfs.catalog.prepared import Prepared
from velocityfs.errors import InvalidValue, LeaseLost, NotFound
from velocityfs.service.chains import Chains, Link, adjust, charge, full, room, serialised

log = logging.getLogger(__name__)

GRANT_CHUNK = 64 << 20
# The range ``velocityfs lease set`` accepts: a renewal every third of the lease must
# fit between a mount's other catalog calls, and a dead host's room comes back after it.
LEASE_RANGE_S = (0.2, 3600.0)
# Grants handed back per transaction by a reclaim (and so the media ids one statement
# binds, far below what a driver allows).
RECLAIM_BATCH = 1000

GRANTS = Grant.__table__
HOLDERS = Holder.__table__
MEDIA = Media.__table__
SETTINGS = CatalogSettings.__table__

# A row of ``_MEDIA_ROWS``: id, pool_id, size, mtime_ns, volume. (Quoted: the column
# types are Row's parameters from SQLAlchemy 2.1 on; 2.0 takes one tuple type.)
MediaRow: TypeAlias = "Row[str, str, int, int, str]"
# A holder as ``Ledger._judging`` reads it: id, host, pid, fenced, expired.
HolderRow: TypeAlias = "Row[str, str, int, bool, bool]"


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
_GRANTS_BY_IDS = select(GRANTS.c.id, GRANTS.c.pool_id, GRANTS.c.media_id, GRANTS.c.bytes).where(
    GRANTS.c.id.in_(bindparam("gids", expanding=True))
)
_INSERT_GRANT = Prepared(insert(GRANTS))
_LEASE_NS = select(SETTINGS.c.lease_ns).where(SETTINGS.c.id == 1)
# Many rows at once (executemany) go through SQLAlchemy: ``Prepared`` runs one row.
_INSERT_GRANTS = insert(GRANTS)


@dataclass(frozen=True)
class Lease:
    """A lease this process holds: when the renewal that gave it was sent (on
    ``time.monotonic()``) and how long the catalog made it.

    The catalog stamped it no earlier than ``sent``, so on any clock that runs at
    the catalog's rate it ends no earlier than ``sent + length_s``.
    """

    sent: float
    length_s: float

    def trusted_until(self, share: float) -> float:
        """The monotonic time until which ``share`` of the lease is surely left."""
        return self.sent + self.length_s * share


def _live_holder(now_ns: ColumnElement[int]) -> Prepared:
    return Prepared(
        select(HOLDERS.c.id)
        .where(
            HOLDERS.c.id == bindparam("holder"),
            HOLDERS.c.fenced == false(),
            HOLDERS.c.expires_ns >= now_ns,
        )
        .with_for_update(read=True, key_share=True)
    )


# By dialect, prepared once: every create and settle runs it. SQLite's clock is this
# host's, bound as ``now`` (a ``Prepared`` binds no value it would compute per call).
_LIVE_HOLDER = {
    "sqlite": _live_holder(bindparam("now", type_=BigInteger)),
    "postgresql": _live_holder(POSTGRESQL_NOW_NS),
}


def require_live_holder(conn: Connection, holder_id: str) -> None:
    """Refuse a holder whose lease has expired or who was fenced (LeaseLost).

    Every call that takes or changes a holder's grants asks first, on the
    transaction's connection: a reclaim fences a holder before it measures its
    files, so nothing the holder does after the fence changes what was
    measured. On PostgreSQL the holder's row is share-locked until commit, so a
    fence (which locks it for update) waits for this transaction, and one that
    begins after the fence sees it.
    """
    live = _LIVE_HOLDER[conn.dialect.name]
    params: dict[str, object] = {"holder": holder_id}
    if conn.dialect.name == "sqlite":
        params["now"] = time.time_ns()
    if live.execute(conn, params).fetchone() is None:
        raise LeaseLost(f"the lease of holder {holder_id} expired: it must register again")


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

    def __init__(self, database: Database, chains: Chains) -> None:
        self.db = database
        self.chains = chains
        self._lease_ns: int | None = None
        # The leases of the holders this process registered and still is: never
        # judged dead by this process (a process does not reclaim itself).
        self._leases: dict[str, Lease] = {}

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
            require_live_holder(conn, holder_id)
            media, chain = lock_media(conn, self.chains, media_id)
            available = room(chain)
            if available == 0 or (available < need and not partial):
                raise full(chain, need)
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
            require_live_holder(conn, holder_id)
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

    def hold(self, media_id: str, holder_id: str, chunk: int = 0) -> int:
        """Mark a media open for writing by this holder: a grant row, with a first
        grant of up to ``chunk`` bytes (as ``grant_size`` sizes one, so never more
        than a quarter of the room left), as a create has. Returns the bytes
        granted: a reopened file then grows by that much with no other transaction.

        Volume moves refuse media that has any grant. The media row is locked
        too, after its pool chain as a settle takes them, and it is the lock a
        move's switch takes, so a writer cannot open the file between a move's
        last check and its switch.
        """
        with self.db.statements() as conn:
            require_live_holder(conn, holder_id)
            media, chain = lock_media(conn, self.chains, media_id)
            conn.execute(_MEDIA_LOCK, {"mid": media_id})
            mine = {"ids": [media_id], "holder": holder_id}
            if conn.execute(_HOLDER_GRANTS, mine).first() is not None:
                return 0
            first = grant_size(0, max(0, room(chain)), chunk)
            charge(conn, chain, first)
            add_grant(conn, media.pool_id, media_id, holder_id, first)
            return first

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
            require_live_holder(conn, holder_id)
            (chain,) = self.chains.lock(conn, pool_id)
            available = room(chain)
            if available < need:
                raise full(chain, need)
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

    # the lease ------------------------------------------------------------------
    @property
    def lease_ns(self) -> int:
        """The catalog's lease length, as read last (at each registration and renewal)."""
        if self._lease_ns is None:
            with self.db.statements() as conn:
                self._lease_ns = int(conn.execute(_LEASE_NS).scalar_one())
        return self._lease_ns

    def set_lease(self, seconds: float) -> None:
        """Set the catalog's lease length. Each holder's lease takes it at its next
        renewal: a lease already given keeps the end it was given."""
        low, high = LEASE_RANGE_S
        if not low <= seconds <= high:
            raise InvalidValue(f"the lease must be {low} to {high:.0f} seconds, not {seconds}")
        lease_ns = int(seconds * 1_000_000_000)
        with self.db.statements() as conn:
            conn.execute(update(SETTINGS).where(SETTINGS.c.id == 1).values(lease_ns=lease_ns))
        self._lease_ns = lease_ns

    def lease_of(self, holder_id: str) -> Lease:
        """The lease of a holder this process registered (and still is)."""
        return self._leases[holder_id]

    def register_holder(self) -> str:
        """Record this process as a grant holder with a fresh lease; return its id."""
        sent = time.monotonic()
        holder_id = new_id()
        with self.db.statements() as conn:
            lease_ns = int(conn.execute(_LEASE_NS).scalar_one())
            now = self.db.now_ns()
            conn.execute(
                insert(HOLDERS).values(
                    id=holder_id,
                    host=socket.gethostname(),
                    pid=os.getpid(),
                    started_ns=time.time_ns(),
                    heartbeat_ns=now,
                    expires_ns=now + lease_ns,
                    fenced=False,
                )
            )
        self._lease_ns = lease_ns
        self._leases[holder_id] = Lease(sent, lease_ns / 1e9)
        return holder_id

    def heartbeat(self, holder_id: str) -> Lease | None:
        """Renew this holder's lease for the catalog's lease length from now.

        None when the lease has already expired or the holder was fenced: then
        another process may be reclaiming its grants, and the holder can only
        register afresh. Both are checked in the renewing statement itself, on
        the catalog's clock, so a renewal can never revive a lease a reclaim
        has judged expired.
        """
        sent = time.monotonic()
        with self.db.statements() as conn:
            lease_ns = int(conn.execute(_LEASE_NS).scalar_one())
            now = self.db.now_ns()
            renewed = conn.execute(
                update(HOLDERS)
                .where(
                    HOLDERS.c.id == holder_id,
                    HOLDERS.c.fenced == false(),
                    HOLDERS.c.expires_ns >= now,
                )
                .values(heartbeat_ns=now, expires_ns=now + lease_ns)
            ).rowcount
        self._lease_ns = lease_ns
        if not renewed:
            self._leases.pop(holder_id, None)
            return None
        lease = self._leases[holder_id] = Lease(sent, lease_ns / 1e9)
        return lease

    def retire_holder(self, holder_id: str) -> None:
        """Forget a holder on a clean shutdown, unless grants or media it unlinked while
        open are left (a settlement or removal failed): then the row stays, so they
        are reclaimed like a dead one's."""
        self._leases.pop(holder_id, None)
        with self.db.transaction() as s:
            holder = s.get(Holder, holder_id)
            left = s.execute(select(Grant.id).where(Grant.holder_id == holder_id)).first()
            if left is None:
                unlinked = select(Media.id).where(Media.unlinked_by == holder_id)
                left = s.execute(unlinked).first()
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

    def holder_ids(self) -> list[str]:
        """Every registered holder, alive or not."""
        with self.db.transaction() as s:
            return list(s.execute(select(Holder.id)).scalars())

    def dead_holders(self) -> list[str]:
        """Holders whose grants are stale: one being reclaimed (fenced), one whose lease
        expired on any host (a crashed, stalled or cut-off machine), a gone process on
        this host. Never a holder this process is: one that finds its own lease expired
        registers again instead (``Velocity.register_writer_again``)."""
        with self.db.statements() as conn:
            rows = conn.execute(self._judging()).all()
        return [r.id for r in rows if r.id not in self._leases and _dead(r)]

    def fence(self, holder_id: str) -> bool:
        """Judge a holder dead and fence it, in one transaction; False if it lives.

        Dead is what ``dead_holders`` says, judged again under the row's lock. A
        fenced holder can neither renew its lease nor take, grow or settle a
        grant (``require_live_holder``), so once this commits its backing files
        change no more by its hand and may be measured. A holder gone from the
        catalog counts as fenced (grants it left are reclaimed all the same).
        This process's own holders are never fenced by it.
        """
        if holder_id in self._leases:
            return False
        with self.db.statements() as conn:
            row = conn.execute(
                self._judging().where(HOLDERS.c.id == holder_id).with_for_update()
            ).first()
            if row is None or row.fenced:
                return True
            if not _dead(row):
                return False
            conn.execute(update(HOLDERS).where(HOLDERS.c.id == holder_id).values(fenced=True))
            return True

    def _judging(self) -> "Select[str, str, int, bool, bool]":
        """Holders with what ``_dead`` judges them by; ``expired`` on the catalog's clock."""
        expired = HOLDERS.c.expires_ns < self.db.now_ns()
        return select(
            HOLDERS.c.id, HOLDERS.c.host, HOLDERS.c.pid, HOLDERS.c.fenced, expired.label("expired")
        )

    def stale_grants(self, holder_ids: Sequence[str]) -> list[tuple[str, str | None]]:
        """(grant id, media id) of every grant held by ``holder_ids``; the media id is
        None for an upload's grant (its media does not exist yet)."""
        with self.db.transaction() as s:
            rows = s.execute(
                select(Grant.id, Grant.media_id).where(Grant.holder_id.in_(holder_ids))
            ).all()
            return [(gid, mid) for gid, mid in rows]

    def reclaim(self, holder_id: str, sizes: dict[str, int]) -> int:
        """Drop a fenced holder's grants, settling each media to its size on disk.

        ``sizes`` maps media id to the backing file's apparent size, measured
        after the fence (``fence``), so bytes the holder really wrote stay
        charged, even past a quota (they are on disk, and were acknowledged to
        a client), and the rest is returned; no file is cut. ``RECLAIM_BATCH``
        grants a transaction, their chains locked together root-first; the
        holder's row goes last, so a reclaim cut short is finished by the next.
        Returns how many grants were reclaimed.
        """
        with self.db.statements() as conn:
            grant_ids = list(
                conn.execute(select(GRANTS.c.id).where(GRANTS.c.holder_id == holder_id)).scalars()
            )
        for start in range(0, len(grant_ids), RECLAIM_BATCH):
            with self.db.statements() as conn:
                self._reclaim_grants(conn, grant_ids[start : start + RECLAIM_BATCH], sizes)
        with self.db.statements() as conn:
            conn.execute(delete(HOLDERS).where(HOLDERS.c.id == holder_id))
        return len(grant_ids)

    def _reclaim_grants(
        self, conn: Connection, grant_ids: list[str], sizes: dict[str, int]
    ) -> None:
        """One transaction of ``reclaim``. Every change to a grant is made under its
        pool's chain lock, so the grants are read again once the locks are taken:
        two processes reclaiming one holder at once must not both hand back one
        grant (on PostgreSQL the second waits for the first's locks)."""
        params = {"gids": grant_ids}
        grants = conn.execute(_GRANTS_BY_IDS, params).all()
        chains: dict[str, list[Link]] = {}
        while any(g.pool_id not in chains for g in grants):
            pool_ids = sorted({g.pool_id for g in grants})
            chains = dict(zip(pool_ids, self.chains.lock(conn, *pool_ids), strict=True))
            grants = conn.execute(_GRANTS_BY_IDS, params).all()
        if not grants:
            return
        ids = [g.media_id for g in grants if g.media_id is not None]
        media = {r.id: r for r in conn.execute(_MEDIA_ROWS, {"ids": ids})}
        deltas: dict[str, int] = {}
        resized = []
        for grant in grants:
            delta = -grant.bytes
            row = media.get(grant.media_id) if grant.media_id is not None else None
            if row is not None and row.id in sizes:
                real = sizes[row.id]
                if real > row.size + grant.bytes:
                    log.warning(
                        "media %s has %d bytes on disk, %d more than its dead holder was "
                        "granted: kept and charged",
                        row.id,
                        real,
                        real - row.size - grant.bytes,
                    )
                delta += real - row.size
                resized.append({"mid": row.id, "new_size": real, "new_mtime": None})
            deltas[grant.pool_id] = deltas.get(grant.pool_id, 0) + delta
        for pool_id, delta in deltas.items():
            adjust(conn, chains[pool_id], delta)
        if resized:
            conn.execute(_SET_SIZE, resized)
        conn.execute(_DROP_GRANTS, {"gids": [g.id for g in grants]})

    def record_sizes(self, sizes: dict[str, int]) -> None:
        """Record media sizes measured on disk, charging or returning the difference
        unchecked: the bytes are there (a mount registering again, fsck)."""
        ids = list(sizes)
        for start in range(0, len(ids), RECLAIM_BATCH):
            with self.db.statements() as conn:
                rows = conn.execute(_MEDIA_ROWS, {"ids": ids[start : start + RECLAIM_BATCH]})
                changed = [r.id for r in rows if r.size != sizes[r.id]]
                if not changed:
                    continue
                media, chains = lock_media_rows(conn, self.chains, changed)
                deltas: dict[str, int] = {}
                for row in media.values():
                    deltas[row.pool_id] = deltas.get(row.pool_id, 0) + sizes[row.id] - row.size
                for pool_id, delta in deltas.items():
                    adjust(conn, chains[pool_id], delta)
                resized = [{"mid": mid, "new_size": sizes[mid], "new_mtime": None} for mid in media]
                conn.execute(_SET_SIZE, resized)


def _dead(holder: HolderRow) -> bool:
    """Fenced, its lease expired, or its process gone (trusted only on this host)."""
    if holder.fenced or holder.expired:
        return True
    return holder.host == socket.gethostname() and not _process_alive(holder.pid)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
