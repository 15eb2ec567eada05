"""Pool chains: the rows a quota check locks, reads and charges.

``Pool.used_bytes`` is the settled size of every media in the pool's subtree
plus every outstanding grant there. Every change to it is applied to the pool
and all its ancestors in one transaction, after locking those rows root-first
(a fixed global order, so concurrent writers on PostgreSQL never deadlock; on
SQLite ``BEGIN IMMEDIATE`` already serialises writers). A change is refused
when it would lift any pool on the chain past its quota, so a check costs
O(depth) and never scans media.

Everything here is SQLAlchemy Core on a ``Connection`` (ORM callers pass
``session.connection()``): these statements run in every create, settle and
remove, and the ORM's unit of work cost ten times the SQL itself there.
"""

import functools
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import (
    BigInteger,
    BindParameter,
    Connection,
    String,
    bindparam,
    case,
    select,
    update,
)

from velocityfs.catalog.database import BATCH_MEMO
from velocityfs.catalog.models import Pool
from velocityfs.catalog.prepared import Prepared
from velocityfs.errors import NotFound, QuotaExceeded

POOLS = Pool.__table__


@dataclass
class Link:
    """One locked pool of a chain, as read under its lock (and charged since)."""

    id: str
    parent_id: str | None
    name: str
    quota_bytes: int | None
    used_bytes: int


_PARENT = Prepared(select(POOLS.c.parent_id).where(POOLS.c.id == bindparam("pid")))
_LINK_COLUMNS = (
    POOLS.c.id,
    POOLS.c.parent_id,
    POOLS.c.name,
    POOLS.c.quota_bytes,
    POOLS.c.used_bytes,
)
_LOCK = Prepared(select(*_LINK_COLUMNS).where(POOLS.c.id == bindparam("pid")).with_for_update())
_TOUCHED = bindparam("touched", type_=String)
_NOW = bindparam("now", type_=BigInteger)

# Statements over several pools are built once per number of pools, not with an
# expanding IN: rendering one of those costs ~40 us each time it runs, as much as
# the statement itself, and chains are short.


def _ids(count: int) -> list[BindParameter[str]]:
    return [bindparam(f"p{i}", type_=String) for i in range(count)]


def _id_params(pool_ids: Sequence[str]) -> dict[str, str]:
    return {f"p{i}": pid for i, pid in enumerate(pool_ids)}


@functools.cache
def _read(count: int) -> Prepared:
    """``count`` pools in one read, for SQLite (BEGIN IMMEDIATE already holds every lock)."""
    return Prepared(select(*_LINK_COLUMNS).where(POOLS.c.id.in_(_ids(count))))


@functools.cache
def _charge(count: int) -> Prepared:
    """Charge ``count`` pools in one statement and, optionally, touch one pool's times
    (a directory's mtime and ctime change with its entries)."""
    return Prepared(
        update(POOLS)
        .where(POOLS.c.id.in_(_ids(count)))
        .values(
            used_bytes=POOLS.c.used_bytes + bindparam("delta"),
            mtime_ns=case((POOLS.c.id == _TOUCHED, _NOW), else_=POOLS.c.mtime_ns),
            ctime_ns=case((POOLS.c.id == _TOUCHED, _NOW), else_=POOLS.c.ctime_ns),
        )
    )


_TOUCH = Prepared(
    update(POOLS)
    .where(POOLS.c.id == bindparam("pid"))
    .values(mtime_ns=bindparam("now"), ctime_ns=bindparam("now"))
)

_NAME = Prepared(select(POOLS.c.name).where(POOLS.c.id == bindparam("pid")))


class Chains:
    """Finds and locks pool chains, remembering the tree's shape between transactions.

    What it remembers (each pool's parent, as last seen in this catalog) is only
    a hint: every locked row is checked against it, so a pool moved by another
    process costs a retry, never a wrong charge. One per ``Velocity``, so two
    catalogs in one process never share hints.
    """

    def __init__(self) -> None:
        self._parents: dict[str, str | None] = {}

    def ids(self, conn: Connection, pool_id: str) -> list[str]:
        """Ids of ``pool_id`` and its ancestors, root first (O(depth) primary-key reads).

        Measured here, a read per level beats one recursive CTE until trees are
        far deeper than pools get (2 levels: 190 us against 700 us).
        """
        ids: list[str] = []
        current: str | None = pool_id
        while current is not None:
            parent = _PARENT.execute(conn, {"pid": current}).fetchone()
            if parent is None:
                raise NotFound(f"no pool {current}")
            ids.append(current)
            self._parents[current] = parent[0]
            current = parent[0]
        ids.reverse()
        return ids

    def path(self, conn: Connection, pool_id: str) -> str:
        """The pool's path of names, root first (``tenants/acme``)."""
        names = []
        for pid in self.ids(conn, pool_id):
            row = _NAME.execute(conn, {"pid": pid}).fetchone()
            if row is None:
                raise NotFound(f"no pool {pid}")
            names.append(row[0])
        return "/".join(names)

    def _remembered(self, pool_id: str) -> list[str] | None:
        ids: list[str] = []
        current: str | None = pool_id
        while current is not None:
            if current not in self._parents or len(ids) > 256:
                return None
            ids.append(current)
            current = self._parents[current]
        ids.reverse()
        return ids

    def lock(self, conn: Connection, *pool_ids: str) -> list[list[Link]]:
        """Lock the ancestor chains of ``pool_ids`` root-first; return each chain, root first.

        Rows are locked in order of (depth, id) across all chains, one global order
        that every transaction of the ledger follows. A pool on several chains is
        one ``Link``, so charges to overlapping chains add up. The chains come from
        what is remembered of the tree when they can, and every locked row is
        checked against them: a pool moved meanwhile means looking the chain up
        again, as does a remembered ancestor that no longer exists. In a batch
        (``Database.batched``) the links read are remembered until it commits:
        nothing but its own units, which keep them current, can change them.
        """
        memo = conn.info.get(BATCH_MEMO)
        while True:
            chains = [self._remembered(pid) or self.ids(conn, pid) for pid in pool_ids]
            if memo is not None and all(pid in memo for chain in chains for pid in chain):
                return [[memo[pid] for pid in chain] for chain in chains]
            order = sorted({(depth, pid) for chain in chains for depth, pid in enumerate(chain)})
            wanted = [pid for _depth, pid in order]
            links = _read_links(conn, wanted)
            missing = [pid for pid in wanted if pid not in links]
            for pid in missing:
                self._parents.pop(pid, None)
                if pid in pool_ids:
                    raise NotFound(f"no pool {pid}")
            if missing:
                # Only remembered ancestors are gone (a pool moved away before its old
                # parent was removed): the hints through them are forgotten just now,
                # so the chains are read again.
                continue
            current = all(
                links[pid].parent_id == (chain[i - 1] if i else None)
                for chain in chains
                for i, pid in enumerate(chain)
            )
            if current:
                if memo is not None:
                    memo.update(links)
                    links = memo
                return [[links[pid] for pid in chain] for chain in chains]
            for pid, link in links.items():
                self._parents[pid] = link.parent_id


def chain_path(chain: Sequence[Link]) -> str:
    """The path of names of a chain's last pool, from its links (no query)."""
    return "/".join(link.name for link in chain)


def serialised(conn: Connection) -> bool:
    """SQLite transactions here start with BEGIN IMMEDIATE: nothing changes under them,
    so a row read before the locks is as current as one read after."""
    return conn.dialect.name == "sqlite"


def _read_links(conn: Connection, pool_ids: list[str]) -> dict[str, Link]:
    """The pools' rows, locked in the order given (one read where nothing needs locking);
    a pool that does not exist is left out."""
    if not pool_ids:
        return {}
    if serialised(conn):
        rows = {r[0]: r for r in _read(len(pool_ids)).execute(conn, _id_params(pool_ids))}
    else:
        rows = {pid: _LOCK.execute(conn, {"pid": pid}).fetchone() for pid in pool_ids}
    links: dict[str, Link] = {}
    for pid in pool_ids:
        row = rows.get(pid)
        if row is not None:
            links[pid] = Link(*row)
    return links


def room(chain: Sequence[Link]) -> int:
    """Bytes that may still be charged to the last pool of ``chain`` (min over ancestors)."""
    limits = [p.quota_bytes - p.used_bytes for p in chain if p.quota_bytes is not None]
    return max(0, min(limits)) if limits else 0


def charge(
    conn: Connection, chain: Sequence[Link], delta: int, *, touch_ns: int | None = None
) -> None:
    """Add ``delta`` to every pool of ``chain``; refuse if a quota would be passed.

    A negative delta (returning room) is never refused. With ``touch_ns`` the
    last pool's mtime and ctime are set too, in the same statement.
    """
    if delta > 0 and any(
        p.quota_bytes is not None and p.used_bytes + delta > p.quota_bytes for p in chain
    ):
        raise full(chain, delta)
    adjust(conn, chain, delta, touch_ns=touch_ns)


def full(chain: Sequence[Link], need: int) -> QuotaExceeded:
    """The refusal of ``need`` bytes on ``chain``, naming the pool that is full: the one
    with the least room, which may be an ancestor of the pool written to."""
    limited = [p for p in chain if p.quota_bytes is not None]
    if not limited:
        path = chain_path(chain)
        return QuotaExceeded(f"pool '{path}' has no quota: no room", pool=path)
    pool = min(limited, key=lambda p: (p.quota_bytes or 0) - p.used_bytes)
    path = chain_path(chain[: chain.index(pool) + 1])
    left = max(0, (pool.quota_bytes or 0) - pool.used_bytes)
    return QuotaExceeded(f"pool '{path}' is full: {left} bytes left, {need} needed", pool=path)


def adjust(
    conn: Connection, chain: Sequence[Link], delta: int, *, touch_ns: int | None = None
) -> None:
    """Add ``delta`` to every pool of ``chain`` unchecked: bytes that are already on
    disk (fsck) count even past a quota."""
    if delta == 0 and touch_ns is None:
        return
    touched = chain[-1].id if touch_ns is not None else None
    params = _id_params([p.id for p in chain])
    _charge(len(chain)).execute(
        conn, {**params, "delta": delta, "touched": touched, "now": touch_ns}
    )
    for pool in chain:
        pool.used_bytes += delta


def touch(conn: Connection, pool_id: str, now_ns: int) -> None:
    """A pool's entries changed: its mtime and ctime move, as a directory's do."""
    _TOUCH.execute(conn, {"pid": pool_id, "now": now_ns})
