"""Pool rules: the tree, names, quotas, removal."""

import dataclasses
import math
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, bindparam, delete, func, insert, select, union_all, update
from sqlalchemy.orm import Session

from velocityfs.catalog.database import Database
from velocityfs.catalog.models import Grant, Media, Pool, Share, XAttr, new_id
from velocityfs.catalog.prepared import Prepared
from velocityfs.errors import (
    Conflict,
    InvalidValue,
    NotEmpty,
    NotFound,
    QuotaAboveAncestor,
    QuotaBelowUsage,
)
from velocityfs.service.batch import WriteBatch
from velocityfs.service.chains import Chains, Link, charge, room, touch
from velocityfs.service.names import check_name
from velocityfs.service.removals import record_removals
from velocityfs.service.views import PoolView, attr_changes

POOLS = Pool.__table__
_INSERT_POOL = Prepared(insert(POOLS))
_POOL_EXISTS = select(POOLS.c.id).where(POOLS.c.id == bindparam("pid"))
# A journaled subpool's columns (``changed_ns`` is set anew when it is recovered).
_POOL_KEYS = ("id", "parent_id", "mode", "uid", "gid", "atime_ns", "mtime_ns", "ctime_ns")

MIB = 1 << 20
# The most bytes a quota or a size may be: what the catalog's BIGINT columns hold.
MAX_BYTES = (1 << 63) - 1


def pool_view(pool: Pool) -> PoolView:
    return PoolView(
        id=pool.id,
        parent_id=pool.parent_id,
        name=pool.name,
        quota_bytes=pool.quota_bytes,
        used_bytes=pool.used_bytes,
        mode=pool.mode,
        uid=pool.uid,
        gid=pool.gid,
        atime_ns=pool.atime_ns,
        mtime_ns=pool.mtime_ns,
        ctime_ns=pool.ctime_ns,
    )


_NAME_TAKEN = Prepared(
    union_all(
        select(Pool.id).where(Pool.parent_id == bindparam("pid"), Pool.name == bindparam("name")),
        select(Media.id).where(Media.pool_id == bindparam("pid"), Media.name == bindparam("name")),
    )
)


def name_taken(conn: Connection, pool_id: str, name: str) -> bool:
    """Pools and media share one namespace inside a pool, as in a directory."""
    return _NAME_TAKEN.execute(conn, {"pid": pool_id, "name": name}).fetchone() is not None


def check_quota_fits(chain: list[Link], quota: int | None) -> None:
    """A pool's quota may not exceed any ancestor's (``chain`` ends with the parent)."""
    if quota is None:
        return
    if quota < 0:
        raise InvalidValue("quota must not be negative")
    for ancestor in chain:
        if ancestor.quota_bytes is not None and quota > ancestor.quota_bytes:
            raise QuotaAboveAncestor(
                f"quota {quota} exceeds the quota {ancestor.quota_bytes} of pool '{ancestor.name}'"
            )


def _max_child_quota(session: Session, pool_id: str) -> int | None:
    """The largest quota set anywhere below ``pool_id`` (recursive)."""
    largest: int | None = None
    frontier = [pool_id]
    while frontier:
        rows = session.execute(
            select(Pool.id, Pool.quota_bytes).where(Pool.parent_id.in_(frontier))
        ).all()
        frontier = [r[0] for r in rows]
        for _id, quota in rows:
            if quota is not None and (largest is None or quota > largest):
                largest = quota
    return largest


def subtree_ids(session: Session, pool_id: str) -> list[str]:
    """``pool_id`` and every pool below it, parents before children."""
    ids = [pool_id]
    frontier = [pool_id]
    while frontier:
        frontier = list(
            session.execute(select(Pool.id).where(Pool.parent_id.in_(frontier))).scalars()
        )
        ids.extend(frontier)
    return ids


def recover_pool(conn: Connection, chains: Chains, record: dict[str, Any]) -> bool:
    """Make a journaled subpool again (``MediaService.recover_journal``): under its
    name, or ``NAME.recovered-ID8`` when that was taken since; not if it exists or its
    parent is gone. True when it was made."""
    if conn.execute(_POOL_EXISTS, {"pid": record["id"]}).first() is not None:
        return False
    try:
        chains.lock(conn, record["parent_id"])
    except NotFound:
        return False
    name = record["name"]
    if name_taken(conn, record["parent_id"], name):
        name = f"{name}.recovered-{record['id'][:8]}"
    now = time.time_ns()
    touch(conn, record["parent_id"], now)
    row = {key: record[key] for key in _POOL_KEYS}
    _INSERT_POOL.execute(
        conn, {**row, "name": name, "quota_bytes": None, "used_bytes": 0, "changed_ns": now}
    )
    return True


class PoolService:
    """Pool operations; each public method is one transaction (or, ``batched``, one
    unit of the process's batch: see ``service.batch``)."""

    def __init__(
        self,
        database: Database,
        chains: Chains,
        on_media_removed: Callable[[list[tuple[str, str]]], None],
        batch: WriteBatch,
    ) -> None:
        self.db = database
        self.chains = chains
        self._on_media_removed = on_media_removed
        self._batch = batch

    def create(
        self,
        parent_id: str | None,
        name: str,
        quota_bytes: int | None,
        *,
        mode: int = 0o755,
        uid: int = 0,
        gid: int = 0,
        batched: bool = False,
    ) -> PoolView:
        """Create a pool; a root pool needs a quota, a subpool inherits its parent's limit.
        A subpool may be ``batched``: journaled, it comes back after a crash as a
        create does (``recover_pool``)."""
        check_name(name, "pool name")
        if parent_id is not None:
            return self._create_subpool(
                parent_id, name, quota_bytes, mode=mode, uid=uid, gid=gid, batched=batched
            )
        now = time.time_ns()
        with self.db.transaction() as s:
            if quota_bytes is None:
                raise InvalidValue("a root pool needs a quota")
            if quota_bytes < 0:
                raise InvalidValue("quota must not be negative")
            taken = s.execute(
                select(Pool.id).where(Pool.parent_id.is_(None), Pool.name == name)
            ).first()
            if taken is not None:
                raise Conflict(f"a root pool named '{name}' exists")
            pool = Pool(
                parent_id=parent_id,
                name=name,
                quota_bytes=quota_bytes,
                used_bytes=0,
                mode=mode,
                uid=uid,
                gid=gid,
                atime_ns=now,
                mtime_ns=now,
                ctime_ns=now,
            )
            s.add(pool)
            s.flush()
            return pool_view(pool)

    def _create_subpool(
        self,
        parent_id: str,
        name: str,
        quota_bytes: int | None,
        *,
        mode: int,
        uid: int,
        gid: int,
        batched: bool,
    ) -> PoolView:
        now = time.time_ns()
        view = PoolView(
            id=new_id(),
            parent_id=parent_id,
            name=name,
            quota_bytes=quota_bytes,
            used_bytes=0,
            mode=mode,
            uid=uid,
            gid=gid,
            atime_ns=now,
            mtime_ns=now,
            ctime_ns=now,
        )
        row = dataclasses.asdict(view)
        with self._batch.unit(batched=batched) as (conn, journal):
            (chain,) = self.chains.lock(conn, parent_id)
            check_quota_fits(chain, quota_bytes)
            if name_taken(conn, parent_id, name):
                raise Conflict(f"'{name}' already exists in pool '{chain[-1].name}'")
            touch(conn, parent_id, now)
            _INSERT_POOL.execute(conn, {**row, "changed_ns": now})
            if journal is not None:
                journal.append({"op": "pool", **row})
        return view

    def get(self, pool_id: str) -> PoolView:
        with self.db.transaction() as s:
            pool = s.get(Pool, pool_id)
            if pool is None:
                raise NotFound(f"no pool {pool_id}")
            return pool_view(pool)

    def all(self) -> list[PoolView]:
        with self.db.reading() as s:
            return [pool_view(p) for p in s.execute(select(Pool)).scalars()]

    def resolve(self, path: str) -> PoolView:
        """A pool by its path of names from the root, e.g. ``tenants/acme``."""
        parts = [p for p in path.strip("/").split("/") if p]
        if not parts:
            raise NotFound("empty pool path")
        with self.db.transaction() as s:
            parent: str | None = None
            pool = None
            for part in parts:
                cond = Pool.parent_id.is_(None) if parent is None else Pool.parent_id == parent
                pool = s.execute(select(Pool).where(cond, Pool.name == part)).scalar_one_or_none()
                if pool is None:
                    raise NotFound(f"no pool '{path}'")
                parent = pool.id
            assert pool is not None
            return pool_view(pool)

    def path(self, pool_id: str) -> str:
        """The pool's path of names (``tenants/acme``)."""
        with self.db.reading() as s:
            return self.chains.path(s.connection(), pool_id)

    def available(self, pool_id: str) -> int:
        """The room really left: the minimum over the pool and all its ancestors."""
        with self.db.transaction() as s:
            (chain,) = self.chains.lock(s.connection(), pool_id)
            return room(chain)

    def set_quota(self, pool_id: str, quota_bytes: int | None) -> PoolView:
        """Change a quota; refused above an ancestor's, below a subpool's, or below usage."""
        with self.db.transaction() as s:
            (chain,) = self.chains.lock(s.connection(), pool_id)
            link = chain[-1]
            if quota_bytes is None:
                if link.parent_id is None:
                    raise InvalidValue("a root pool needs a quota")
            else:
                check_quota_fits(chain[:-1], quota_bytes)
                if quota_bytes < link.used_bytes:
                    raise QuotaBelowUsage(
                        f"pool '{link.name}' uses {link.used_bytes} bytes, more than {quota_bytes}"
                    )
                child_max = _max_child_quota(s, pool_id)
                if child_max is not None and child_max > quota_bytes:
                    raise QuotaAboveAncestor(
                        f"a subpool of '{link.name}' has a quota of {child_max}, "
                        f"more than {quota_bytes}"
                    )
            pool = s.get(Pool, pool_id)
            assert pool is not None  # locked above
            pool.quota_bytes = quota_bytes
            pool.ctime_ns = time.time_ns()
            return pool_view(pool)

    def set_attrs(
        self,
        pool_id: str,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
        batched: bool = False,
    ) -> None:
        """Directory metadata that ``cp -a`` and ``rsync -a`` restore; ``batched`` as for
        ``create``."""
        columns = attr_changes(mode=mode, uid=uid, gid=gid, atime_ns=atime_ns, mtime_ns=mtime_ns)
        with self._batch.unit(batched=batched) as (conn, journal):
            done = conn.execute(update(POOLS).where(POOLS.c.id == pool_id).values(**columns))
            if done.rowcount == 0:
                raise NotFound(f"no pool {pool_id}")
            if journal is not None:
                journal.append({"op": "attrs", "table": "pools", "id": pool_id, **columns})

    def rename(self, pool_id: str, new_parent_id: str, new_name: str) -> PoolView:
        """Rename or move a subpool; its usage moves with it and must fit the new chain."""
        check_name(new_name, "pool name")
        with self.db.transaction() as s:
            pool = s.get(Pool, pool_id)
            if pool is None:
                raise NotFound(f"no pool {pool_id}")
            if pool.parent_id is None:
                raise InvalidValue("root pools cannot be renamed or moved")
            conn = s.connection()
            if pool_id in self.chains.ids(conn, new_parent_id):
                raise InvalidValue("a pool cannot move below itself")
            # The pool's own row too: its usage, read under the lock, is what moves.
            old_chain, new_chain, own = self.chains.lock(
                conn, pool.parent_id, new_parent_id, pool_id
            )
            if name_taken(conn, new_parent_id, new_name):
                raise Conflict(f"'{new_name}' already exists in pool '{new_chain[-1].name}'")
            now = time.time_ns()
            if pool.parent_id != new_parent_id:
                check_quota_fits(new_chain, pool.quota_bytes)
                # Subpools' quotas move along and must fit under the new ancestors too.
                check_quota_fits(new_chain, _max_child_quota(s, pool_id))
                charge(conn, old_chain, -own[-1].used_bytes, touch_ns=now)
                charge(conn, new_chain, own[-1].used_bytes, touch_ns=now)
            else:
                touch(conn, new_parent_id, now)
            pool.parent_id = new_parent_id
            pool.name = new_name
            pool.ctime_ns = now
            return pool_view(pool)

    def remove(self, pool_id: str, *, recursive: bool = False) -> None:
        """Remove a pool; with ``recursive`` also its subpools and media (the API's DELETE).

        Usage of the removed subtree is returned to the ancestors in the same
        transaction; backing files are deleted after the commit.
        """
        with self.db.transaction() as s:
            # Lock the pool itself too: every change below it locks it, so its usage,
            # subpools and media read after this stay current until the commit.
            conn = s.connection()
            (chain,) = self.chains.lock(conn, pool_id)
            pool = chain[-1]
            ids = subtree_ids(s, pool_id)
            media_rows = s.execute(
                select(Media.id, Media.volume, Media.unlinked_by).where(Media.pool_id.in_(ids))
            ).all()
            # Media unlinked while open has no name here: it keeps no pool from going.
            listed = any(m.unlinked_by is None for m in media_rows)
            if not recursive and (len(ids) > 1 or listed):
                raise NotEmpty(f"pool '{pool.name}' is not empty")
            if pool.parent_id is not None:
                charge(conn, chain[:-1], -pool.used_bytes, touch_ns=time.time_ns())
            media_ids = [m[0] for m in media_rows]
            record_removals(conn, "media", media_ids)
            record_removals(conn, "pool", ids)
            # The media's by subquery: a big pool has more media than one statement
            # may bind as parameters (65,535 on PostgreSQL).
            subtree_media = select(Media.id).where(Media.pool_id.in_(ids)).scalar_subquery()
            s.execute(delete(XAttr).where(XAttr.owner_id.in_(subtree_media)))
            s.execute(delete(XAttr).where(XAttr.owner_id.in_(ids)))
            s.execute(delete(Grant).where(Grant.pool_id.in_(ids)))
            s.execute(delete(Share).where(Share.pool_id.in_(ids)))
            s.execute(delete(Media).where(Media.pool_id.in_(ids)))
            for pid in reversed(ids):
                s.execute(delete(Pool).where(Pool.id == pid))
        self._on_media_removed([(mid, vol) for mid, vol, _holder in media_rows])

    def name_taken(self, pool_id: str, name: str) -> bool:
        with self.db.transaction() as s:
            return name_taken(s.connection(), pool_id, name)

    def capacity(self) -> tuple[int, int]:
        """Total quota and usage of the root pools: what ``df`` on the mount shows."""
        with self.db.transaction() as s:
            quota, used = s.execute(
                select(func.sum(Pool.quota_bytes), func.sum(Pool.used_bytes)).where(
                    Pool.parent_id.is_(None)
                )
            ).one()
            return int(quota or 0), int(used or 0)

    def media_count(self, pool_id: str) -> int:
        with self.db.transaction() as s:
            return s.execute(
                select(func.count())
                .select_from(Media)
                .where(Media.pool_id == pool_id, Media.unlinked_by.is_(None))
            ).scalar_one()


def mib_to_bytes(mib: int | float | str) -> int:
    """Quota and size arguments are MiB in the API and CLI; the catalog keeps bytes."""
    try:
        value = float(mib)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvalidValue(f"not a number of MiB: {mib!r}") from exc
    # NaN and infinities ("inf", or a JSON 1e999) are no amount of bytes.
    if value < 0 or not math.isfinite(value):
        raise InvalidValue(f"MiB must be a non-negative number: {mib!r}")
    # Nor is more than the catalog's 64-bit columns hold (1e308 MiB overflows a float).
    if value * MIB > MAX_BYTES:
        raise InvalidValue(f"MiB must be at most {MAX_BYTES // MIB}: {mib!r}")
    return int(value * MIB)
